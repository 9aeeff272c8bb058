"""One probe: every decomposition quantity at one optimizer step, online or from a saved bundle.

``run_probe`` takes the model *before* the step, the minibatch of the step, the coefficient the
run applied and the optimizer's state, and measures (THEORY.md sections 2, 4, 5):

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
import math
from dataclasses import asdict, dataclass
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
    mtp_mask,
)
from ..theory import (
    Decomposition,
    decompose_geometries,
    eager_attention,
    grad,
    proxies,
)
from ..theory.params import sq_norm
from .curve import measure_curve, taylor_residuals

NAN = float("nan")


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
    grid_cap: float = 0.0
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
            out |= measure_curve(J, M, seq_terms, params, g, u, dec, run_precond, lam_used, mask, settings, optim, hb,
                          work, spec, sums, gather, mtp_only_sq_norm)
        if settings.taylor_halvings > 0 and not dec.u_zero:
            out |= taylor_residuals(J, M, params, g, u, dec, run_precond, lam_used, settings, sums)
    return out


