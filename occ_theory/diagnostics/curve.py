"""The measured curve Δ(λ) of a probe (docs/theory.md section 5) and the Taylor residual (identity 2).

``measure_curve`` evaluates J along the model update η·P·(g + λu) on a λ grid (``grid_half_width``),
fits the quadratic, bootstraps it over sequences, and optionally scores a held-out batch;
``real_step_curves`` replays the optimizer's real step (``real_step_params``) on a local and a wide
grid, the ground truth every geometry's prediction is set against; ``taylor_residuals`` halves η and
watches the residual of the second-order model fall (slope 3 on log-log axes where the expansion holds).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..rl.batch import Norms, ObjectiveSpec, RLBatch, compute_objectives
from ..theory import (
    Decomposition,
    bootstrap_quadratic,
    effective_smoothness,
    fit_quadratic,
    lambda_grid,
    measure_delta,
)
from ..theory.params import sq_norm
from ..theory.step import StepDecomposition, clip_active, clip_interval

NAN = float("nan")


def grid_half_width(dec: Decomposition, span: float, cap: float) -> tuple[float | None, bool]:
    """Half-width of the curve's λ grid: ``span``·|λ*| (docs/theory.md section 5), but never past the λ at
    which the MTP step is ``cap`` times the RL step (‖λ·Pu‖ = cap·‖Pg‖), where no second-order
    expansion can hold and the clipped surrogate saturates. Without a finite λ* the default range is
    that step-aware ±cap·‖Pg‖/‖Pu‖. Returns (None, False) when no step size is known (the caller
    falls back to ``curve_default``), and whether the cap applied."""
    lam, bal = dec.lambda_star, dec.lambda_bal
    if not math.isfinite(bal) or bal <= 0 or cap <= 0:
        return None, False
    limit = cap * bal
    if not math.isfinite(lam) or lam == 0:
        return limit, True
    return min(span * abs(lam), limit), span * abs(lam) > limit


def measure_curve(J, M, seq_terms, params, g, u, dec: Decomposition, precond, lam_used: float, mask: Tensor,
                  settings: Any, heldout: RLBatch | None, work: nn.Module,
                  spec: ObjectiveSpec, sums=None, gather=None) -> dict[str, Any]:
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
            "diag/curve/l_eff": effective_smoothness(fit.beta, lr, dec.pu_norm_sq),
            "diag/curve/pred_alpha": lr * dec.slope, "diag/curve/pred_beta": lr**2 * dec.curv,
            "diag/curve/pred_beta_fisher": lr**2 * dec.curv_fisher}
    if settings.bootstrap > 0:
        ci = bootstrap_quadratic(lams, seq, weights, n_boot=settings.bootstrap, seed=settings.seed)
        for k, (lo, hi) in ci.items():
            if k != "concave_share":
                out[f"diag/curve/{k}_lo"], out[f"diag/curve/{k}_hi"] = lo, hi
        out["diag/curve/bootstrap_concave_share"] = ci["concave_share"][0]
    if heldout is not None:
        held_norms = Norms.of(heldout, 0, sums) if sums is not None else None

        def J_held(p):
            return compute_objectives(work, heldout, spec, params=p, with_mtp=False, norms=held_norms).rl_objective

        held = measure_delta(J, M, params, lr, lams, precond=precond, eval_objective=J_held, grads=(g, u),
                             reduce=sums)
        hfit = fit_quadratic(lams, held)
        out |= {"curve/heldout_deltas": held.tolist(), "diag/curve_heldout/alpha": hfit.alpha,
                "diag/curve_heldout/beta": hfit.beta, "diag/curve_heldout/r2": hfit.r2,
                "diag/curve_heldout/lambda_star": hfit.lambda_star}
    return out


def real_step_params(params: dict[str, Tensor], g: dict[str, Tensor], u: dict[str, Tensor], lam: float,
                     optim: Any, mtp_grad_sq: float = 0.0, clip: bool = True) -> dict[str, Tensor]:
    """θ_S after the real Adam(W) step with gradient −(g + λu), from a copy of the optimizer state (a
    fresh state before the first step).

    The run clips the global norm over every trainable parameter, θ_M included: ``mtp_grad_sq`` is the
    squared norm of θ_M's gradient in this step (λ²·‖∇_{θ_M}M‖² for the loss −J − λM). ``clip=False``
    takes the step without the clip."""
    cls = torch.optim.AdamW if optim.kind == "adamw" else torch.optim.Adam
    clones = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    opt = cls(list(clones.values()), lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)
    for k, p in clones.items():
        if k in optim.state:
            opt.state[p] = {n: v.clone().to(p.dtype) if n != "step" else v.clone() for n, v in optim.state[k].items()}
        p.grad = -(g[k] + lam * u[k]).to(p.dtype)
    if clip and optim.grad_clip > 0:  # torch's clip_grad_norm_ factor, over θ_S and θ_M
        total = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in clones.values()) + mtp_grad_sq)
        factor = min(1.0, optim.grad_clip / (total + 1e-6))
        for p in clones.values():
            p.grad.mul_(factor)
    opt.step()
    return {k: p.detach() for k, p in clones.items()}


def _deltas(J, points: Callable[[float], dict[str, Tensor]], lams: np.ndarray, sums=None) -> np.ndarray:
    """Δ(λ) = J(points(λ)) − J(points(0)) on the grid."""

    def value(lam: float) -> float:
        with torch.no_grad():
            v = {"value": J(points(lam))}
            return float((sums(v) if sums is not None else v)["value"])

    base = value(0.0)
    return np.array([value(float(lam)) - base for lam in lams])


def _fit_record(prefix: str, lams: np.ndarray, deltas: np.ndarray) -> dict[str, Any]:
    """The quadratic through the origin fitted to one curve, and whether its optimum lies inside the grid."""
    ok = np.isfinite(deltas)
    if np.unique(lams[ok & (lams != 0)]).size < 2:
        return {f"{prefix}/{k}": NAN for k in ("alpha", "beta", "r2", "lambda_star")} | {
            f"{prefix}/concave": False, f"{prefix}/lambda_star_inside": False}
    fit = fit_quadratic(lams[ok], deltas[ok])
    inside = bool(fit.concave and lams.min() <= fit.lambda_star <= lams.max())
    return {f"{prefix}/alpha": fit.alpha, f"{prefix}/beta": fit.beta, f"{prefix}/r2": fit.r2,
            f"{prefix}/lambda_star": fit.lambda_star, f"{prefix}/concave": fit.concave,
            f"{prefix}/lambda_star_inside": inside}


def _rel_err(model: float, measured: float) -> float:
    return abs(model - measured) / abs(measured) if math.isfinite(measured) and measured != 0 else NAN


def real_step_curves(J, params: dict[str, Tensor], g: dict[str, Tensor], u: dict[str, Tensor],
                     u_mtp_only: dict[str, Tensor], geometries: dict[str, StepDecomposition],
                     step_dirs: tuple[dict[str, Tensor], dict[str, Tensor]], lam_used: float, settings: Any,
                     optim: Any, sums=None) -> dict[str, Any]:
    """The ground truth of docs/theory.md sections 2 and 5: Δ(λ) under the optimizer's real step, on two grids.

    * local: ``|λ| ≤ λ_bal`` of ``adam_step`` (plus 0, negatives and the λ used), where the expansion should
      hold; there also the step without the clip and the ``adam_step`` model's own point θ + s + λ·a (v̂
      frozen at λ = 0, no clip), whose fitted α's and β's set the clip's and v̂(λ)'s effects apart (v̂ moves
      with λ at first order: at the first step AdamW is a sign step and its real slope is about 0);
    * wide: past the predicted |λ*| of ``adam_step`` and the local grid (``curve_span``·max(|λ*|, λ_bal)): does
      the real curve have an interior maximum, and where.

    Grid points where the gradient clip acts are marked (``lambda_clip`` from ``clip_interval``). Each
    geometry's α_m, β_m and λ* are set against the fits: relative errors of α and β on the local fit, and
    λ*_m / λ*_fit of the wide fit."""
    own = geometries["adam_step"]
    u_sq = float(sq_norm(u_mtp_only)) if u_mtp_only else 0.0
    interval = clip_interval(g, {**u, **u_mtp_only}, optim.grad_clip)
    out: dict[str, Any] = {"diag/lambda_clip_lo": interval[0], "diag/lambda_clip_hi": interval[1]}
    bal = own.lambda_bal if math.isfinite(own.lambda_bal) and own.lambda_bal > 0 else settings.curve_default
    n = max(settings.curve_points, 3)
    local = lambda_grid(NAN, used=lam_used, n=n, half_width=bal)
    star = abs(own.lambda_star) if math.isfinite(own.lambda_star) else 0.0  # never narrower than the local grid
    wide = lambda_grid(own.lambda_star, used=lam_used, n=n, half_width=settings.curve_span * max(star, bal))
    s, a = step_dirs
    curves = {
        "real_local": (local, lambda lam: real_step_params(params, g, u, lam, optim, lam * lam * u_sq)),
        "real_wide": (wide, lambda lam: real_step_params(params, g, u, lam, optim, lam * lam * u_sq)),
        "noclip_local": (local, lambda lam: real_step_params(params, g, u, lam, optim, clip=False)),
        "frozen_local": (local, lambda lam: {k: params[k] + s[k] + lam * a[k] for k in params}),
    }
    fits = {}
    for name, (lams, points) in curves.items():
        deltas = _deltas(J, points, lams, sums)
        fits[name] = _fit_record("fit", lams, deltas)
        if name.startswith("real"):
            kind = name.removeprefix("real_")
            out |= {f"curve/{name}_lams": lams.tolist(), f"curve/{name}_deltas": deltas.tolist(),
                    f"curve/{name}_clipped": clip_active(lams, interval).tolist()}
            out |= {k.replace("fit/", f"diag/curve_real_{kind}/"): v for k, v in fits[name].items()}
    for k in ("alpha", "beta"):
        out[f"diag/curve_real_local/{k}_noclip"] = fits["noclip_local"][f"fit/{k}"]
        out[f"diag/curve_real_local/{k}_vhat_frozen"] = fits["frozen_local"][f"fit/{k}"]
    out["diag/curve_real_wide/interior_max"] = out["diag/curve_real_wide/lambda_star_inside"]
    alpha, beta = out["diag/curve_real_local/alpha"], out["diag/curve_real_local/beta"]
    lam_fit = out["diag/curve_real_wide/lambda_star"]
    for name, dec in geometries.items():
        out[f"diag/{name}/alpha_rel_err"] = _rel_err(dec.alpha_model, alpha)
        out[f"diag/{name}/beta_rel_err"] = _rel_err(dec.beta_model, beta)
        out[f"diag/{name}/lambda_star_ratio"] = (dec.lambda_star / lam_fit if math.isfinite(lam_fit) and lam_fit != 0
                                                 else NAN)
    return out


def realised_step(J, params: dict[str, Tensor], g: dict[str, Tensor], u: dict[str, Tensor],
                  weights: tuple[float, float], mtp_coef: float, optim: Any, u_mtp_only: dict[str, Tensor],
                  sums=None) -> dict[str, Any]:
    """A rule's realised update a·g + b·u on θ_S, stepped by the real optimizer, against detach's (g alone)
    and against the plain loss's (g + mtp_coef·u): Δ of J after each step. θ_M's gradient, mtp_coef·∇_{θ_M}M
    (the rule leaves mtp_coef in the loss), enters the clip in every case."""
    a, b = weights
    m_sq = mtp_coef**2 * float(sq_norm(u_mtp_only)) if u_mtp_only else 0.0

    def after(gg: dict[str, Tensor], lam: float) -> float:
        with torch.no_grad():
            v = {"value": J(real_step_params(params, gg, u, lam, optim, m_sq))}
            return float((sums(v) if sums is not None else v)["value"])

    detach = after(g, 0.0)
    return {"diag/realised/weight_g": a, "diag/realised/weight_u": b,
            "diag/realised/delta_vs_detach": after({k: a * t for k, t in g.items()}, b) - detach,
            "diag/realised/delta_plain_vs_detach": after(g, mtp_coef) - detach}


def taylor_residuals(J, M, params, g, u, dec: Decomposition, precond, lam_used: float, settings: Any,
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
