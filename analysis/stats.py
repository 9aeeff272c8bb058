"""Small statistics the claims and figures share (docs/theory.md section 6, "How a claim is judged").

The unit of replication is the run: every interval or p-value that pools probes of several runs
comes from ``cluster_bootstrap`` (whole runs resampled with replacement). Rank correlations and
their pooled p-values come from scipy. ``noninferiority`` is the paired one-sided t bound used for
"A matches or beats B".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

N_BOOT = 1000
"""Cluster-bootstrap resamples per interval (fixed seed: the report is reproducible)."""
LEVEL = 0.95
"""Confidence level of every interval and one-sided bound."""
POWER = 0.8
"""Power at which the minimum detectable difference of a design is stated."""


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman ρ and scipy's two-sided p-value (``scipy.stats.spearmanr``), treating every point as
    independent. NaN for n < 3 or constant input."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    res = stats.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


def _ranks(a: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), as ``scipy.stats.rankdata``."""
    _, inv, counts = np.unique(a, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2)[inv]


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman ρ alone (Pearson r of average ranks; NaN for n < 3 or constant input): the fast path for
    resampling, equal to ``spearman(x, y)[0]``."""
    return pearson(_ranks(np.asarray(x, float)), _ranks(np.asarray(y, float)))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / den if den > 0 else math.nan


def cluster_bootstrap(stat: Callable[..., float], arrays: Sequence[np.ndarray], clusters: Sequence,
                      n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """``stat(*arrays)`` on ``n_boot`` resamples that draw whole clusters (runs) with replacement.

    ``arrays`` are aligned per point; ``clusters`` labels each point's run. Returns the resampled
    statistics (NaN where ``stat`` has no value on a resample)."""
    arrays = [np.asarray(a) for a in arrays]
    codes = pd.factorize(pd.Series(list(clusters)))[0]
    members = [np.flatnonzero(codes == k) for k in range(codes.max() + 1)] if len(codes) else []
    if not members:
        return np.full(n_boot, np.nan)
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])
        out[b] = stat(*(a[idx] for a in arrays))
    return out


def interval(boot: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Two-sided percentile interval of bootstrap statistics (NaN when none is finite)."""
    b = boot[np.isfinite(boot)]
    if not len(b):
        return math.nan, math.nan
    tail = 100 * (1 - level) / 2
    return float(np.percentile(b, tail)), float(np.percentile(b, 100 - tail))


def median_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """Distribution-free interval for the median of independent values: the order statistics
    ``x_(k)`` and ``x_(n+1−k)`` with the largest ``k`` such that P(Binomial(n, ½) < k) ≤ (1 − level)/2
    (coverage ≥ ``level``); NaN when n is too small for any (n < 6 at 95%)."""
    x = np.sort(np.asarray(values, dtype=float)[np.isfinite(np.asarray(values, dtype=float))])
    n = len(x)
    k = int(stats.binom.ppf((1 - level) / 2, n, 0.5)) if n else 0  # smallest k with P(B ≤ k) ≥ tail
    while k > 0 and stats.binom.cdf(k - 1, n, 0.5) > (1 - level) / 2:
        k -= 1
    if k < 1:
        return math.nan, math.nan
    return float(x[k - 1]), float(x[n - k])


def p_two_sided(boot: np.ndarray, null: float = 0.0) -> float:
    """Percentile-bootstrap two-sided p-value of ``statistic = null``: twice the smaller share of
    resamples on either side of it, each counted as (k + 1)/(B + 1) so that B resamples never claim
    p < 2/(B + 1) (a NaN resample counts on both sides)."""
    if not len(boot):
        return math.nan
    nan = ~np.isfinite(boot)
    le, ge = np.sum((boot <= null) | nan), np.sum((boot >= null) | nan)
    return float(min(1.0, 2 * (min(le, ge) + 1) / (len(boot) + 1)))


def clustered_spearman(x: Sequence[float], y: Sequence[float], runs: Sequence, seed: int = 0) -> dict[str, float]:
    """Spearman ρ over pooled points with scipy's pooled p-value (``p_pooled``, as if points were
    independent) and the run-level one (``p``: cluster bootstrap over ``runs``), with its interval."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    rho, p_pooled = spearman(x, y)
    boot = cluster_bootstrap(spearman_rho, [x, y], runs, seed=seed)
    lo, hi = interval(boot)
    return {"spearman": rho, "p_pooled": p_pooled, "p": p_two_sided(boot) if math.isfinite(rho) else math.nan,
            "spearman_lo": lo, "spearman_hi": hi, "runs": int(pd.Series(list(runs)).nunique())}


def share_interval(flags: Sequence[bool], runs: Sequence, seed: int = 0) -> dict[str, float]:
    """Share of True ``flags`` with its run-clustered interval (``share_lo``, ``share_hi``)."""
    f = np.asarray(flags, float)
    lo, hi = interval(cluster_bootstrap(lambda a: float(a.mean()) if len(a) else math.nan, [f], runs, seed=seed))
    return {"share": float(f.mean()) if len(f) else math.nan, "share_lo": lo, "share_hi": hi}


def noninferiority(diff: Sequence[float], margin: float, level: float = LEVEL, power: float = POWER
                   ) -> dict[str, float]:
    """Paired one-sided t bound of a mean difference ``A − B`` (one value per seed).

    ``lower``/``upper``: one-sided ``level`` bounds ``mean ∓ t_{level, n−1}·SE``; ``mdd``: the
    smallest true difference this design (n seeds, this spread) detects with ``power``:
    ``(t_{level, n−1} + t_{power, n−1})·SE``. ``margin`` is carried through for the record."""
    d = np.asarray(diff, float)
    n = len(d)
    if n < 2:
        return {"n": n, "diff": float(d.mean()) if n else math.nan, "se": math.nan, "df": n - 1,
                "lower": math.nan, "upper": math.nan, "mdd": math.nan, "margin": margin}
    se = float(d.std(ddof=1) / math.sqrt(n))
    t = float(stats.t.ppf(level, n - 1))
    mean = float(d.mean())
    return {"n": n, "diff": mean, "se": se, "df": n - 1, "lower": mean - t * se, "upper": mean + t * se,
            "mdd": (t + float(stats.t.ppf(power, n - 1))) * se, "margin": margin}


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


def impute_discordant(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` with every NaN replaced where it hurts a positive rank correlation most (it is the worst case on the
    side of support, which is where claim 5 uses it): a point missing y gets a y below
    every finite y when its x lies above the median of x (above every y otherwise), in the order that disagrees
    with x; a point missing x the same way round; a point missing both an x below every x and a y above every y.
    The worst case of a missing point's rank, so that a pattern of NaNs cannot make a correlation look stronger."""
    x, y = np.asarray(x, float).copy(), np.asarray(y, float).copy()
    fx, fy = np.isfinite(x), np.isfinite(y)
    if not (fx & fy).any():
        return x, y
    for a, b, fa, fb in ((x, y, fx, fy), (y, x, fy, fx)):  # fill b where only a is known
        lo, hi, mid = np.min(b[fb]), np.max(b[fb]), np.median(a[fa])
        only = np.flatnonzero(fa & ~fb)
        order = only[np.argsort(a[only], kind="stable")]  # ascending a
        for rank, i in enumerate(order):
            b[i] = lo - 1 - rank if a[i] > mid else hi + 1 + (len(order) - rank)
    neither = np.flatnonzero(~fx & ~fy)
    for j, i in enumerate(neither):
        x[i] = np.min(x[np.isfinite(x)]) - 1 - j
        y[i] = np.max(y[np.isfinite(y)]) + 1 + j
    return x, y
