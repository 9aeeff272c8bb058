"""The measured curve (docs/theory.md section 5): ``Δ(λ) ≈ α·λ + ½·β·λ²`` through the origin, a local descriptor,
and the real optimum (``locate_maximum`` on ``optimum_grid``): the maximum of a measured curve, found, not fitted.

Pure functions over numpy arrays; the figures and the claim verdicts import them directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

NAN = float("nan")


@dataclass(frozen=True)
class QuadFit:
    """Least-squares fit of ``Δ(λ) = α·λ + ½·β·λ²`` (no intercept: Δ(0) = 0 by construction)."""

    alpha: float
    beta: float
    alpha_se: float
    beta_se: float
    r2: float  # 1 − SS_res / SS_tot (centred); NaN for a flat curve
    n: int

    @property
    def concave(self) -> bool:
        return self.beta < 0

    @property
    def reason(self) -> str:
        if self.concave:
            return ""
        return "β = 0: the curve is flat" if self.beta == 0 else "β > 0: the curve is convex, no finite optimum"

    @property
    def lambda_star(self) -> float:
        """λ*_fit = −α / β when β < 0."""
        return -self.alpha / self.beta if self.concave else NAN

    @property
    def gain_at_optimum(self) -> float:
        return self.alpha**2 / (2 * abs(self.beta)) if self.concave else NAN

    def predict(self, lams: Sequence[float] | np.ndarray) -> np.ndarray:
        lam = np.asarray(lams, dtype=np.float64)
        return self.alpha * lam + 0.5 * self.beta * lam**2

    def as_dict(self) -> dict[str, float | bool | str]:
        out = asdict(self)
        out.update(concave=self.concave, reason=self.reason, lambda_star=self.lambda_star)
        return out


def fit_quadratic(lams: Sequence[float] | np.ndarray, deltas: Sequence[float] | np.ndarray) -> QuadFit:
    """Fit ``Δ ≈ α·λ + ½·β·λ²`` by least squares, with standard errors from the residuals."""
    lam = np.asarray(lams, dtype=np.float64).ravel()
    y = np.asarray(deltas, dtype=np.float64).ravel()
    if lam.shape != y.shape:
        raise ValueError(f"lams has {lam.size} entries, deltas has {y.size}")
    if not (np.all(np.isfinite(lam)) and np.all(np.isfinite(y))):
        raise ValueError("lams and deltas must be finite")
    if np.unique(lam[lam != 0]).size < 2:
        raise ValueError("fit_quadratic needs at least two distinct nonzero λ values")
    design = np.stack([lam, 0.5 * lam**2], axis=1)  # (n, 2)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    ss_res = float(resid @ resid)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    dof = lam.size - 2
    if dof > 0:
        cov = ss_res / dof * np.linalg.inv(design.T @ design)
        alpha_se, beta_se = (float(math.sqrt(max(c, 0.0))) for c in np.diag(cov))
    else:
        alpha_se = beta_se = NAN
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else NAN
    return QuadFit(alpha=float(coef[0]), beta=float(coef[1]), alpha_se=alpha_se, beta_se=beta_se, r2=r2,
                   n=int(lam.size))


def effective_smoothness(beta: float, lr: float, pu_norm_sq: float) -> float:
    """L_eff = −β / (η²·‖Pu‖²): the smoothness constant that explains a fitted β."""
    if pu_norm_sq <= 0 or lr <= 0:
        return NAN
    return -beta / (lr**2 * pu_norm_sq)


def lambda_grid(scale: float, used: float | None = None, n: int = 9, span: float = 3.0,
                default: float = 1.0, half_width: float | None = None) -> np.ndarray:
    """A λ grid for the measured curve: 0, negative values, ``used``, ``scale`` and ±span·|scale|.

    ``scale`` is the predicted λ* (or any finite estimate); when it is NaN, infinite or zero the
    grid spans ``±default`` instead. ``half_width`` sets the range directly (a cap chosen by the
    caller). ``n`` points are spread symmetrically (odd ``n`` includes 0); ``used`` (the run's own
    coefficient) and ``scale`` (when inside the range) are added, and the range widens to hold ``used``.
    """
    if n < 3:
        raise ValueError(f"n must be at least 3, got {n}")
    if not (math.isfinite(default) and default > 0):
        raise ValueError(f"default must be finite and positive, got {default}")
    if half_width is not None and not (math.isfinite(half_width) and half_width > 0):
        raise ValueError(f"half_width must be finite and positive, got {half_width}")
    finite_scale = scale is not None and math.isfinite(scale) and scale != 0
    half = half_width if half_width is not None else (span * abs(scale) if finite_scale else default)
    extra = [0.0]
    if finite_scale and abs(scale) <= half:
        extra.append(float(scale))
    if used is not None and math.isfinite(used):
        extra.append(float(used))
        half = max(half, 1.25 * abs(used))
    grid = np.concatenate([np.linspace(-half, half, n), extra])
    return np.unique(grid)


def bootstrap_quadratic(lams: Sequence[float] | np.ndarray, seq_deltas: np.ndarray, weights: np.ndarray,
                        n_boot: int = 200, seed: int = 0, level: float = 0.9) -> dict[str, tuple[float, float]]:
    """Percentile intervals for α, β and λ*_fit, resampling sequences with replacement, and the share of
    resamples whose fit is concave (``concave_share``, given as a degenerate interval): λ*_fit's
    interval is over those only.

    ``seq_deltas[j, s]`` is sequence s's summed token contribution to Δ(λ_j) and ``weights[s]`` its
    token count, so that ``Δ_j = Σ_s seq_deltas[j, s] / Σ_s weights[s]`` (a token-mean objective).
    """
    lam = np.asarray(lams, dtype=np.float64)
    sd = np.asarray(seq_deltas, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if sd.ndim != 2 or sd.shape != (lam.size, w.size):
        raise ValueError(f"seq_deltas must have shape ({lam.size}, {w.size}), got {sd.shape}")
    rng = np.random.default_rng(seed)
    stats = {"alpha": [], "beta": [], "lambda_star": []}
    for _ in range(n_boot):
        idx = rng.integers(0, w.size, w.size)
        total = w[idx].sum()
        if total <= 0:
            continue
        fit = fit_quadratic(lam, sd[:, idx].sum(axis=1) / total)
        stats["alpha"].append(fit.alpha)
        stats["beta"].append(fit.beta)
        stats["lambda_star"].append(fit.lambda_star)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    n_fits = len(stats["beta"])
    share = float(np.mean(np.asarray(stats["beta"]) < 0)) if n_fits else NAN
    out = {"concave_share": (share, share)}  # λ*'s interval covers only these (concave) resamples
    for k, vals in stats.items():
        arr = np.asarray(vals, dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        out[k] = (float(np.percentile(arr, lo)), float(np.percentile(arr, hi))) if arr.size else (NAN, NAN)
    return out


# ---------------------------------------------------------------- the real optimum (docs/theory.md section 5)


@dataclass(frozen=True)
class Optimum:
    """The maximum of a measured curve Δ(λ), found on a grid and refined in its bracketing cell [real_optimum]."""

    lam: float
    delta: float
    at_edge: bool
    """The grid's maximum is at its smallest or largest λ: the real optimum may lie beyond the grid."""
    evaluations: int
    lams: np.ndarray = field(repr=False, compare=False)
    deltas: np.ndarray = field(repr=False, compare=False)


def optimum_grid(scale: float, stars: Sequence[float] = (), used: float | None = None,
                 bounds: Sequence[float] = (), per_decade: int = 6, low: float = 1e-3, span: float = 3.0,
                 max_decades: float = 8.0) -> np.ndarray:
    """The fine grid of section 5: |λ| log-spaced on both signs, ``per_decade`` points a decade, from
    ``low·scale`` to ``span·max(scale, |λ*| of every finite star)`` (at most ``max_decades`` decades above
    ``scale``), plus 0, ``used``, the finite ``bounds`` (the clip interval's ends) and the finite ``stars``
    themselves, so that the curve is known exactly where a model puts its optimum. ``scale``: λ_bal."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale (λ_bal) must be finite and positive, got {scale}")
    if per_decade < 1 or not (0 < low < 1) or span < 1:
        raise ValueError(f"need per_decade >= 1, 0 < low < 1, span >= 1; got {per_decade}, {low}, {span}")
    finite = [abs(float(x)) for x in stars if x is not None and math.isfinite(x) and x != 0]
    top = min(span * max([scale, *finite]), scale * 10.0**max_decades)
    n = max(2, math.ceil(per_decade * math.log10(top / (low * scale))) + 1)
    mags = np.logspace(math.log10(low * scale), math.log10(top), n)
    extra = [0.0, *(float(x) for x in (*stars, *bounds, *([used] if used is not None else []))
                    if x is not None and math.isfinite(x))]
    return np.unique(np.concatenate([-mags, mags, extra]))


def locate_maximum(delta: Callable[[float], float], lams: Sequence[float] | np.ndarray,
                   max_refine: int = 25) -> Optimum:
    """The maximum of ``delta`` over the grid ``lams`` (ties: the smallest |λ|), then refined inside the cell
    between its two neighbours by a bounded scalar search (``scipy.optimize.minimize_scalar``), which is kept only
    where it improves on the grid. Non-finite values are never a maximum; all non-finite gives NaN."""
    from scipy.optimize import minimize_scalar

    lam = np.unique(np.asarray(lams, dtype=np.float64))
    vals = np.array([float(delta(float(x))) for x in lam])
    evals = lam.size
    ok = np.isfinite(vals)
    if not ok.any():
        return Optimum(NAN, NAN, False, evals, lam, vals)
    best = np.nanmax(np.where(ok, vals, -np.inf))
    ties = np.flatnonzero(ok & (vals == best))
    i = int(ties[np.argmin(np.abs(lam[ties]))])
    at_edge = i in (0, lam.size - 1)
    x, y = float(lam[i]), float(vals[i])
    lo, hi = lam[max(i - 1, 0)], lam[min(i + 1, lam.size - 1)]
    if hi > lo and max_refine > 0 and np.unique(vals[ok]).size > 1:
        calls = [0]

        def neg(z: float) -> float:
            calls[0] += 1
            v = float(delta(float(z)))
            return -v if math.isfinite(v) else math.inf

        res = minimize_scalar(neg, bounds=(float(lo), float(hi)), method="bounded",
                              options={"xatol": 1e-3 * (hi - lo), "maxiter": max_refine})
        evals += calls[0]
        if math.isfinite(res.fun) and -res.fun > y:
            x, y = float(res.x), float(-res.fun)
    return Optimum(x, y, at_edge, evals, lam, vals)
