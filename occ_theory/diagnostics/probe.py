"""One probe: every decomposition quantity at one optimizer step, online or from a saved bundle.

``run_probe`` takes the model *before* the step, the minibatch of the step, the coefficient the
run applied and the optimizer's state, and measures (docs/theory.md sections 2, 4, 5):

* the decomposition C, X, Q, λ*, λ*₁, Q_F, κ, ‖Pu‖² in SGD geometry (P = I) and in the
  optimizer's own geometry (Adam: ``P = 1/(sqrt(v̂)+ε)`` from its state, held fixed; absent on
  the first step, when the state is empty);
* every proxy (``reference`` and ``least_squares`` from log-probs, ``fisher`` from the JVP δ);
* the measured curve Δ(λ) on a grid bracketing the predicted λ*, in the run's geometry, with its
  quadratic fit, bootstrap intervals over sequences and L_eff; optionally with the real
  optimizer step and on a held-out batch. Optionally (``grid_cap`` > 0) the grid stops where the
  MTP step reaches ``grid_cap`` times the RL step (``grid_half_width``);
* the Taylor residual at η, η/2, η/4, … (identity 2 on the live model).

The online trainer and ``occ probe`` both call ``run_probe`` on the same inputs, so their
numbers agree; a bundle (``diagnostics/bundle.py``) holds those inputs. The curve and the Taylor
residual live in ``diagnostics/curve.py``.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from ..models import exact_float64
from ..rl.batch import (
    Norms,
    ObjectiveSpec,
    RLBatch,
    compute_objectives,
    forward_logprobs,
)
from ..rl.coef import Coefficient, CoefficientRule, fisher_proxy, logprob_proxies, proxy_record
from ..theory import Decomposition, eager_attention, grad
from ..theory.params import dot, sq_norm
from ..theory.precond import adam_preconditioner
from ..theory.step import (
    StepDecomposition,
    adamw_state_buffers,
    adamw_step_directions,
    decompose_steps,
    fixed_precond_directions,
)
from .curve import measure_curve, realised_step, taylor_residuals
from .realstep import adam_real_taylor, real_step_curves, taylor_record
from .recorder import module_breakdown
from .settings import ProbeSettings

NAN = float("nan")


@dataclass
class OptimizerSnapshot:
    """What the diagnostics need of an Adam/AdamW optimizer, keyed by shared-parameter name, and the
    recorder's bias-corrected momentum buffers of g and u (``adam_stationary``; None when not tracked)."""

    kind: str  # "adamw" | "adam" | "sgd"
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    state: dict[str, dict[str, Tensor]]  # name -> {"step", "exp_avg", "exp_avg_sq"}
    grad_clip: float = 0.0
    momentum: dict[str, dict[str, Tensor]] | None = None  # {"m_g": {name: m̂_g}, "m_u": {name: m̂_u}}
    clip_scope: str = "global"  # what the clip's norm spans (theory.step.CLIP_SCOPES); bundles before it: global

    @classmethod
    def capture(cls, optimizer: torch.optim.Optimizer, named: dict[str, nn.Parameter], grad_clip: float = 0.0,
                momentum: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None,
                copy: bool = True, clip_scope: str = "global") -> OptimizerSnapshot:
        """The optimizer's state now. ``copy=False`` holds the optimizer's own state tensors and the given
        momentum buffers instead of copies (four θ_S-sized tensors fewer): only for a snapshot that is done
        with before the optimizer next steps (the trainer's probe and bundle)."""
        group = optimizer.param_groups[0]
        kind = {"AdamW": "adamw", "Adam": "adam"}.get(type(optimizer).__name__, "sgd")
        keep = (lambda v: v.detach().clone()) if copy else (lambda v: v.detach())
        state = {}
        for name, p in named.items():
            st = optimizer.state.get(p, {})
            if "exp_avg_sq" in st:
                state[name] = {k: (keep(v) if isinstance(v, Tensor) else torch.tensor(v)) for k, v in st.items()}
        mom = None if momentum is None else {"m_g": {k: keep(v) for k, v in momentum[0].items()},
                                             "m_u": {k: keep(v) for k, v in momentum[1].items()}}
        return cls(kind, float(group["lr"]), tuple(group.get("betas", (0.9, 0.999))), float(group.get("eps", 1e-8)),
                   float(group.get("weight_decay", 0.0)), state, grad_clip, mom, clip_scope)

    def preconditioner(self, params: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """Adam's diagonal ``1/(sqrt(v̂)+ε)`` per shared parameter; None when any state is missing."""
        if self.kind == "sgd":
            return None
        return adam_preconditioner(self.state, params, self.betas[1], self.eps)

    def to_dict(self) -> dict[str, Any]:  # shallow: asdict would deep-copy every state tensor
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OptimizerSnapshot:
        d = dict(d)
        d["betas"] = tuple(d["betas"])
        return cls(**d)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


GEOMETRIES = ("sgd", "adam", "adam_step", "adam_stationary")
"""The geometries a probe measures (docs/theory.md section 2); each one's quantities are logged as ``diag/<geometry>/…``."""
PAPER_KEYS = ("corr", "cross", "curv", "curv_fisher", "gain_at_optimum", "pu_norm_sq", "pg_norm", "cosine")
"""C, X, Q and the rest of the fixed-P form, for the geometries that have one (``sgd``, ``adam``); ``cosine`` is
cos(g, u) in P's metric, gᵀPu/√(gᵀPg·uᵀPu)."""
STEP_KEYS = ("alpha_model", "beta_model", "alpha_first_order", "beta_fisher", "lambda_star", "lambda_star_first_order",
             "lambda_star_fisher", "lambda_bal", "s_norm", "a_norm", "proj")
"""The general step form θ + s + λ·a, for every geometry (``proj`` = η·gᵀa/‖a‖², which is κ = C/‖Pu‖² for the
fixed-P geometries)."""


def geometry_names(params: dict[str, Tensor], optim: OptimizerSnapshot) -> list[str]:
    """The geometries the optimizer state allows: ``sgd`` always; ``adam`` once Adam has state; ``adam_step``
    for AdamW (or Adam without weight decay), also on the first step; ``adam_stationary`` when the
    recorder's momentum buffers are in the snapshot too."""
    has_state = optim.kind != "sgd" and bool(params) and all(k in optim.state for k in params)
    names = ["sgd"] + (["adam"] if has_state else [])
    if optim.kind == "adamw" or (optim.kind == "adam" and optim.weight_decay == 0):
        names.append("adam_step")
    if has_state and optim.momentum is not None:
        names.append("adam_stationary")
    return names


def geometry_directions(params: dict[str, Tensor], g: dict[str, Tensor], u: dict[str, Tensor],
                        optim: OptimizerSnapshot, names: list[str] | None = None) -> dict[str, tuple[dict, dict]]:
    """``(s, a)`` of each geometry in ``names`` (default: every one the optimizer state allows,
    ``geometry_names``); each is two θ_S-sized tensors."""
    lr = optim.lr
    names = geometry_names(params, optim) if names is None else names
    precond = optim.preconditioner(params) if {"adam", "adam_stationary"} & set(names) else None
    out = {}
    if "sgd" in names:
        out["sgd"] = fixed_precond_directions(g, u, lr)
    if "adam" in names and precond is not None:
        out["adam"] = fixed_precond_directions(g, u, lr, precond)
    if "adam_step" in names:
        out["adam_step"] = adamw_step_directions(params, g, u, *adamw_state_buffers(params, optim.state), lr,
                                                 optim.betas, optim.eps,
                                                 optim.weight_decay if optim.kind == "adamw" else 0.0)
    if "adam_stationary" in names and precond is not None and optim.momentum is not None:
        out["adam_stationary"] = fixed_precond_directions(optim.momentum["m_g"], optim.momentum["m_u"], lr, precond)
    return out


def paper_terms(step: StepDecomposition, lr: float, g: dict[str, Tensor], u: dict[str, Tensor]) -> Decomposition:
    """C, X, Q of a fixed-P geometry (s = ηPg, a = ηPu) from its step form: C = gᵀa/η, X = (α_m − gᵀa)/η²,
    Q = β_m/η², Q_F = β_F/η², δ = ∇l·Pu = (∇l·a)/η."""
    g_norm, u_norm = float(sq_norm(g)) ** 0.5, float(sq_norm(u)) ** 0.5
    gu = float(dot(g, u))
    return Decomposition(
        lr=lr, corr=step.alpha_first_order / lr, cross=(step.alpha_model - step.alpha_first_order) / lr**2,
        curv=step.beta_model / lr**2, g_norm=g_norm, u_norm=u_norm,
        cosine=gu / (g_norm * u_norm) if g_norm > 0 and u_norm > 0 else NAN, pu_norm_sq=(step.a_norm / lr) ** 2,
        pg_norm=step.s_norm / lr, curv_fisher=step.beta_fisher / lr**2, geometry=step.geometry, method=step.method,
        dlogp=None if step.dlogp is None else step.dlogp / lr, grad_rl=step.grad_rl)


def _metric_norms(g: dict[str, Tensor], u: dict[str, Tensor], dirs: tuple[dict, dict], lr: float) -> tuple[float, float]:
    """gᵀPg and uᵀPu of a fixed-P geometry from its s = ηPg, a = ηPu."""
    return float(dot(g, dirs[0])) / lr, float(dot(u, dirs[1])) / lr


def _decomp_record(geometry: str, dec: Decomposition | None, step: StepDecomposition | None, lr: float,
                   metric: tuple[float, float] | None) -> dict[str, Any]:
    prefix = f"diag/{geometry}"
    fixed_p = geometry in ("sgd", "adam")
    keys = STEP_KEYS + (PAPER_KEYS if fixed_p else ())
    if step is None:
        why = "no optimizer state yet (first step)" if geometry != "adam_stationary" else "no momentum buffers"
        return {f"{prefix}/{k}": NAN for k in keys} | {f"{prefix}/concave": None, f"{prefix}/reason": why}
    d = step.as_dict() | (dec.as_dict() if dec is not None else {})
    d["proj"] = lr * step.alpha_first_order / step.a_norm**2 if step.a_norm > 0 else NAN
    if fixed_p:  # s = ηPg, a = ηPu: gᵀPg = gᵀs/η, uᵀPu = uᵀa/η
        gpg, upu = metric
        d["cosine"] = step.alpha_first_order / lr / (gpg * upu) ** 0.5 if gpg > 0 and upu > 0 else NAN
    return {f"{prefix}/{k}": d[k] for k in keys} | {f"{prefix}/concave": step.concave, f"{prefix}/reason": step.reason}


def _adam_t(optim: OptimizerSnapshot) -> int:
    """t of the step about to be taken (AdamW's state['step'] + 1): 1 is the first step, a sign step."""
    st = next(iter(optim.state.values()), None)
    return int(float(st["step"])) + 1 if st is not None else 1


def _control(spec: ObjectiveSpec, adam_t: int) -> str:
    """Why a probe is a control rather than evidence about the model of J (docs/theory.md section 6): ``detach``
    (u = 0 on θ_S: its real curve is the clip alone), ``first_step`` (AdamW's first step is a sign step), or ''."""
    if spec.grad_cut == "detach":
        return "detach"
    return "first_step" if adam_t == 1 else ""


def shared_params(model: nn.Module) -> dict[str, Tensor]:
    names = set(model.shared_param_names())
    return {k: p.detach() for k, p in model.named_parameters() if k in names}


@dataclass
class Probe:
    """One probe's flat ``record`` (scalars, and lists for curves) and the directions it measured
    on θ_S: ``g = ∇J`` and ``u = ∇M`` (None when the regime has no MTP loss)."""

    record: dict[str, Any]
    g: dict[str, Tensor] | None = None
    u: dict[str, Tensor] | None = None


def run_probe(model: nn.Module, batch: RLBatch, spec: ObjectiveSpec, coef: Coefficient, optim: OptimizerSnapshot,
              settings: ProbeSettings, heldout: RLBatch | None = None, dist: Any = None,
              realised: tuple[float, float] | None = None) -> Probe:
    """Every diagnostic of one step (see the module docstring). Leaves ``model`` unchanged.

    ``coef`` is the coefficient the run applied (``rl/coef.py``): its value is the λ used, its
    ``mtp_coef`` scales the log-prob proxies. ``dist`` (an ``occ_theory.train.dist.Dist``) makes
    every quantity the one of the global batch when ``batch`` is this process's shard: every
    process must call it at the same step. ``realised = (a, b)``: a rule replaced the update on θ_S by
    a·g + b·u (``rl/coef.py: shared_update``); the real step of that update is set against detach's
    (``diag/realised/…``)."""
    dtype = _dtype(settings.dtype)
    work = model if next(model.parameters()).dtype == dtype else copy.deepcopy(model).to(dtype)
    was_training = work.training
    work.eval()
    try:
        return _probe(work, batch, spec, coef, optim, settings, heldout, dtype, dist, realised)
    finally:
        work.train(was_training)


def row_chunks(batch: RLBatch, rows: int) -> list[RLBatch]:
    """``batch`` as consecutive blocks of at most ``rows`` rows, every column kept (``rows`` = 0: the batch itself)."""
    if rows <= 0 or rows >= batch.size:
        return [batch]
    return [batch.select(slice(i, i + rows)) for i in range(0, batch.size, rows)]


def summed_grad(terms: list, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """∇ of the sum of scalar functions ``terms`` (row chunks of one objective), one backward pass at a time."""
    total = grad(terms[0], params)[1]
    for f in terms[1:]:  # out of place: autograd may return one tensor (or a broadcast view) for several inputs
        total = {k: total[k] + t for k, t in grad(f, params)[1].items()}
    return total


def _cast(batch: RLBatch | None, dtype: torch.dtype) -> RLBatch | None:
    if batch is None:
        return None
    return RLBatch(**{k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.tensors().items()})


def _probe(work: nn.Module, batch: RLBatch, spec: ObjectiveSpec, coef: Coefficient, optim: OptimizerSnapshot,
           settings: ProbeSettings, heldout: RLBatch | None, dtype: torch.dtype, dist: Any = None,
           realised: tuple[float, float] | None = None) -> Probe:
    sums = dist.sum if dist is not None and dist.active else None  # sums over processes
    gather = dist.gather_cat if sums is not None else None  # per-sequence terms, concatenated
    b, hb = _cast(batch, dtype), _cast(heldout, dtype)
    params = shared_params(work)
    mask = b.response_mask
    lr, lam_used = optim.lr, coef.value
    rule = CoefficientRule("occ", coef.mtp_coef)  # scales each proxy as the run's rule would
    out: dict[str, Any] = {"diag/lr": lr, "diag/dtype": settings.dtype, "diag/hvp_method": settings.hvp_method}

    chunks = row_chunks(b, settings.row_chunk)
    # the token counts J and M are normalised by: global ones in data parallelism, the batch's own for row chunks
    norms = Norms.of(b, work.num_mtp, sums) if sums is not None or len(chunks) > 1 else None

    def J_of(part: RLBatch):
        return lambda p: compute_objectives(work, part, spec, params=p, with_mtp=False, norms=norms).rl_objective

    def M_of(part: RLBatch):
        return lambda p: compute_objectives(work, part, spec, params=p, norms=norms).mtp

    def logp_of(part: RLBatch):
        return lambda p: forward_logprobs(work, part, spec.temperature, spec.grad_cut, False, p)[0]

    J, M = J_of(b), M_of(b)
    J_terms, M_terms, logp_terms = ([f(c) for c in chunks] for f in (J_of, M_of, logp_of))

    def seq_terms(p):
        return compute_objectives(work, b, spec, params=p, with_mtp=False).seq_rl

    # float64: also keep RMSNorm and the softmax in float64 (transformers computes them in float32)
    curvature_numerics = exact_float64 if dtype == torch.float64 else eager_attention
    with curvature_numerics(work):
        with torch.no_grad():
            obj = compute_objectives(work, b, spec)
        raw, stats = logprob_proxies(obj.logp, b.old_logp, obj.mtp_logp, mask, b.prompt_len, b.attention_mask,
                                     dist.sum_terms if sums is not None else None)
        out |= stats | proxy_record(rule, raw)
        if spec.mtp_kind is None:
            return Probe(out | {"diag/skipped": "regime has no MTP loss"})
        red = sums or (lambda d: d)
        # u on θ_S and ∇_{θ_M}M in one backward pass: the real step's clip sees λ·∇_{θ_M}M too
        mtp_names = set(work.mtp_param_names())
        own = {k: p.detach() for k, p in work.named_parameters() if k in mtp_names}
        u_all = red(summed_grad(M_terms, params | own))
        u = {k: u_all[k] for k in params}
        mtp_grad_sq = float(sq_norm({k: u_all[k] for k in own})) if own else 0.0
        del u_all
        g = red(summed_grad(J_terms, params))
        names = geometry_names(params, optim)
        per_pass = settings.geometries_per_pass or len(names)
        steps, metric, step_dirs = {}, {}, None  # step_dirs: adam_step's (s, a), for the real-step curves
        for i in range(0, len(names), per_pass):  # each group's directions are dropped before the next is built
            dirs = geometry_directions(params, g, u, optim, names[i:i + per_pass])
            steps |= decompose_steps(J_terms, params, dirs, settings.hvp_method, sums, logp_terms, mask,
                                     jvp_batch=settings.jvp_batch, grad_rl=g)
            metric |= {k: _metric_norms(g, u, d, lr) for k, d in dirs.items() if k in ("sgd", "adam")}
            step_dirs = dirs.get("adam_step", step_dirs)
            del dirs
        out |= module_breakdown(g, u)
        decs = {name: paper_terms(steps[name], lr, g, u) for name in ("sgd", "adam") if name in steps}
        for name in GEOMETRIES:
            out |= _decomp_record(name, decs.get(name), steps.get(name), lr, metric.get(name))
        out["diag/adam_t"] = _adam_t(optim)
        if "adam" in steps:  # the model step is η·P·g; Adam's next step weighs the new gradient by this
            out["diag/adam/momentum_weight"] = (1 - optim.betas[0]) / (1 - optim.betas[0] ** out["diag/adam_t"])
        real = None
        if "adam_step" in steps:  # the real step, clip and v̂(λ) included: the fifth geometry
            real = adam_real_taylor(J_terms, params, g, u, optim, mtp_grad_sq, settings.hvp_method, sums)
        out |= taylor_record(real) | {"diag/mtp_grad_sq": mtp_grad_sq, "diag/clip_scope": optim.clip_scope,
                                      "diag/control": _control(spec, out["diag/adam_t"])}
        geometry = "adam" if "adam" in decs else "sgd"
        dec = decs[geometry]
        precond = optim.preconditioner(params) if geometry == "adam" else None
        out["diag/curve/geometry"] = geometry
        out |= proxy_record(rule, {"fisher": fisher_proxy(b.advantages, dec.dlogp, mask, lr, sums)
                                   if dec.dlogp is not None else NAN})
    # the curves and the Taylor residual only evaluate J: the fused attention kernels serve (float32)
    evaluation_numerics = exact_float64 if dtype == torch.float64 else contextlib.nullcontext
    real_curves = settings.curve_points > 0 and settings.curve_real_step and real is not None
    with evaluation_numerics(work):
        if settings.curve_points > 0:
            out |= measure_curve(J, M, seq_terms, params, g, u, dec, precond, lam_used, mask, settings, hb,
                                 work, spec, sums, gather)
    if real_curves:  # the exact split of β_real differentiates J twice: the curvature numerics again
        with curvature_numerics(work):
            out |= real_step_curves(J, J_terms, params, g, u, mtp_grad_sq, steps, real, step_dirs, lam_used,
                                    settings, optim, sums)
    with evaluation_numerics(work):
        if realised is not None and optim.kind in ("adam", "adamw"):
            out |= realised_step(J, params, g, u, realised, coef.value, optim, mtp_grad_sq, sums)
        if settings.taylor_halvings > 0 and not dec.u_zero:
            out |= taylor_residuals(J, M, params, g, u, dec, precond, lam_used, settings, sums)
    return Probe(out, g, u)
