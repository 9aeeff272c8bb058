"""Small statistics the claims and figures share: rank correlation, log-log slopes, spreads."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

EXACT_PERMUTATION_MAX_N = 8
"""Up to this many points the Spearman p-value is exact (all n! pairings); above, scipy's t approximation."""


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman ρ and its two-sided p-value (exact by permutation for n ≤ 8). NaN for n < 3 or constant input."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    rho = float(np.corrcoef(rx, ry)[0, 1])
    if n > EXACT_PERMUTATION_MAX_N:
        return rho, float(stats.spearmanr(x, y).pvalue)
    perms = np.array(list(itertools.permutations(ry)))  # (n!, n)
    rc = rx - rx.mean()
    pc = perms - perms.mean(1, keepdims=True)
    null = (pc @ rc) / np.sqrt((pc**2).sum(1) * (rc**2).sum())
    return rho, float(np.mean(np.abs(null) >= abs(rho) - 1e-12))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def loglog_slope(xs: Sequence[Sequence[float]], ys: Sequence[Sequence[float]]) -> float:
    """Common slope of log y on log x over several series, each with its own intercept (fixed effects).

    Non-positive points are dropped; series left with fewer than 2 points are ignored."""
    dx, dy = [], []
    for x, y in zip(xs, ys):
        x, y = np.asarray(x, float), np.asarray(y, float)
        ok = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
        if ok.sum() < 2:
            continue
        lx, ly = np.log(x[ok]), np.log(y[ok])
        dx.append(lx - lx.mean())
        dy.append(ly - ly.mean())
    if not dx:
        return math.nan
    dx, dy = np.concatenate(dx), np.concatenate(dy)
    den = float(dx @ dx)
    return float(dx @ dy) / den if den > 0 else math.nan


def spread(df: pd.DataFrame, x: str, y: str, by: str = "run") -> pd.DataFrame:
    """Per value of ``x``: mean, min, max, sd and count of ``y`` over the groups ``by`` (finite values)."""
    d = df[[x, by]].assign(_y=pd.to_numeric(df[y], errors="coerce"))
    d = d[np.isfinite(d["_y"])]
    g = d.groupby(x)["_y"]
    out = pd.DataFrame({"mean": g.mean(), "min": g.min(), "max": g.max(), "sd": g.std(ddof=1), "n": g.count()})
    return out.reset_index().sort_values(x)
