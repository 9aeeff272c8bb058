"""The measured curve Δ(λ) of a probe (THEORY.md section 5) and the Taylor residual (identity 2).

``measure_curve`` evaluates J along the model update on a λ grid (``grid_half_width``), fits the
quadratic, bootstraps it over sequences, and optionally replays the real AdamW step
(``real_step_params``) and scores a held-out batch; ``taylor_residuals`` halves η and watches the
residual of the second-order model fall (slope 3 on log-log axes where the expansion holds).
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

NAN = float("nan")


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


def measure_curve(J, M, seq_terms, params, g, u, dec: Decomposition, precond, lam_used: float, mask: Tensor,
           settings: Any, optim: Any, heldout: RLBatch | None, work: nn.Module,
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
            return compute_objectives(work, heldout, spec, params=p, with_mtp=False, norms=held_norms).rl_objective

        held = measure_delta(J, M, params, lr, lams, precond=precond, eval_objective=J_held, grads=(g, u),
                             reduce=sums)
        hfit = fit_quadratic(lams, held)
        out |= {"curve/heldout_deltas": held.tolist(), "diag/curve_heldout/alpha": hfit.alpha,
                "diag/curve_heldout/beta": hfit.beta, "diag/curve_heldout/r2": hfit.r2,
                "diag/curve_heldout/lambda_star": hfit.lambda_star}
    return out


def real_step_params(params: dict[str, Tensor], g: dict[str, Tensor], u: dict[str, Tensor], lam: float,
                     optim: Any, mtp_only_sq_norm: float = 0.0) -> dict[str, Tensor]:
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
                    optim: Any, sums=None, mtp_only_sq_norm: float = 0.0) -> np.ndarray:
    """Δ(λ) = J(real step with λ) − J(real step with 0), every step from the same optimizer state."""

    def after_step(lam: float) -> float:
        with torch.no_grad():
            value = {"value": J(real_step_params(params, g, u, lam, optim, mtp_only_sq_norm))}
            return float((sums(value) if sums is not None else value)["value"])

    base = after_step(0.0)
    return np.array([after_step(float(lam)) - base for lam in lams])


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
