"""Claim 1 and the clip coupling, judged on the step the optimizer really takes (docs/theory.md sections 2, 5, 6).

* 1a, local: on the local grid (|λ| ≤ λ_bal) the real-step Δ(λ) is quadratic (R² ≥ ``LOCAL_R2``) and the model of
  the step AdamW takes, ``adam_real`` (named in advance: ``JUDGED_GEOMETRY``), has the real curve's sign of β;
  every other geometry's share is reported with its own verdict.
* 1b, location: ``adam_real``'s λ* (clamped to the clip interval) lands within a factor ``LOCATION_FACTOR`` of the
  real optimum (the maximum of the real Δ found on a fine grid, ``diag/real_optimum/lambda``) and the real Δ at it
  is ≥ 0; every other geometry's share is reported with its own verdict, for the clipped step the run takes and
  for the clip-free step at the same states (``diag/real_optimum_noclip/…``). A real optimum at the edge of its
  grid is a bound, not the optimum: such probes are left out and counted.
* clip: the clip coupling (a finding the paper does not state): under a global clip the MTP modules' gradient
  enters θ_S's clip factor, so even detach's step moves with λ. Supported when, in most of detach's probes, the
  clip factor at the λ it used differs from the factor at λ = 0 (exact: ``diag/adam_real/clip_factor_at_used``
  against ``…/clip_factor``); beside it the real Δ that cost, how often the clip acts at λ = 0, where the real
  optimum lies when it does, the share of training steps it acts, and ``detach/separate`` − ``detach``.

Controls (``frames.control``): detach probes (u = 0 on θ_S: the real curve is the clip alone) and AdamW's first
step (a sign step) are left out of 1a and 1b and counted apart, as are probes without a finite value to judge.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from .frames import (
    ALL_GEOMETRIES,
    REAL_GEOMETRY,
    REAL_LOCAL,
    REAL_OPT,
    REAL_OPT_NOCLIP,
    control,
    geo_key,
    numeric,
)
from .stats import share_interval
from .verdict import INCONCLUSIVE, NOT_SUPPORTED, Verdict, combine, inconclusive, judge_share, not_measured

LOCAL_R2 = 0.9
"""1a: the local real-step curve counts as quadratic at R² ≥ 0.9."""
LOCATION_FACTOR = 2.0
"""1b: a model locates the real optimum when λ*/λ_opt lies in [1/2, 2] (and the real Δ at λ* is ≥ 0)."""
JUDGED_GEOMETRY = "adam_real"
"""The geometry 1a and 1b are judged on, named before the data: the second-order model of the step AdamW takes."""
CLAIM_LOCAL = "1a. locally, the real-step Δ(λ) is quadratic and adam_real's β has its sign"
CLAIM_WIDE = "1b. adam_real's λ* lands within a factor of 2 of the real optimum, where the real Δ is ≥ 0"
CLAIM_CLIP = "clip. a global gradient clip couples the MTP loss to the RL step (detach's step moves with λ)"

THRESHOLDS = {
    "1a": f"quadratic = R² ≥ {LOCAL_R2} on the local real-step fit (|λ| ≤ λ_bal); β sign of adam_real (named in "
          "advance) = the real curve's; both shares by the share rule; every other geometry's share reported with "
          "its own verdict; detach and first-step probes are controls, left out",
    "1b": f"located = λ*/λ_opt in [1/{LOCATION_FACTOR:g}, {LOCATION_FACTOR:g}] and Δ_real(λ*) ≥ 0 (λ_opt: the maximum "
          "of the real Δ on a fine grid, refined; at the grid's edge a bound, left out and counted); a NaN λ* is a "
          "miss; adam_real's clamped λ* (named in advance) by the share rule, every other geometry reported with "
          "its own verdict; the clip-free step reported beside it; controls left out",
    "clip": "detach probes (global clip) where the clip factor at the λ used differs from the factor at λ = 0 "
            "(exact), by the share rule; beside it the real Δ at the λ used, the share of probes with the clip "
            "active at λ = 0 and of training steps with it active",
}


def flag(df: pd.DataFrame, col: str) -> pd.Series:
    """A boolean column as 1.0 / 0.0, NaN where missing or null (parquet keeps None in object columns)."""
    if col not in df:
        return pd.Series(np.nan, index=df.index, dtype=float)
    return df[col].map(lambda v: np.nan if v is None or (isinstance(v, float) and math.isnan(v))
                       else float(bool(v))).astype(float)


def _missing(df: pd.DataFrame, cols: list[str]) -> list[str]:
    return [c for c in cols if c not in df]


def _median(v: pd.Series) -> float:
    v = v.dropna()
    return float(v.median()) if len(v) else math.nan


def controls_record(probes: pd.DataFrame) -> dict[str, Any]:
    kinds = control(probes)
    return {f"controls/{k}": int((kinds == k).sum()) for k in ("detach", "first_step")}


def model_beta(df: pd.DataFrame, geometry: str) -> pd.Series:
    """β of a geometry's second-order model: ``beta_model`` of the affine ones, ``diag/adam_real/beta``."""
    return numeric(df, geo_key(geometry, "beta" if geometry == REAL_GEOMETRY else "beta_model"))


def model_lambda(df: pd.DataFrame, geometry: str, clip: bool = True) -> pd.Series:
    """The λ* a geometry proposes: ``lambda_star`` of the affine ones; ``adam_real``'s clamped to the clip interval
    (the clip-free step: ``diag/adam_real_noclip/lambda_star``)."""
    if geometry != REAL_GEOMETRY:
        return numeric(df, geo_key(geometry, "lambda_star"))
    return numeric(df, geo_key(geometry, "lambda_star_clamped") if clip else "diag/adam_real_noclip/lambda_star")


def _evidence(probes: pd.DataFrame) -> pd.DataFrame:
    """The probes that speak about the model of J: controls left out."""
    return probes[control(probes) == ""]


def beta_split(d: pd.DataFrame) -> dict[str, Any]:
    """The medians of the real curvature's exact split (``diag/real_beta/…``): the clip's, v̂(λ)'s and the rest's
    share of their summed magnitudes; over every probe, and apart where the clip acts at λ = 0
    (``diag/adam_real/clip_active``) and where it does not: the split is bimodal, the clip's share near 1 or 0."""
    out = {f"real_beta/median_{k}_share": _median(numeric(d, f"diag/real_beta/{k}_share"))
           for k in ("clip", "vhat", "rest")}
    active = flag(d, "diag/adam_real/clip_active")
    for tag, sel in (("clip_active", active == 1), ("clip_inactive", active == 0)):
        out[f"real_beta/{tag}/probes"] = int(sel.sum())
        out |= {f"real_beta/{tag}/median_{k}_share": _median(numeric(d[sel], f"diag/real_beta/{k}_share"))
                for k in ("clip", "vhat", "rest")}
    return out


def _split_text(nums: dict[str, Any]) -> str:
    """The real curvature's median split, apart where the clip acts at λ = 0 and where it does not."""
    def one(tag: str) -> str:
        return ", ".join(f"{name} {nums[f'real_beta/{tag}median_{k}_share']:.0%}"
                         for k, name in (("clip", "clip"), ("vhat", "v̂(λ)"), ("rest", "the rest")))
    parts = [f"{where} ({n} probes): {one(tag + '/')}"
             for tag, where in (("clip_active", "where the clip acts at λ = 0"), ("clip_inactive", "where it does not"))
             if (n := nums[f"real_beta/{tag}/probes"])]
    return "; ".join(parts) if parts else f"over every probe: {one('')}"


def local_quadratic(probes: pd.DataFrame) -> Verdict:
    """Claim 1a (see the module docstring). Also reported: the medians of the real curvature's split into the
    clip, v̂(λ) and the rest, and each geometry's median relative error of α and β against the local fit."""
    need = [REAL_LOCAL + k for k in ("alpha", "beta", "r2")]
    if missing := _missing(probes, need):
        return not_measured("1a", CLAIM_LOCAL, f"no real-step local curve: the probes lack {missing} (set "
                            "diag.curve_real_step: true)", **controls_record(probes))
    ev = _evidence(probes)
    a, b, r2 = (numeric(ev, c) for c in need)
    flat = (a == 0) & (b == 0)  # a flat curve has nothing to fit
    ok = np.isfinite(b) & np.isfinite(r2) & ~flat
    d = ev[ok]
    quad_verdict, nums = judge_share(r2[ok] >= LOCAL_R2, d["run"], "quadratic")
    nums |= controls_record(probes) | {"curves": int(ok.sum()), "median_r2": _median(r2[ok]),
                                       "flat_curves": int(flat.sum()), "not_fitted": int((~ok & ~flat).sum())}
    nums |= beta_split(d)
    shares: dict[str, dict[str, Any]] = {}
    for g in ALL_GEOMETRIES:
        bm = model_beta(d, g)
        has = np.isfinite(bm)
        if has.any():
            v, s = judge_share(np.sign(bm[has]) == np.sign(b[ok][has]), d.loc[has, "run"], "sign")
            shares[g] = s | {"verdict": v}
            nums |= {f"{g}/beta_sign_agreement": s["sign_share"], f"{g}/beta_sign_points": s["sign_points"]}
        for k in ("alpha_rel_err", "beta_rel_err"):
            e = numeric(d, geo_key(g, k)).abs().dropna()
            if len(e):
                nums[f"{g}/median_{k}"] = float(e.median())
    nums |= {f"{g}/verdict": sh["verdict"] for g, sh in shares.items()}
    if JUDGED_GEOMETRY not in shares:
        return Verdict("1a", CLAIM_LOCAL, NOT_SUPPORTED if quad_verdict == NOT_SUPPORTED else INCONCLUSIVE, nums,
                       f"no {JUDGED_GEOMETRY} β logged beside the real-step curve")
    judged = shares[JUDGED_GEOMETRY]
    verdict = combine([quad_verdict, judged["verdict"]])
    each = ", ".join(f"{g} {sh['sign_share']:.0%}" for g, sh in shares.items() if g != JUDGED_GEOMETRY)
    detail = (f"{nums['quadratic_share']:.0%} of {nums['quadratic_points']} local real-step curves have R² ≥ "
              f"{LOCAL_R2} (run-clustered 95% interval {nums['quadratic_share_lo']:.0%}–{nums['quadratic_share_hi']:.0%}); "
              f"adam_real's β has the real curve's sign in {judged['sign_share']:.0%} (the affine geometries: "
              f"{each}); the real curvature's median split {_split_text(nums)}; "
              f"controls left out: {nums['controls/detach']} detach, {nums['controls/first_step']} first-step probes")
    return Verdict("1a", CLAIM_LOCAL, verdict, nums, detail)


def located(d: pd.DataFrame, geometry: str, clip: bool = True) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Per probe: whether ``geometry``'s λ* lies within ``LOCATION_FACTOR`` of the real optimum (same sign), whether
    the real Δ at it is ≥ 0, and both (the 1b criterion). A NaN λ* or λ_opt is a miss."""
    tag, opt_prefix = ("", REAL_OPT) if clip else ("_noclip", REAL_OPT_NOCLIP)
    lam, opt = model_lambda(d, geometry, clip), numeric(d, opt_prefix + "lambda")
    ratio = (lam / opt).where(opt != 0)
    within = (ratio > 0) & (np.log(ratio.where(ratio > 0)).abs() <= math.log(LOCATION_FACTOR))
    within |= (lam == 0) & (opt == 0)
    nonneg = numeric(d, geo_key(geometry, f"delta_at_lambda_star{tag}")) >= 0
    return within, nonneg, within & nonneg


def _location_shares(d: pd.DataFrame, clip: bool) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    shares, nums = {}, {}
    prefix = "" if clip else "noclip/"
    for g in ALL_GEOMETRIES:
        if not np.isfinite(model_beta(d, g)).any() and g != REAL_GEOMETRY:
            continue  # a geometry these probes never measured (e.g. no momentum buffers)
        within, nonneg, both = located(d, g, clip)
        v, s = judge_share(both, d["run"], "located")
        shares[g] = s | {"verdict": v}
        delta = numeric(d, geo_key(g, f"delta_at_lambda_star{'' if clip else '_noclip'}"))
        best = numeric(d, (REAL_OPT if clip else REAL_OPT_NOCLIP) + "delta")
        nums |= {f"{prefix}{g}/located_share": s["located_share"], f"{prefix}{g}/located_share_lo": s["located_share_lo"],
                 f"{prefix}{g}/located_share_hi": s["located_share_hi"], f"{prefix}{g}/within_2x_share":
                 float(within.mean()) if len(d) else math.nan, f"{prefix}{g}/delta_nonnegative_share":
                 float(nonneg.mean()) if len(d) else math.nan,
                 f"{prefix}{g}/undefined": int((~np.isfinite(model_lambda(d, g, clip))).sum()),
                 f"{prefix}{g}/median_delta_over_optimum": _median((delta / best).where(best > 0))}
    return shares, nums


def wide_interior_maximum(probes: pd.DataFrame) -> Verdict:
    """Claim 1b (see the module docstring). Named for its place in the claim list (the old claim asked for an
    interior maximum of a fitted parabola; the real optimum is now found, not fitted)."""
    if missing := _missing(probes, [REAL_OPT + "lambda"]):
        return not_measured("1b", CLAIM_WIDE, f"no real optimum: the probes lack {missing} (set "
                            "diag.curve_real_step: true)", **controls_record(probes))
    ev = _evidence(probes)
    finite = np.isfinite(numeric(ev, REAL_OPT + "lambda"))
    edge = flag(ev, REAL_OPT + "at_edge") == 1
    d = ev[finite & ~edge]
    nums: dict[str, Any] = controls_record(probes) | {
        "probes": len(d), "optimum_at_edge": int((finite & edge).sum()), "optimum_not_finite": int((~finite).sum()),
        "median_abs_optimum": _median(numeric(d, REAL_OPT + "lambda").abs()),
        "median_abs_optimum_noclip": _median(numeric(d, REAL_OPT_NOCLIP + "lambda").abs())}
    shares, more = _location_shares(d, clip=True)
    nums |= more | {f"{g}/verdict": sh["verdict"] for g, sh in shares.items()}
    if (REAL_OPT_NOCLIP + "lambda") in d:
        free = d[flag(d, REAL_OPT_NOCLIP + "at_edge") != 1]
        nums |= _location_shares(free, clip=False)[1]
    if JUDGED_GEOMETRY not in shares or not len(d):
        return inconclusive("1b", CLAIM_WIDE, "no probe outside the controls has a real optimum inside its grid",
                            **nums)
    judged = shares[JUDGED_GEOMETRY]
    each = ", ".join(f"{g} {sh['located_share']:.0%}" for g, sh in shares.items() if g != JUDGED_GEOMETRY)
    free = ", ".join(f"{g} {nums[f'noclip/{g}/located_share']:.0%}" for g in shares if f"noclip/{g}/located_share" in nums)
    detail = (f"over {len(d)} probes of {d['run'].nunique()} runs (left out: {nums['controls/detach']} detach and "
              f"{nums['controls/first_step']} first-step controls, {nums['optimum_at_edge']} optima at the grid's "
              f"edge), adam_real puts λ* within a factor {LOCATION_FACTOR:g} of the real optimum with Δ_real ≥ 0 in "
              f"{judged['located_share']:.0%} (interval {judged['located_share_lo']:.0%}–{judged['located_share_hi']:.0%};"
              f" the affine geometries: {each})")
    if free:
        detail += f"; the clip-free step at the same states: {free}"
    return Verdict("1b", CLAIM_WIDE, judged["verdict"], nums, detail)


def clip_coupling(probes: pd.DataFrame, metrics: pd.DataFrame | None = None,
                  arm_difference: dict[str, Any] | None = None) -> Verdict:
    """The clip coupling row (see the module docstring). ``arm_difference``: ``detach/separate`` − ``detach`` on the
    RL suites (``outcome.arm_difference``), reported beside it."""
    nums: dict[str, Any] = {}
    ev = _evidence(probes)
    active = flag(ev, "diag/adam_real/clip_active")
    has = np.isfinite(active)
    if has.any():
        s = share_interval(active[has].to_numpy(bool), ev.loc[has, "run"])
        opt = numeric(ev, REAL_OPT + "lambda").abs()
        nums |= {"clip_active_at_0_share": s["share"], "clip_active_at_0_share_lo": s["share_lo"],
                 "clip_active_at_0_share_hi": s["share_hi"], "clip_active_at_0_points": int(has.sum()),
                 "median_abs_optimum_clip_active": _median(opt[active == 1]),
                 "median_abs_optimum_clip_inactive": _median(opt[active == 0])}
    if metrics is not None and "rl/clip_active" in metrics:
        acts = flag(metrics, "rl/clip_active")
        by_arm = metrics.assign(_a=acts).groupby("arm")["_a"].mean()
        nums |= {f"steps_clip_active/{arm}": float(v) for arm, v in by_arm.items() if math.isfinite(v)}
        nums["median_mtp_norm_share"] = _median(numeric(metrics, "rl/grad_norm_mtp_share"))
    if arm_difference:
        nums |= {f"separate_minus_detach/{k}": v for k, v in arm_difference.items()}
    det = probes[(control(probes) == "detach") & (probes.get("arm", pd.Series("", index=probes.index)) == "detach")] \
        if "arm" in probes else probes[control(probes) == "detach"]
    f0, f_used = numeric(det, "diag/adam_real/clip_factor"), numeric(det, "diag/adam_real/clip_factor_at_used")
    at_used = numeric(det, REAL_OPT + "delta_at_used")
    ok = np.isfinite(f0) & np.isfinite(f_used)
    coupled = f_used != f0
    nums |= {"detach_probes": int(ok.sum()), "detach_median_delta_at_used": _median(at_used[ok]),
             "detach_median_delta_at_used_coupled": _median(at_used[ok & coupled]),
             "detach_share_delta_at_used_negative": float((at_used[ok] < 0).mean()) if ok.any() else math.nan}
    if not ok.any():
        return not_measured("clip", CLAIM_CLIP, "no detach probe with the clip factor at the λ used (a detach arm "
                            "probed by this version: diag/adam_real/clip_factor_at_used)", **nums)
    verdict, s = judge_share(coupled[ok], det.loc[ok, "run"], "coupled")
    nums |= s
    detail = (f"in {s['coupled_share']:.0%} of {s['coupled_points']} detach probes the clip factor at the λ used "
              f"differs from the factor at λ = 0 (the real Δ that cost there: median "
              f"{nums['detach_median_delta_at_used_coupled']:.3g})")
    if "clip_active_at_0_share" in nums:
        detail += (f"; the clip acts at λ = 0 in {nums['clip_active_at_0_share']:.0%} of the other probes, where the "
                   f"real optimum's median |λ| is {nums['median_abs_optimum_clip_active']:.3g} (elsewhere "
                   f"{nums['median_abs_optimum_clip_inactive']:.3g})")
    if arm_difference and math.isfinite(arm_difference.get("diff", math.nan)):
        detail += (f"; detach/separate − detach on the RL suites = {arm_difference['diff']:+.3g} "
                   f"[{arm_difference['lower']:+.3g}, {arm_difference['upper']:+.3g}] (n = {arm_difference['n']})")
    return Verdict("clip", CLAIM_CLIP, verdict, nums, detail)
