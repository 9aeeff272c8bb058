"""The measured curve Δ(λ) of a probe (docs/theory.md section 5) and the Taylor residual (identity 2).

``measure_curve`` evaluates J along the model update η·P·(g + λu) on a λ grid (``grid_half_width``),
fits the quadratic, bootstraps it over sequences, and optionally scores a held-out batch;
``realised_step`` steps a rule's realised update with the real optimizer (the real-step curves and the real
optimum are in ``realstep.py``); ``taylor_residuals`` halves η and watches the residual of the second-order
model fall (slope 3 on log-log axes where the expansion holds).
"""

from __future__ import annotations

import math
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
from .realstep import real_step_params

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


def realised_step(J, params: dict[str, Tensor], g: dict[str, Tensor], u: dict[str, Tensor],
                  weights: tuple[float, float], mtp_coef: float, optim: Any, mtp_grad_sq: float,
                  sums=None) -> dict[str, Any]:
    """A rule's realised update a·g + b·u on θ_S, stepped by the real optimizer, against detach's (g alone)
    and against the plain loss's (g + mtp_coef·u): Δ of J after each step. θ_M's gradient, mtp_coef·∇_{θ_M}M
    (the rule leaves mtp_coef in the loss), enters the global clip in every case (``mtp_grad_sq`` = ‖∇_{θ_M}M‖²)."""
    a, b = weights
    m_sq = mtp_coef**2 * mtp_grad_sq

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
