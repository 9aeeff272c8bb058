"""The step AdamW really takes, at one probe (docs/theory.md sections 2 and 5).

* ``adam_real_taylor``: the fifth geometry, ``adam_real``: the exact Taylor coefficients α, β of
  λ ↦ J(θ⁺(λ)) for the real, clipped AdamW step (``theory.step.real_step_taylor``), its λ*, and λ* clamped
  to the clip interval where the clip is off at λ = 0 [``diag/adam_real/…``].
* ``real_step_curves`` (``diag.curve_real_step``), the ground truth:

  - Δ(λ) under the optimizer's own step replayed from a copy of its state (``real_step_params``: torch's
    AdamW after ``clip_grad_norm_`` in the run's clip scope) on the local grid |λ| ≤ λ_bal, where the quadratic
    fit is a local descriptor (claim 1a);
  - the real optimum [``diag/real_optimum/…``]: the maximum of the real Δ on a fine log grid (both signs, from
    1e-3·λ_bal to past every geometry's |λ*|, with 0, the λ used and both clip boundaries), refined in its
    bracketing cell; the same for the step without the clip [``diag/real_optimum_noclip/…``], the counterfactual
    at the same state;
  - every geometry's λ* against it: the real Δ at λ* (what following that model would have gained or cost) and
    λ*/λ_opt [``diag/<G>/delta_at_lambda_star``, ``…/optimum_ratio``, and ``…_noclip``]; and the real Δ at the λ
    the run used [``diag/real_optimum/delta_at_used``];
  - the real local curvature split exactly [``diag/real_beta/…``]: β_real = clip + v̂(λ) + rest, with
    clip = β_real − β_noclip, v̂ = β_noclip − β_frozen and rest = β_frozen = aᵀH a at θ + s (``adam_step``'s
    direction, v̂ frozen, no clip), each from ``curve_taylor``.

Detach (u = 0 on θ_S) is the clip-coupling control: its real curve moves only through the clip factor, which
θ_M's gradient λ·∇_{θ_M}M enters under the global scope.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..theory import fit_quadratic, lambda_grid
from ..theory.fit import locate_maximum, optimum_grid
from ..theory.step import (
    RealStep,
    RealStepTaylor,
    StepDecomposition,
    adamw_state_buffers,
    clip_active,
    curve_taylor,
)

NAN = float("nan")
TAYLOR_KEYS = ("alpha", "beta", "lambda_star", "lambda_star_clamped", "clip_active", "clip_factor", "lambda_bal",
               "lambda_clip_lo", "lambda_clip_hi")
"""``diag/adam_real/<key>``."""


def real_step(params: dict[str, Tensor], g: dict[str, Tensor], u: dict[str, Tensor], optim: Any,
              mtp_grad_sq: float, clip: bool = True) -> RealStep:
    """The run's next AdamW step as a function of λ, from the optimizer snapshot (its clip and clip scope)."""
    wd = optim.weight_decay if optim.kind == "adamw" else 0.0
    return RealStep(params, g, u, *adamw_state_buffers(params, optim.state), optim.lr, optim.betas, optim.eps, wd,
                    optim.grad_clip if clip else 0.0, mtp_grad_sq, optim.clip_scope)


def _taylor(rs: RealStep, J_terms: list, method: str, sums: Any, extra: list | None = None
            ) -> tuple[RealStepTaylor, dict[str, Tensor], list[tuple[float, float]]]:
    """``rs``'s Taylor coefficients at θ⁺(0), with ``extra`` curves (d1, d2) through the same point on one graph."""
    theta0, d1, d2 = rs.derivatives()
    res = curve_taylor(J_terms, theta0, [(d1, d2), *(extra or [])], method, sums)
    (alpha, beta), rest = res[0], res[1:]
    f0 = float(rs.clip_factor(0.0))
    step_norm = math.sqrt(sum(float(((theta0[k] - p).double() ** 2).sum()) for k, p in rs.params.items()))
    slope = math.sqrt(sum(float((t.double() ** 2).sum()) for t in d1.values()))
    tay = RealStepTaylor(alpha, beta, f0 < 1.0, rs.lambda_clip, f0, step_norm, slope, rs.clip_scope)
    return tay, theta0, rest


def adam_real_taylor(J_terms: list, params: dict[str, Tensor], g: dict[str, Tensor], u: dict[str, Tensor],
                     optim: Any, mtp_grad_sq: float, method: str, sums: Any = None, lam_used: float = NAN
                     ) -> tuple[RealStepTaylor, float]:
    """The ``adam_real`` geometry at this state (one gradient and one HVP of J at θ⁺(0)), and the clip factor at the
    λ the run used, f(λ_used): where it differs from f(0) the MTP coefficient moved the step through the clip."""
    rs = real_step(params, g, u, optim, mtp_grad_sq)
    f_used = float(rs.clip_factor(lam_used)) if math.isfinite(lam_used) else NAN
    return _taylor(rs, J_terms, method, sums)[0], f_used


def taylor_record(tay: RealStepTaylor | None, prefix: str = "diag/adam_real") -> dict[str, Any]:
    if tay is None:
        return {f"{prefix}/{k}": NAN for k in TAYLOR_KEYS}
    d = tay.as_dict()
    return {f"{prefix}/{k}": d[k] for k in TAYLOR_KEYS}


def real_step_params(params: dict[str, Tensor], g: dict[str, Tensor], u: dict[str, Tensor], lam: float,
                     optim: Any, mtp_grad_sq: float = 0.0, clip: bool = True) -> dict[str, Tensor]:
    """θ_S after the optimizer's own step with gradient −(g + λu), replayed by torch from a copy of its state (a fresh
    state before the first step), after ``clip_grad_norm_`` in the run's clip scope: ``global``, one norm over θ_S
    and θ_M (``mtp_grad_sq``: θ_M's squared gradient norm in this step, λ²·‖∇_{θ_M}M‖² for the loss −J − λM);
    ``shared`` and ``separate``, θ_S's own norm. ``clip=False`` takes the step without the clip."""
    cls = torch.optim.AdamW if optim.kind == "adamw" else torch.optim.Adam
    clones = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    opt = cls(list(clones.values()), lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)
    for k, p in clones.items():
        if k in optim.state:
            opt.state[p] = {n: v.clone().to(p.dtype) if n != "step" else v.clone() for n, v in optim.state[k].items()}
        p.grad = -(g[k] + lam * u[k]).to(p.dtype)
    if clip and optim.grad_clip > 0:  # torch's clip_grad_norm_ factor
        theta_m = mtp_grad_sq if optim.clip_scope == "global" else 0.0
        total = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in clones.values()) + theta_m)
        factor = min(1.0, optim.grad_clip / (total + 1e-6))
        for p in clones.values():
            p.grad.mul_(factor)
    opt.step()
    return {k: p.detach() for k, p in clones.items()}


def _value(J: Callable, point: dict[str, Tensor], sums: Any) -> float:
    with torch.no_grad():
        v = {"value": J(point)}
        return float((sums(v) if sums is not None else v)["value"])


def _rel_err(model: float, measured: float) -> float:
    return abs(model - measured) / abs(measured) if math.isfinite(measured) and measured != 0 else NAN


def _shares(total: float, parts: dict[str, float]) -> dict[str, float]:
    """The signed contributions to β_real and each one's share of their summed magnitudes."""
    mag = sum(abs(v) for v in parts.values())
    out = {"diag/real_beta/total": total} | {f"diag/real_beta/{k}": v for k, v in parts.items()}
    return out | {f"diag/real_beta/{k}_share": (abs(v) / mag if mag > 0 else NAN) for k, v in parts.items()}


def real_step_curves(J: Callable, J_terms: list, params: dict[str, Tensor], g: dict[str, Tensor],
                     u: dict[str, Tensor], mtp_grad_sq: float, geometries: dict[str, StepDecomposition],
                     real: RealStepTaylor, step_dirs: tuple[dict[str, Tensor], dict[str, Tensor]] | None,
                     lam_used: float, settings: Any, optim: Any, sums: Any = None) -> dict[str, Any]:
    """The ground truth of the probe (see the module docstring). ``mtp_grad_sq`` = ‖∇_{θ_M}M‖²; ``real`` the
    ``adam_real`` Taylor coefficients; ``step_dirs`` ``adam_step``'s (s, a)."""
    rs_nc = real_step(params, g, u, optim, mtp_grad_sq, clip=False)
    interval = real.lambda_clip
    out: dict[str, Any] = {"diag/lambda_clip_lo": interval[0], "diag/lambda_clip_hi": interval[1]}

    # the exact split of β_real: the clip-free step's Taylor and aᵀHa (v̂ frozen, no clip) at θ + s
    zero = {k: torch.zeros_like(t) for k, t in params.items()}
    frozen = [(step_dirs[1], zero)] if step_dirs is not None else []
    nc, _, rest = _taylor(rs_nc, J_terms, settings.hvp_method, sums, frozen)
    beta_frozen = rest[0][1] if rest else NAN
    out |= {"diag/adam_real_noclip/alpha": nc.alpha, "diag/adam_real_noclip/beta": nc.beta,
            "diag/adam_real_noclip/lambda_star": nc.lambda_star}
    out |= _shares(real.beta, {"clip": real.beta - nc.beta, "vhat": nc.beta - beta_frozen, "rest": beta_frozen})

    def delta_fn(clip: bool) -> Callable[[float], float]:
        base = _value(J, real_step_params(params, g, u, 0.0, optim, 0.0, clip), sums)
        seen: dict[float, float] = {}

        def delta(lam: float) -> float:  # each λ evaluated once (the local and fine grids share points)
            if lam not in seen:
                point = real_step_params(params, g, u, lam, optim, lam * lam * mtp_grad_sq, clip)
                seen[lam] = _value(J, point, sums) - base
            return seen[lam]
        return delta

    clipped, unclipped = delta_fn(True), delta_fn(False)
    lo, hi = interval

    def free(lam: float) -> float:
        # where the clip acts neither at 0 nor at λ the two steps are the same step: the clipped value serves
        return clipped(lam) if not real.clip_active and lo <= lam <= hi else unclipped(lam)
    own = geometries.get("adam_step")
    bal = next((x for x in (own.lambda_bal if own else NAN, real.lambda_bal, nc.lambda_bal)
                if math.isfinite(x) and x > 0), settings.curve_default)

    # local: the real curve on |λ| ≤ λ_bal (claim 1a), fitted there as a local descriptor; the λ used is a point of
    # its own (never a reason to widen the grid), in the fit only when it lies inside |λ| ≤ λ_bal
    local = lambda_grid(NAN, n=max(settings.curve_points, 3), half_width=bal)
    if math.isfinite(lam_used):
        local = np.unique(np.append(local, float(lam_used)))
    deltas = np.array([clipped(float(x)) for x in local])
    out |= {"curve/real_local_lams": local.tolist(), "curve/real_local_deltas": deltas.tolist(),
            "curve/real_local_clipped": clip_active(local, interval).tolist()}
    inside = np.abs(local) <= bal * (1 + 1e-12)
    out |= _fit_record("diag/curve_real_local", local[inside], deltas[inside]) | {
        "diag/curve_real_local/half_width": bal}
    alpha, beta = out["diag/curve_real_local/alpha"], out["diag/curve_real_local/beta"]

    # every geometry's λ*, for the grid and the judgement (adam_real by its clamped λ*)
    stars = {name: dec.lambda_star for name, dec in geometries.items()}
    stars["adam_real"] = real.lambda_star_clamped
    stars_nc = dict(stars, adam_real=nc.lambda_star)
    models = {name: (dec.alpha_model, dec.beta_model) for name, dec in geometries.items()}
    models["adam_real"] = (real.alpha, real.beta)

    for tag, fn, bounds, points in (("", clipped, interval, stars), ("_noclip", free, (), stars_nc)):
        grid = optimum_grid(bal, [*points.values(), real.lambda_star, nc.lambda_star], lam_used, bounds,
                            per_decade=settings.optimum_per_decade, span=settings.curve_span)
        opt = locate_maximum(fn, grid)
        name = "real" if not tag else "noclip"
        out |= {f"curve/{name}_fine_lams": opt.lams.tolist(), f"curve/{name}_fine_deltas": opt.deltas.tolist(),
                f"diag/real_optimum{tag}/lambda": opt.lam, f"diag/real_optimum{tag}/delta": opt.delta,
                f"diag/real_optimum{tag}/at_edge": opt.at_edge, f"diag/real_optimum{tag}/evaluations": opt.evaluations}
        if not tag:
            out["curve/real_fine_clipped"] = clip_active(opt.lams, interval).tolist()
        known = dict(zip(opt.lams.tolist(), opt.deltas.tolist()))
        out[f"diag/real_optimum{tag}/delta_at_used"] = known.get(float(lam_used), NAN)  # detach: the clip's cost
        for g_name, lam in points.items():
            at = known.get(lam, NAN) if math.isfinite(lam) else NAN
            if math.isfinite(lam) and not math.isfinite(at):
                at = fn(lam)
            out[f"diag/{g_name}/delta_at_lambda_star{tag}"] = at
            out[f"diag/{g_name}/optimum_ratio{tag}"] = (lam / opt.lam if math.isfinite(lam) and opt.lam != 0
                                                        and math.isfinite(opt.lam) else NAN)
    for g_name, (a_m, b_m) in models.items():
        out[f"diag/{g_name}/alpha_rel_err"] = _rel_err(a_m, alpha)
        out[f"diag/{g_name}/beta_rel_err"] = _rel_err(b_m, beta)
    return out


def _fit_record(prefix: str, lams: np.ndarray, deltas: np.ndarray) -> dict[str, Any]:
    """The quadratic through the origin fitted to one curve, and whether its vertex lies inside the grid."""
    ok = np.isfinite(deltas)
    if np.unique(lams[ok & (lams != 0)]).size < 2:
        return {f"{prefix}/{k}": NAN for k in ("alpha", "beta", "r2", "lambda_star")} | {
            f"{prefix}/concave": False, f"{prefix}/lambda_star_inside": False}
    fit = fit_quadratic(lams[ok], deltas[ok])
    inside = bool(fit.concave and lams.min() <= fit.lambda_star <= lams.max())
    return {f"{prefix}/alpha": fit.alpha, f"{prefix}/beta": fit.beta, f"{prefix}/r2": fit.r2,
            f"{prefix}/lambda_star": fit.lambda_star, f"{prefix}/concave": fit.concave,
            f"{prefix}/lambda_star_inside": inside}
