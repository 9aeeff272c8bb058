"""Claim 1, judged on the optimizer's real step (docs/theory.md sections 2 and 5), split in two.

* 1a, local: on the local grid (|λ| ≤ λ_bal) the real-step Δ(λ) is quadratic (R² ≥ ``LOCAL_R2``)
  and the model's β_m has the sign of the real curve's β, in the best geometry (each reported,
  and the run's own ``adam_step``).
* 1b, wide: on the wide grid the real curve has an interior maximum, and the best geometry's λ*_m
  lies within a factor ``LOCATION_FACTOR`` of the real curve's λ*_fit.

Probe columns read (``diag/G/…`` per geometry G of ``frames.GEOMETRIES``): ``diag/G/beta_model``,
``diag/G/alpha_rel_err``, ``diag/G/beta_rel_err``, ``diag/G/lambda_star_ratio``;
``diag/curve_real_local/{alpha,beta,r2,lambda_star_inside,beta_vhat_frozen,beta_noclip}``,
``diag/curve_real_wide/{concave,lambda_star_inside,interior_max}``. A missing column makes the claim
inconclusive, naming it. Rows where a geometry has no value (step 1: no Adam state) are left out of
that geometry's numbers, never filled from another geometry.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from .frames import GEOMETRIES, REAL_LOCAL, REAL_WIDE, RUN_GEOMETRY_ORDER, geo_key, numeric
from .verdict import INCONCLUSIVE, NOT_SUPPORTED, Verdict, combine, inconclusive, judge_share

LOCAL_R2 = 0.9
"""1a: the local real-step curve counts as quadratic at R² ≥ 0.9."""
LOCATION_FACTOR = 2.0
"""1b: the model locates the maximum when |log(λ*_m / λ*_fit)| ≤ log 2."""
CLAIM_LOCAL = "1a. locally, the real-step Δ(λ) is quadratic and the model's β has its sign"
CLAIM_WIDE = "1b. the real-step Δ(λ) has an interior maximum, and the model locates it within a factor of 2"

THRESHOLDS = {
    "1a": f"quadratic = R² ≥ {LOCAL_R2} on the local real-step fit; β sign of the best geometry's model = the real "
          "curve's; each share judged by the share rule",
    "1b": f"interior maximum on the wide grid (concave, λ*_fit inside it); best geometry's |log(λ*_m/λ*_fit)| ≤ "
          f"log {LOCATION_FACTOR:g}; each share judged by the share rule",
}


def flag(df: pd.DataFrame, col: str) -> pd.Series:
    """A boolean column as 1.0 / 0.0, NaN where missing or null (parquet keeps None in object columns)."""
    if col not in df:
        return pd.Series(np.nan, index=df.index, dtype=float)
    return df[col].map(lambda v: np.nan if v is None or (isinstance(v, float) and math.isnan(v)) else float(bool(v)))


def _missing(df: pd.DataFrame, cols: list[str]) -> list[str]:
    return [c for c in cols if c not in df]


def _best(shares: dict[str, dict[str, Any]], key: str) -> str | None:
    """The geometry with the highest ``key`` share (ties: the run's own geometry first)."""
    order = [*RUN_GEOMETRY_ORDER, *(g for g in GEOMETRIES if g not in RUN_GEOMETRY_ORDER)]
    have = [g for g in order if g in shares and math.isfinite(shares[g].get(key, math.nan))]
    return max(have, key=lambda g: shares[g][key]) if have else None


def geometry_errors(probes: pd.DataFrame) -> dict[str, Any]:
    """Per geometry: the median relative error of α_m and β_m against the local real-step fit, over the
    probes where that geometry has a value; and the share of probes whose λ*_fit lies inside its grid."""
    out: dict[str, Any] = {}
    for g in GEOMETRIES:
        for k in ("alpha_rel_err", "beta_rel_err"):
            v = numeric(probes, geo_key(g, k)).abs().dropna()
            if len(v):
                out[f"{g}/median_{k}"] = float(v.median())
    for name, prefix in (("local", REAL_LOCAL), ("wide", REAL_WIDE)):
        inside = flag(probes, prefix + "lambda_star_inside").dropna()
        if len(inside):
            out[f"{name}/lambda_star_inside_share"] = float(inside.mean())
    return out


def _median_rel(a: pd.Series, b: pd.Series) -> float:
    r = ((a - b).abs() / b.abs()).replace([np.inf, -np.inf], np.nan).dropna()
    return float(r.median()) if len(r) else math.nan


def local_quadratic(probes: pd.DataFrame) -> Verdict:
    """Claim 1a (see the module docstring). Also reported: the v̂(λ) and clip effects, as the median
    relative change of β when v̂ is frozen (``beta_vhat_frozen``) and without the clip (``beta_noclip``)."""
    need = [REAL_LOCAL + k for k in ("alpha", "beta", "r2")]
    if missing := _missing(probes, need):
        return inconclusive("1a", CLAIM_LOCAL, f"no real-step local curve: the probes lack {missing}")
    a, b, r2 = (numeric(probes, c) for c in need)
    ok = np.isfinite(b) & np.isfinite(r2) & ~((a == 0) & (b == 0))  # a flat curve (detach) has nothing to fit
    d = probes[ok]
    quad_verdict, nums = judge_share(r2[ok] >= LOCAL_R2, d["run"], "quadratic")
    nums |= {"curves": int(ok.sum()), "median_r2": float(r2[ok].median()) if ok.any() else math.nan,
             "vhat_effect_median_rel": _median_rel(numeric(d, REAL_LOCAL + "beta_vhat_frozen"), b[ok]),
             "clip_effect_median_rel": _median_rel(numeric(d, REAL_LOCAL + "beta_noclip"), b[ok])}
    shares: dict[str, dict[str, Any]] = {}
    for g in GEOMETRIES:
        bm = numeric(d, geo_key(g, "beta_model"))
        has = np.isfinite(bm)
        if has.any():
            v, s = judge_share(np.sign(bm[has]) == np.sign(b[ok][has]), d.loc[has, "run"], "sign")
            shares[g] = s | {"verdict": v}
            nums |= {f"{g}/beta_sign_agreement": s["sign_share"], f"{g}/beta_sign_points": s["sign_points"]}
    nums |= geometry_errors(d)
    best = _best(shares, "sign_share")
    if best is None:
        return Verdict("1a", CLAIM_LOCAL, NOT_SUPPORTED if quad_verdict == NOT_SUPPORTED else INCONCLUSIVE, nums,
                       "no geometry's β_m logged beside the real-step curve")
    nums |= {"best_geometry": best} | {f"best/{k}": v for k, v in shares[best].items() if k != "verdict"}
    verdict = combine([quad_verdict, shares[best]["verdict"]])
    detail = (f"{nums['quadratic_share']:.0%} of {nums['quadratic_points']} local real-step curves have R² ≥ "
              f"{LOCAL_R2} (run-clustered 95% interval {nums['quadratic_share_lo']:.0%}–{nums['quadratic_share_hi']:.0%}); "
              f"β_m has the real curve's sign in {shares[best]['sign_share']:.0%} of probes in the best geometry ({best})")
    if "adam_step" in shares and best != "adam_step":
        detail += f", {shares['adam_step']['sign_share']:.0%} in the run's own adam_step"
    return Verdict("1a", CLAIM_LOCAL, verdict, nums, detail)


def wide_interior_maximum(probes: pd.DataFrame) -> Verdict:
    """Claim 1b (see the module docstring): an interior maximum is ``interior_max`` where logged, else
    concave with λ*_fit inside the grid; the model's location is ``diag/G/lambda_star_ratio`` = λ*_m/λ*_fit,
    and a NaN or non-positive ratio (no concave model, or the opposite sign) is a miss."""
    if missing := _missing(probes, [REAL_WIDE + "r2"]):
        return inconclusive("1b", CLAIM_WIDE, f"no real-step wide curve: the probes lack {missing}")
    fitted = np.isfinite(numeric(probes, REAL_WIDE + "r2"))
    interior = flag(probes, REAL_WIDE + "interior_max")
    if not np.isfinite(interior).any():
        interior = flag(probes, REAL_WIDE + "concave") * flag(probes, REAL_WIDE + "lambda_star_inside")
    ok = fitted & np.isfinite(interior)
    d = probes[ok]
    has_max = interior[ok] == 1
    interior_verdict, nums = judge_share(has_max, d["run"], "interior_max")
    shares: dict[str, dict[str, Any]] = {}
    peaks = d[has_max]
    for g in GEOMETRIES:
        present = np.isfinite(numeric(peaks, geo_key(g, "beta_model")))
        if not present.any():
            continue
        ratio = numeric(peaks, geo_key(g, "lambda_star_ratio"))[present]
        within = (ratio > 0) & (np.log(ratio.where(ratio > 0)).abs() <= math.log(LOCATION_FACTOR))
        v, s = judge_share(within, peaks.loc[present, "run"], "located")
        shares[g] = s | {"verdict": v}
        logr = np.log(ratio[ratio > 0])
        nums |= {f"{g}/located_share": s["located_share"], f"{g}/located_points": s["located_points"],
                 f"{g}/median_log_ratio": float(logr.median()) if len(logr) else math.nan}
    best = _best(shares, "located_share")
    if best is None:
        return Verdict("1b", CLAIM_WIDE, NOT_SUPPORTED if interior_verdict == NOT_SUPPORTED else INCONCLUSIVE, nums,
                       f"{nums['interior_max_share']:.0%} of {nums['interior_max_points']} wide real-step curves have "
                       "an interior maximum; no geometry's λ*_m logged where they do")
    nums |= {"best_geometry": best} | {f"best/{k}": v for k, v in shares[best].items() if k != "verdict"}
    verdict = combine([interior_verdict, shares[best]["verdict"]])
    detail = (f"{nums['interior_max_share']:.0%} of {nums['interior_max_points']} wide real-step curves have an "
              f"interior maximum; where they do, the best geometry ({best}) puts λ*_m within a factor "
              f"{LOCATION_FACTOR:g} of λ*_fit in {shares[best]['located_share']:.0%}")
    return Verdict("1b", CLAIM_WIDE, verdict, nums, detail)
