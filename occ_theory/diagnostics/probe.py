"""One probe: every decomposition quantity at one optimizer step, online or from a saved bundle.

``run_probe`` takes the model *before* the step, the minibatch of the step, the coefficient the
run applied and the optimizer's state, and measures (THEORY.md sections 2, 4, 5):

* the decomposition C, X, Q, λ*, λ*₁, Q_F, κ, ‖Pu‖² in SGD geometry (P = I) and in the
  optimizer's own geometry (Adam: ``P = 1/(sqrt(v̂)+ε)`` from its state, held fixed; absent on
  the first step, when the state is empty);
* every proxy (``reference`` and ``least_squares`` from log-probs, ``fisher`` from the JVP δ);
* the measured curve Δ(λ) on a grid bracketing the predicted λ*, in the run's geometry, with its
  quadratic fit, bootstrap intervals over sequences and L_eff; optionally with the real
  optimizer step and on a held-out batch. The grid is capped where the predicted λ* would make
  the MTP step more than ``grid_cap`` times the RL step (``grid_half_width``): there the expansion
  cannot hold and the curve would only show the clip's saturation;
* the Taylor residual at η, η/2, η/4, … (identity 2 on the live model).

The online trainer and ``occ probe`` both call ``run_probe`` on the same inputs, so their
numbers agree. A bundle (``save_bundle``/``load_bundle``) holds those inputs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..models import exact_float64
from ..rl.batch import Norms, ObjectiveSpec, RLBatch, compute_objectives, forward_logprobs, mtp_mask
from ..theory import (
    Decomposition,
    bootstrap_quadratic,
    decompose_geometries,
    eager_attention,
    effective_smoothness,
    fit_quadratic,
    grad,
    lambda_grid,
    measure_delta,
    proxies,
)
from ..theory.params import sq_norm

NAN = float("nan")
BUNDLE_FILE = "bundle.pt"


@dataclass(frozen=True)
class ProbeSettings:
    dtype: str = "float32"
    hvp_method: str = "rev-rev"
    curve_points: int = 9
    curve_span: float = 3.0
    curve_default: float = 1.0
    curve_real_step: bool = False
    bootstrap: int = 100
    taylor_halvings: int = 3
    grid_cap: float = 10.0
    seed: int = 0

    @classmethod
    def from_diag(cls, diag: Any, seed: int = 0) -> ProbeSettings:
        return cls(dtype=diag.dtype, hvp_method=diag.hvp_method, curve_points=diag.curve_points,
                   curve_span=diag.curve_span, curve_default=diag.curve_default,
                   curve_real_step=diag.curve_real_step, bootstrap=diag.bootstrap,
                   taylor_halvings=diag.taylor_halvings, grid_cap=diag.grid_cap, seed=seed)


@dataclass
class OptimizerSnapshot:
    """What the diagnostics need of an Adam/AdamW optimizer, keyed by shared-parameter name."""

    kind: str  # "adamw" | "adam" | "sgd"
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    state: dict[str, dict[str, Tensor]]  # name -> {"step", "exp_avg", "exp_avg_sq"}
    grad_clip: float = 0.0

    @classmethod
    def capture(cls, optimizer: torch.optim.Optimizer, named: dict[str, nn.Parameter], grad_clip: float = 0.0
                ) -> OptimizerSnapshot:
        group = optimizer.param_groups[0]
        kind = {"AdamW": "adamw", "Adam": "adam"}.get(type(optimizer).__name__, "sgd")
        state = {}
        for name, p in named.items():
            st = optimizer.state.get(p, {})
            if "exp_avg_sq" in st:
                state[name] = {k: (v.detach().clone() if isinstance(v, Tensor) else torch.tensor(v))
                               for k, v in st.items()}
        return cls(kind, float(group["lr"]), tuple(group.get("betas", (0.9, 0.999))), float(group.get("eps", 1e-8)),
                   float(group.get("weight_decay", 0.0)), state, grad_clip)

    def preconditioner(self, params: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """Adam's diagonal ``1/(sqrt(v̂)+ε)`` per shared parameter; None when any state is missing."""
        if self.kind == "sgd":
            return None
        return adam_preconditioner(self.state, params, self.betas[1], self.eps)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OptimizerSnapshot:
        d = dict(d)
        d["betas"] = tuple(d["betas"])
        return cls(**d)


def adam_preconditioner(state: dict[str, dict[str, Any]], params: dict[str, Tensor], beta2: float, eps: float
                        ) -> dict[str, Tensor] | None:
    """``P = 1/(sqrt(v̂)+ε)`` with ``v̂ = v/(1 − β2^t)`` from Adam state keyed like ``params``; None when a
    parameter has no state yet (before the first step)."""
    if any(name not in state or "exp_avg_sq" not in state[name] for name in params):
        return None
    out = {}
    for name, p in params.items():
        st = state[name]
        v_hat = st["exp_avg_sq"].to(p.dtype) / (1 - beta2 ** float(st["step"]))
        out[name] = 1.0 / (v_hat.sqrt() + eps)
    return out


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def _decomp_record(prefix: str, dec: Decomposition | None) -> dict[str, Any]:
    keys = ("corr", "cross", "curv", "curv_fisher", "lambda_star", "lambda_star_first_order", "lambda_star_fisher",
            "gain_at_optimum", "proj", "u_norm_sq", "pg_norm", "lambda_balance")
    if prefix.endswith("sgd"):  # norms and cosine of g and u themselves (parameter space, P-independent)
        keys += ("g_norm", "u_norm", "cosine")
    if dec is None:
        return {f"{prefix}/{k}": NAN for k in keys} | {f"{prefix}/concave": None, f"{prefix}/reason":
                                                        "no optimizer state yet (first step)"}
    d = dec.as_dict()
    return {f"{prefix}/{k}": d[k] for k in keys} | {f"{prefix}/concave": d["concave"], f"{prefix}/reason": d["reason"]}


def _stat_terms(prefix: str, x: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Sums from which the mean, std and max |x| over valid positions follow (summable over processes)."""
    v = torch.where((mask > 0) & torch.isfinite(x), x, torch.zeros_like(x)).double()
    n = ((mask > 0) & torch.isfinite(x)).double().sum()
    return {f"{prefix}/n": n, f"{prefix}/s1": v.sum(), f"{prefix}/s2": (v * v).sum(),
            f"{prefix}/max_abs": v.abs().max() if v.numel() else v.new_zeros(())}


def _stats(prefix: str, t: dict[str, Tensor]) -> dict[str, float]:
    n, s1, s2 = (float(t[f"{prefix}/{k}"]) for k in ("n", "s1", "s2"))
    if n == 0:
        return {f"{prefix}/mean": NAN, f"{prefix}/std": NAN, f"{prefix}/max_abs": NAN}
    mean = s1 / n
    var = max(s2 - n * mean * mean, 0.0) / (n - 1) if n > 1 else 0.0
    return {f"{prefix}/mean": mean, f"{prefix}/std": math.sqrt(var), f"{prefix}/max_abs": float(t[f"{prefix}/max_abs"])}


def logprob_proxy_terms(logp: Tensor, old_logp: Tensor, mtp_logp: list[Tensor], mask: Tensor, prompt_len: int
                        ) -> dict[str, Tensor]:
    """The sums behind ``reference``, ``least_squares`` (per MTP depth) and the log-ratio statistics."""

    def block(t: Tensor) -> Tensor:  # the response block, padding filled with zeros as the trainer does
        return torch.where(mask > 0, t, torch.zeros_like(t))[:, prompt_len:]

    terms = _stat_terms("stats/l_minus_old", logp - old_logp, mask)
    for k, q in enumerate(mtp_logp, start=1):
        blocks = (block(logp), block(old_logp), block(q))
        if all(bool(torch.isfinite(t).all()) for t in blocks):
            num, den = proxies.reference_terms(*blocks)
        else:  # a non-finite forward: NaN, which the coefficient rule applies as 0 and counts
            num, den = torch.tensor(NAN, dtype=torch.float64), torch.tensor(float(blocks[0].numel()))
        terms |= {f"ref{k}/num": num, f"ref{k}/den": den}
        num, den = proxies.least_squares_terms(logp, old_logp, q, mtp_mask(mask, k))
        terms |= {f"ls{k}/num": num, f"ls{k}/den": den}
    if mtp_logp:
        terms |= _stat_terms("stats/q_minus_old", mtp_logp[0] - old_logp, mask)
    return terms


def logprob_proxies(logp: Tensor, old_logp: Tensor, mtp_logp: list[Tensor], mask: Tensor, base_coef: float,
                    prompt_len: int, reduce: Any = None) -> dict[str, Any]:
    """``reference`` (public code: unmasked mean over the response block) and ``least_squares``,
    summed over MTP depths, plus the statistics of l − l_old and q − l_old. Cheap: every step.
    ``reduce`` sums the terms over processes (the max entries are summed too, so pass a reduce
    that takes the max of keys ending in ``max_abs``)."""
    depths = len(mtp_logp)
    terms = logprob_proxy_terms(logp, old_logp, mtp_logp, mask, prompt_len)
    if reduce is not None:
        terms = reduce(terms)
    out: dict[str, Any] = _stats("stats/l_minus_old", terms)
    if depths == 0:
        return out | {"lambda/reference": NAN, "lambda/least_squares": NAN}
    c = base_coef / depths
    ref = sum(proxies.from_terms(terms[f"ref{k}/num"], terms[f"ref{k}/den"], scale=c) for k in range(1, depths + 1))
    ls = sum(proxies.from_terms(terms[f"ls{k}/num"], terms[f"ls{k}/den"], scale=c, eps=proxies.REFERENCE_EPS)
             for k in range(1, depths + 1))
    return out | _stats("stats/q_minus_old", terms) | {"lambda/reference": ref, "lambda/least_squares": ls}


def shared_params(model: nn.Module) -> dict[str, Tensor]:
    names = set(model.shared_param_names())
    return {k: p.detach() for k, p in model.named_parameters() if k in names}


def run_probe(model: nn.Module, batch: RLBatch, spec: ObjectiveSpec, lam_used: float, base_coef: float,
              optim: OptimizerSnapshot, settings: ProbeSettings, heldout: RLBatch | None = None,
              dist: Any = None) -> dict[str, Any]:
    """Every diagnostic of one step (see the module docstring). Leaves ``model`` unchanged.

    ``dist`` (an ``occ_theory.train.dist.Dist``) makes every quantity the one of the global batch
    when ``batch`` is this process's shard: every process must call it at the same step."""
    dtype = _dtype(settings.dtype)
    work = model if next(model.parameters()).dtype == dtype else copy.deepcopy(model).to(dtype)
    was_training = work.training
    work.eval()
    try:
        return _probe(work, batch, spec, lam_used, base_coef, optim, settings, heldout, dtype, dist)
    finally:
        work.train(was_training)


def _probe(work: nn.Module, batch: RLBatch, spec: ObjectiveSpec, lam_used: float, base_coef: float,
           optim: OptimizerSnapshot, settings: ProbeSettings, heldout: RLBatch | None, dtype: torch.dtype,
           dist: Any = None) -> dict[str, Any]:
    sums = dist.sum if dist is not None and dist.active else None  # sums over processes
    gather = dist.gather_cat if sums is not None else None  # per-sequence terms, concatenated
    b = RLBatch(**{k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.tensors().items()})
    hb = None if heldout is None else RLBatch(**{k: (v.to(dtype) if v.is_floating_point() else v)
                                                   for k, v in heldout.tensors().items()})
    params = shared_params(work)
    mask = b.response_mask
    lr = optim.lr
    out: dict[str, Any] = {"diag/lr": lr, "diag/lambda_used": lam_used, "diag/dtype": settings.dtype,
                           "diag/hvp_method": settings.hvp_method}

    norms = Norms.of(b, work.num_mtp, sums) if sums is not None else None  # global token counts

    def J(p):
        return compute_objectives(work, b, spec, params=p, with_mtp=False, norms=norms).rl

    def M(p):
        return compute_objectives(work, b, spec, params=p, norms=norms).mtp

    def logp_fn(p):
        return forward_logprobs(work, b, spec.temperature, spec.mtp_grad, False, p)[0]

    def seq_terms(p):
        return compute_objectives(work, b, spec, params=p, with_mtp=False).seq_rl

    # float64: also keep RMSNorm and the softmax in float64 (transformers computes them in float32)
    curvature_numerics = exact_float64 if dtype == torch.float64 else eager_attention
    with curvature_numerics(work):
        with torch.no_grad():
            obj = compute_objectives(work, b, spec)
        out |= logprob_proxies(obj.logp, b.old_logp, obj.mtp_logp, mask, base_coef, b.prompt_len,
                               dist.sum_terms if sums is not None else None)
        if spec.mtp_kind is None:
            return out | {"diag/skipped": "regime has no MTP loss"}
        red = sums or (lambda d: d)
        u = red(grad(M, params)[1])
        precond = optim.preconditioner(params)
        geometries = {"sgd": None} | ({"adam": precond} if precond is not None else {})
        decs = decompose_geometries(J, M, params, lr, geometries, settings.hvp_method, logp_fn, mask, mtp_grad=u,
                                    reduce=sums)
        decs.setdefault("adam", None)
        g = decs["sgd"].grad_rl
        for name, dec in decs.items():
            out |= _decomp_record(f"diag/{name}", dec)
        if precond is not None:  # the model step is η·P·g; Adam's next step weighs the new gradient by this
            t = float(next(iter(optim.state.values()))["step"])
            out["diag/adam/momentum_weight"] = (1 - optim.betas[0]) / (1 - optim.betas[0] ** (t + 1))
        geometry = "adam" if decs["adam"] is not None else "sgd"
        dec = decs[geometry]
        out["diag/curve/geometry"] = geometry
        fisher = NAN
        if dec.dlogp is not None:
            num, den = proxies.fisher_terms(b.advantages, dec.dlogp, mask)
            t = red({"num": num, "den": den})
            fisher = proxies.from_terms(t["num"], t["den"], scale=1.0 / lr)
        out["lambda/fisher"] = fisher
    # the curve and the Taylor residual only evaluate J: the fused attention kernels serve (float32)
    evaluation_numerics = exact_float64 if dtype == torch.float64 else contextlib.nullcontext
    run_precond = precond if geometry == "adam" else None
    mtp_only_sq_norm = 0.0  # ‖∇_{θ_M}M‖², for the real step's gradient clipping
    if settings.curve_points > 0 and settings.curve_real_step:
        mtp_names = set(work.mtp_param_names())
        own = {k: p.detach() for k, p in work.named_parameters() if k in mtp_names}
        if own:
            def M_own(p):
                return compute_objectives(work, b, spec, params=p, norms=norms).mtp

            mtp_only_sq_norm = float(sq_norm(red(grad(M_own, own)[1])))
    with evaluation_numerics(work):
        if settings.curve_points > 0:
            out |= _curve(J, M, seq_terms, params, g, u, dec, run_precond, lam_used, mask, settings, optim, hb,
                          work, spec, sums, gather, mtp_only_sq_norm)
        if settings.taylor_halvings > 0 and not dec.u_zero:
            out |= _taylor(J, M, params, g, u, dec, run_precond, lam_used, settings, sums)
    return out


def _taylor(J, M, params, g, u, dec: Decomposition, precond, lam_used: float, settings: ProbeSettings,
            sums=None) -> dict[str, Any]:
    """Identity 2 on the live model: residual max_λ |Δ_measured − Δ_model| as η halves (slope ≈ 3)."""
    scale = max(abs(lam_used), settings.curve_default)  # not λ*: in SGD geometry it can be enormous
    lams = np.array([-scale, scale, 2 * scale])
    lrs, res = [], []
    for k in range(settings.taylor_halvings + 1):
        lr = dec.lr / 2**k
        measured = measure_delta(J, M, params, lr, lams, precond=precond, grads=(g, u), reduce=sums)
        model = replace(dec, lr=lr).predicted_delta(lams)
        lrs.append(lr)
        res.append(float(np.max(np.abs(measured - model))))
    ok = [(a, b) for a, b in zip(lrs, res) if b > 0]
    slope = float(np.polyfit(np.log([a for a, _ in ok]), np.log([b for _, b in ok]), 1)[0]) if len(ok) >= 2 else NAN
    return {"taylor/lrs": lrs, "taylor/residuals": res, "diag/taylor/slope": slope}


def grid_half_width(dec: Decomposition, span: float, cap: float) -> tuple[float | None, bool]:
    """Half-width of the curve's λ grid: ``span``·|λ*| (THEORY.md section 5), but never past the λ at
    which the MTP step is ``cap`` times the RL step (‖λ·Pu‖ = cap·‖Pg‖), where no second-order
    expansion can hold and the clipped surrogate saturates. Without a finite λ* the default range is
    that step-aware ±cap·‖Pg‖/‖Pu‖. Returns (None, False) when no step size is known (the caller
    falls back to ``curve_default``), and whether the cap applied."""
    lam, bal = dec.lambda_star, dec.lambda_balance
    if not math.isfinite(bal) or bal <= 0 or cap <= 0:
        return None, False
    limit = cap * bal
    if not math.isfinite(lam) or lam == 0:
        return limit, True
    return min(span * abs(lam), limit), span * abs(lam) > limit


def _curve(J, M, seq_terms, params, g, u, dec: Decomposition, precond, lam_used: float, mask: Tensor,
           settings: ProbeSettings, optim: OptimizerSnapshot, heldout: RLBatch | None, work: nn.Module,
           spec: ObjectiveSpec, sums=None, gather=None, mtp_only_sq_norm: float = 0.0) -> dict[str, Any]:
    lr = dec.lr
    half, capped = grid_half_width(dec, settings.curve_span, settings.grid_cap)
    lams = lambda_grid(dec.lambda_star, used=lam_used, n=settings.curve_points, span=settings.curve_span,
                       default=settings.curve_default, half_width=half)
    seq = measure_delta(J, M, params, lr, lams, precond=precond, eval_objective=seq_terms, grads=(g, u),
                        reduce=gather)  # (L, B), B over every process
    counts = {"value": mask.sum(1).double()}
    weights = (gather(counts) if gather is not None else counts)["value"].cpu().numpy()
    deltas = seq.sum(1) / max(weights.sum(), 1.0)
    finite = np.isfinite(deltas)
    out: dict[str, Any] = {"curve/lams": lams.tolist(), "curve/deltas": deltas.tolist(),
                           "diag/curve/grid_half_width": float(np.max(np.abs(lams))), "diag/curve/grid_capped": capped,
                           "diag/curve/non_finite_points": int((~finite).sum())}
    none = {"diag/curve/alpha": NAN, "diag/curve/beta": NAN, "diag/curve/r2": NAN, "diag/curve/lambda_star": NAN,
            "diag/curve/concave": False, "diag/curve/l_eff": NAN}
    if np.all(deltas == 0):  # u = 0 (detach): a flat curve, nothing to fit
        return out | none | {"diag/curve/flat": True, "diag/curve/alpha": 0.0, "diag/curve/beta": 0.0}
    if np.unique(lams[finite & (lams != 0)]).size < 2:
        return out | none | {"diag/curve/flat": False, "diag/curve/reason": "too few finite points to fit"}
    lams, deltas, seq = lams[finite], deltas[finite], seq[finite]
    fit = fit_quadratic(lams, deltas)
    out |= {"diag/curve/flat": False, "diag/curve/alpha": fit.alpha, "diag/curve/beta": fit.beta,
            "diag/curve/alpha_se": fit.alpha_se, "diag/curve/beta_se": fit.beta_se, "diag/curve/r2": fit.r2,
            "diag/curve/lambda_star": fit.lambda_star, "diag/curve/concave": fit.concave,
            "diag/curve/l_eff": effective_smoothness(fit.beta, lr, dec.u_norm_sq),
            "diag/curve/pred_alpha": lr * dec.slope, "diag/curve/pred_beta": lr**2 * dec.curv,
            "diag/curve/pred_beta_fisher": lr**2 * dec.curv_fisher}
    if settings.bootstrap > 0:
        ci = bootstrap_quadratic(lams, seq, weights, n_boot=settings.bootstrap, seed=settings.seed)
        for k, (lo, hi) in ci.items():
            if k != "concave_share":
                out[f"diag/curve/{k}_lo"], out[f"diag/curve/{k}_hi"] = lo, hi
        out["diag/curve/bootstrap_concave_share"] = ci["concave_share"][0]
    if settings.curve_real_step and optim.kind in ("adam", "adamw") and optim.state:
        real = real_step_delta(J, params, g, u, lams, optim, sums, mtp_only_sq_norm)
        rfit = fit_quadratic(lams, real)
        out |= {"curve/real_deltas": real.tolist(), "diag/curve_real/alpha": rfit.alpha,
                "diag/curve_real/beta": rfit.beta, "diag/curve_real/r2": rfit.r2,
                "diag/curve_real/lambda_star": rfit.lambda_star}
    if heldout is not None:
        held_norms = Norms.of(heldout, 0, sums) if sums is not None else None

        def J_held(p):
            return compute_objectives(work, heldout, spec, params=p, with_mtp=False, norms=held_norms).rl

        held = measure_delta(J, M, params, lr, lams, precond=precond, eval_objective=J_held, grads=(g, u),
                             reduce=sums)
        hfit = fit_quadratic(lams, held)
        out |= {"curve/heldout_deltas": held.tolist(), "diag/curve_heldout/alpha": hfit.alpha,
                "diag/curve_heldout/beta": hfit.beta, "diag/curve_heldout/r2": hfit.r2,
                "diag/curve_heldout/lambda_star": hfit.lambda_star}
    return out


def real_step_params(params: dict[str, Tensor], g: dict[str, Tensor], u: dict[str, Tensor], lam: float,
                     optim: OptimizerSnapshot, mtp_only_sq_norm: float = 0.0) -> dict[str, Tensor]:
    """θ_S after the real Adam(W) step with gradient −(g + λu), from a copy of the optimizer state.

    The run clips the global norm over every trainable parameter, θ_M included, whose gradient is
    λ·∇_{θ_M}M: ``mtp_only_sq_norm`` = ‖∇_{θ_M}M‖² enters the clip factor as λ²·‖∇_{θ_M}M‖²."""
    cls = torch.optim.AdamW if optim.kind == "adamw" else torch.optim.Adam
    clones = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    opt = cls(list(clones.values()), lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)
    for k, p in clones.items():
        opt.state[p] = {n: v.clone().to(p.dtype) if n != "step" else v.clone() for n, v in optim.state[k].items()}
        p.grad = -(g[k] + lam * u[k]).to(p.dtype)
    if optim.grad_clip > 0:  # torch's clip_grad_norm_ factor, over θ_S and θ_M
        total = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in clones.values())
                          + lam * lam * mtp_only_sq_norm)
        factor = min(1.0, optim.grad_clip / (total + 1e-6))
        for p in clones.values():
            p.grad.mul_(factor)
    opt.step()
    return {k: p.detach() for k, p in clones.items()}


def real_step_delta(J, params: dict[str, Tensor], g: dict[str, Tensor], u: dict[str, Tensor], lams: np.ndarray,
                    optim: OptimizerSnapshot, sums=None, mtp_only_sq_norm: float = 0.0) -> np.ndarray:
    """Δ(λ) = J(real step with λ) − J(real step with 0), every step from the same optimizer state."""

    def after_step(lam: float) -> float:
        with torch.no_grad():
            value = {"value": J(real_step_params(params, g, u, lam, optim, mtp_only_sq_norm))}
            return float((sums(value) if sums is not None else value)["value"])

    base = after_step(0.0)
    return np.array([after_step(float(lam)) - base for lam in lams])


# ---------------------------------------------------------------- bundles


def save_bundle(path: Path, *, step: int, model: nn.Module, batch: RLBatch, spec: ObjectiveSpec, lam_used: float,
                base_coef: float, optim: OptimizerSnapshot, settings: ProbeSettings,
                heldout: RLBatch | None = None, online: dict[str, Any] | None = None,
                extra: dict[str, Any] | None = None) -> None:
    """Everything ``run_probe`` needs for this step, written atomically to ``path/``."""
    from ..atomic import atomic_dir

    payload = {
        "format": "occ_theory.probe", "version": 1, "step": step,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "batch": {k: v.cpu() for k, v in batch.tensors().items()},
        "heldout": None if heldout is None else {k: v.cpu() for k, v in heldout.tensors().items()},
        "spec": asdict(spec), "lam_used": float(lam_used), "base_coef": float(base_coef),
        "optim": optim.to_dict(), "settings": asdict(settings), "extra": dict(extra or {}),
    }
    with atomic_dir(Path(path)) as tmp:
        torch.save(payload, tmp / BUNDLE_FILE)
        if online is not None:
            (tmp / "online.json").write_text(json.dumps(_jsonable(online), indent=1, allow_nan=True))


def load_bundle(path: Path) -> dict[str, Any]:
    """Read a probe bundle; a missing or corrupt one raises ``ValueError`` naming the file."""
    f = Path(path) / BUNDLE_FILE
    if not f.is_file():
        raise ValueError(f"probe bundle {path} has no {BUNDLE_FILE}")
    try:
        payload = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError on damage
        raise ValueError(f"probe bundle {f} is corrupt or unreadable: {type(e).__name__}: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != "occ_theory.probe":
        raise ValueError(f"{f} is not an occ_theory probe bundle")
    missing = [k for k in ("step", "model", "batch", "spec", "optim", "settings", "lam_used") if k not in payload]
    if missing:
        raise ValueError(f"probe bundle {f} lacks {missing}")
    return payload


def probe_from_bundle(payload: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Load the bundle's weights into ``model`` (same architecture) and rerun the probe."""
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise ValueError(f"probe bundle weights do not fit the run's model: {e}") from e
    heldout = RLBatch.from_tensors(payload["heldout"]) if payload.get("heldout") else None
    return run_probe(model, RLBatch.from_tensors(payload["batch"]), ObjectiveSpec(**payload["spec"]),
                     payload["lam_used"], payload.get("base_coef", 0.0),
                     OptimizerSnapshot.from_dict(payload["optim"]), ProbeSettings(**payload["settings"]), heldout)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    def conv(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, np.generic):
            return conv(v.item())
        return v
    return {k: ([conv(x) for x in v] if isinstance(v, list) else conv(v)) for k, v in d.items()}
