"""The six claims under test, each a pure function of tidy frames returning a ``Verdict``.

Verdicts are ``supported``, ``not supported`` or ``inconclusive at this scale`` (too little data,
or numbers between the two thresholds). Every threshold is a module constant, listed in
``THRESHOLDS`` and printed in the report. Probe quantities come from ``probes_frame`` (probes.parquet
where a run has one, else the ``diag/…`` rows of its metrics); symbols as in THEORY.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .frames import cosine, exact_lambda_star, numeric, pick_geometry, proxy_points, suites_in
from .stats import pearson, spearman

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive at this scale"

MIN_PROBES = 3
"""Fewer probes (or steps, for the timing claim) than this: inconclusive."""
MIN_SEEDS = 2
"""Fewer seeds per regime than this where a spread over seeds is needed: inconclusive."""
MIN_CORRELATION_POINTS = 5
"""Fewer (proxy, λ*_fit) pairs than this: inconclusive (ρ is meaningless on 3–4 points)."""
CONCAVE_R2 = 0.9
"""Claim 1: a curve counts as a concave quadratic when β < 0 and R² ≥ this."""
CONCAVE_SUPPORTED, CONCAVE_NOT_SUPPORTED = 0.8, 0.5
"""Claim 1: supported when the concave share ≥ 0.8, not supported when < 0.5."""
CE_SUPPORTED, CE_NOT_SUPPORTED = 2 / 3, 1 / 3
"""Claim 2: share of ce probes with λ*_fit not finite-positive or below the λ used: supported ≥ 2/3
(and median |cos(g,u)| under ce below that under policy), not supported < 1/3."""
DECAY_C_BELOW, DECAY_Q_ABOVE, DECAY_C_NOT = 0.5, 0.5, 1.0
"""Claim 3: late/early ratio of median |C| < 0.5 and of median |Q| > 0.5: supported; C ratio ≥ 1: not supported."""
OCC_NOT_MARGIN = 0.02
"""Claim 4: occ − detach < −2·SE *and* < −0.02 (mean greedy accuracy): not supported; ≥ −SE: supported."""
PROXY_RHO_SUPPORTED, PROXY_P, PROXY_RHO_NOT = 0.5, 0.05, 0.2
"""Claim 5: Spearman ρ ≥ 0.5 with p < 0.05: supported; ρ ≤ 0.2: not supported."""
COST_SUPPORTED, COST_NOT_SUPPORTED = 1.03, 1.10
"""Claim 6: median train time occ/detach ≤ 1.03: supported; > 1.10: not supported."""

THRESHOLDS: dict[str, str] = {
    "general": f"inconclusive with fewer than {MIN_PROBES} probes, or fewer than {MIN_SEEDS} seeds where a "
           "spread over seeds is needed",
    "1": f"concave = β < 0 and R² ≥ {CONCAVE_R2}; supported if share ≥ {CONCAVE_SUPPORTED}, not supported "
         f"if < {CONCAVE_NOT_SUPPORTED}",
    "2": f"supported if share ≥ {CE_SUPPORTED:.3g} and median |cos| ce < policy; not supported if share "
         f"< {CE_NOT_SUPPORTED:.3g}",
    "3": f"supported if C ratio < {DECAY_C_BELOW} and Q ratio > {DECAY_Q_ABOVE}; not supported if C ratio "
         f"≥ {DECAY_C_NOT}",
    "4": f"supported if diff ≥ −SE; not supported if diff < −2·SE and diff < −{OCC_NOT_MARGIN}",
    "5": f"supported if Spearman ρ ≥ {PROXY_RHO_SUPPORTED} and p < {PROXY_P}; not supported if ρ ≤ "
         f"{PROXY_RHO_NOT}; at least {MIN_CORRELATION_POINTS} points",
    "6": f"supported if median ratio ≤ {COST_SUPPORTED}; not supported if > {COST_NOT_SUPPORTED}",
}


@dataclass(frozen=True)
class Verdict:
    claim: str
    verdict: str
    numbers: dict[str, Any] = field(default_factory=dict)
    detail: str = ""


def _inconclusive(claim: str, why: str, **numbers: Any) -> Verdict:
    return Verdict(claim, INCONCLUSIVE, numbers, why)


def _regime(df: pd.DataFrame, regime: str) -> pd.DataFrame:
    return df[df["regime"] == regime] if "regime" in df else df.iloc[0:0]


CLAIM_CONCAVE = "1. per-step improvement is a concave quadratic in λ"


def concave_quadratic(probes: pd.DataFrame) -> Verdict:
    """Claim 1: among probes with a non-flat measured curve, the share with β < 0 and R² ≥ ``CONCAVE_R2``."""
    beta, r2 = numeric(probes, "diag/curve/beta"), numeric(probes, "diag/curve/r2")
    flat = probes["diag/curve/flat"].eq(True) if "diag/curve/flat" in probes else pd.Series(False, index=probes.index)
    ok = ~flat & np.isfinite(beta) & np.isfinite(r2)
    n = int(ok.sum())
    nums: dict[str, Any] = {"curves": n, "flat_excluded": int(flat.sum())}
    if n < MIN_PROBES:
        return _inconclusive(CLAIM_CONCAVE, f"only {n} probe(s) with a non-flat fitted curve", **nums)
    good = (beta[ok] < 0) & (r2[ok] >= CONCAVE_R2)
    share = float(good.mean())
    se = numeric(probes, "diag/curve/beta_se")
    nums |= {"concave_share": share, "share_beta_neg": float((beta[ok] < 0).mean()),
             "share_beta_significant": float((beta[ok] + 2 * se[ok] < 0).mean()),  # β < 0 by 2 standard errors
             "median_r2": float(r2[ok].median())}
    detail = f"{int(good.sum())} of {n} non-flat curves have β < 0 and R² ≥ {CONCAVE_R2}"
    # reported beside the verdict: is the curve concave where the second-order model says so (η²Q < 0)?
    b, pred = beta[ok], numeric(probes, "diag/curve/pred_beta")[ok]
    has_pred = np.isfinite(pred)
    if has_pred.sum() >= MIN_PROBES:
        neg, pos = has_pred & (pred < 0), has_pred & (pred >= 0)
        nums |= {"pred_concave_share": float(neg.sum() / has_pred.sum()),
                 "beta_sign_agrees_with_pred": float((np.sign(b[has_pred]) == np.sign(pred[has_pred])).mean()),
                 "concave_share_where_pred_concave": float(good[neg].mean()) if neg.any() else math.nan,
                 "convex_share_where_pred_convex": float((b[pos] > 0).mean()) if pos.any() else math.nan}
        detail += (f"; the model predicts η²Q < 0 for {int(neg.sum())} of {int(has_pred.sum())}, and "
                   f"{nums['concave_share_where_pred_concave']:.0%} of those are concave quadratics")
    # reported beside the verdict: does the model's λ* (from C, X, Q) match the measured curve's?
    exact, fit = exact_lambda_star(probes)[ok].to_numpy(), numeric(probes, "diag/curve/lambda_star")[ok].to_numpy()
    both = np.isfinite(exact) & np.isfinite(fit)
    if both.sum() >= MIN_CORRELATION_POINTS:
        agree = _agreement(exact[both], fit[both])
        nums |= {"exact_vs_fit_points": int(both.sum())} | {f"exact_vs_fit_{k}": v for k, v in agree.items()}
        detail += (f"; λ*_exact vs λ*_fit over {int(both.sum())} curves: Spearman ρ = {agree['spearman']:.3g}, "
                   f"same sign {agree['sign_agreement']:.0%}")
    verdict = SUPPORTED if share >= CONCAVE_SUPPORTED else NOT_SUPPORTED if share < CONCAVE_NOT_SUPPORTED \
        else INCONCLUSIVE
    return Verdict(CLAIM_CONCAVE, verdict, nums, detail)


CLAIM_CE = "2. under cross-entropy the correlation is weak and the penalty dominates"


def ce_penalty_dominates(probes: pd.DataFrame) -> Verdict:
    """Claim 2: over ``ce`` probes with a fitted curve (finite β), the share whose λ*_fit is not
    finite-positive (NaN when the curve is convex) or is below the λ the run used (``diag/lambda_used``);
    and median |cos(g,u)| under ce vs under policy."""
    ce = _regime(probes, "ce")
    fit, used = numeric(ce, "diag/curve/lambda_star"), numeric(ce, "diag/lambda_used")
    ok = np.isfinite(used) & np.isfinite(numeric(ce, "diag/curve/beta"))  # a fitted curve (λ*_fit NaN if convex)
    n = int(ok.sum())
    if n < MIN_PROBES:
        return _inconclusive(CLAIM_CE, f"only {n} ce probe(s) with a fitted curve and a recorded λ", ce_probes=n)
    small = ~(np.isfinite(fit) & (fit > 0)) | (fit < used)
    share = float(small[ok].mean())
    cos_ce = cosine(ce).abs().dropna()
    cos_pol = cosine(_regime(probes, "policy")).abs().dropna()
    med_ce = float(cos_ce.median()) if len(cos_ce) else math.nan
    med_pol = float(cos_pol.median()) if len(cos_pol) else math.nan
    nums = {"ce_probes": n, "share_small_or_negative": share, "median_abs_cos_ce": med_ce,
            "median_abs_cos_policy": med_pol}
    detail = f"{int(small[ok].sum())} of {n} ce probes have λ*_fit ≤ 0, undefined, or below the λ used"
    if share < CE_NOT_SUPPORTED:
        return Verdict(CLAIM_CE, NOT_SUPPORTED, nums, detail)
    if share >= CE_SUPPORTED:
        if not math.isfinite(med_pol) or not math.isfinite(med_ce):
            return Verdict(CLAIM_CE, INCONCLUSIVE, nums, detail + "; no cos(g,u) under policy to compare with")
        if med_ce < med_pol:
            return Verdict(CLAIM_CE, SUPPORTED, nums, detail + f"; median |cos| ce {med_ce:.3g} < policy {med_pol:.3g}")
        return Verdict(CLAIM_CE, INCONCLUSIVE, nums,
                       detail + f"; but median |cos| ce {med_ce:.3g} is not below policy {med_pol:.3g}")
    return Verdict(CLAIM_CE, INCONCLUSIVE, nums, detail)


CLAIM_DECAY = "3. under policy loss C decays while Q persists"


def policy_corr_decays(probes: pd.DataFrame) -> Verdict:
    """Claim 3: over ``policy`` probes (Adam geometry where present), median |C| over the last third of
    the probed step range divided by that over the first third, and the same for |Q|."""
    pol = _regime(probes, "policy")
    geom = pick_geometry(pol)
    c, q, step = numeric(pol, f"diag/{geom}/corr"), numeric(pol, f"diag/{geom}/curv"), numeric(pol, "step")
    ok = np.isfinite(c) & np.isfinite(q) & np.isfinite(step)
    c, q, step = c[ok].abs(), q[ok].abs(), step[ok]
    nums: dict[str, Any] = {"geometry": geom, "policy_probes": int(ok.sum())}
    if ok.sum() < MIN_PROBES or step.max() == step.min():
        return _inconclusive(CLAIM_DECAY, f"only {int(ok.sum())} policy probe(s) over "
                             f"{step.nunique()} distinct step(s)", **nums)
    t = (step - step.min()) / (step.max() - step.min())
    early, late = t <= 1 / 3, t >= 2 / 3
    c0, c1, q0, q1 = c[early].median(), c[late].median(), q[early].median(), q[late].median()
    nums |= {"early_probes": int(early.sum()), "late_probes": int(late.sum()), "median_abs_C_early": float(c0),
             "median_abs_C_late": float(c1), "median_abs_Q_early": float(q0), "median_abs_Q_late": float(q1)}
    if c0 == 0 or q0 == 0:
        return _inconclusive(CLAIM_DECAY, "median |C| or |Q| is zero early on: no ratio", **nums)
    rc, rq = float(c1 / c0), float(q1 / q0)
    nums |= {"C_ratio": rc, "Q_ratio": rq}
    detail = f"late/early median |C| = {rc:.3g}, |Q| = {rq:.3g} ({geom} geometry)"
    if rc >= DECAY_C_NOT:
        return Verdict(CLAIM_DECAY, NOT_SUPPORTED, nums, detail + ": C does not decay")
    verdict = SUPPORTED if rc < DECAY_C_BELOW and rq > DECAY_Q_ABOVE else INCONCLUSIVE
    return Verdict(CLAIM_DECAY, verdict, nums, detail)


CLAIM_OCC = "4. OCC matches or beats detach on the six suites"


def occ_matches_detach(evals: pd.DataFrame) -> Verdict:
    """Claim 4: mean greedy accuracy over the suites every occ and detach run evaluated, per seed;
    occ − detach (paired by seed when both regimes have the same seeds) with its standard error."""
    sel = evals[evals["regime"].isin(["occ", "detach"])] if len(evals) else evals
    if not len(sel) or sel["regime"].nunique() < 2:
        return _inconclusive(CLAIM_OCC, "needs eval.json from both occ and detach runs")
    per_run = sel.groupby("run")["suite"].apply(set)
    suites = suites_in(set.intersection(*per_run))
    sel = sel[sel["suite"].isin(suites)]
    seed_acc = sel.groupby(["regime", "seed"])["greedy_acc"].mean()  # mean over suites (and repeat runs)
    occ, det = seed_acc.get("occ", pd.Series(dtype=float)), seed_acc.get("detach", pd.Series(dtype=float))
    nums: dict[str, Any] = {"suites": len(suites), "occ_seeds": len(occ), "detach_seeds": len(det)}
    if min(len(occ), len(det)) < MIN_SEEDS:
        return _inconclusive(CLAIM_OCC, f"needs ≥ {MIN_SEEDS} seeds per regime (occ {len(occ)}, detach {len(det)})",
                             **nums)
    if set(occ.index) == set(det.index):
        d = occ - det.reindex(occ.index)
        diff, se, pairing = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))), "paired by seed"
    else:
        diff = float(occ.mean() - det.mean())
        se = float(math.sqrt(occ.var(ddof=1) / len(occ) + det.var(ddof=1) / len(det)))
        pairing = "unpaired"
    by_suite = sel.groupby(["regime", "suite"])["greedy_acc"].mean()
    nums |= {"diff": diff, "se": se, "pairing": pairing,
             **{f"diff/{s}": float(by_suite["occ", s] - by_suite["detach", s]) for s in suites}}
    detail = f"occ − detach = {diff:+.3g} ± {se:.2g} (SE, {pairing}) over {len(suites)} suite(s)"
    if diff >= -se:
        return Verdict(CLAIM_OCC, SUPPORTED, nums, detail)
    if diff < -2 * se and diff < -OCC_NOT_MARGIN:
        return Verdict(CLAIM_OCC, NOT_SUPPORTED, nums, detail)
    return Verdict(CLAIM_OCC, INCONCLUSIVE, nums, detail)


CLAIM_PROXY = "5. the log-probability proxy tracks λ*"


def _tracking(pts: pd.DataFrame) -> dict[str, float]:
    return _agreement(pts["fit"].to_numpy(), pts["proxy"].to_numpy())


def _agreement(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """How well y tracks x: Spearman ρ and its p-value, Pearson r, sign agreement, and the median
    |log(y/x)| where both are positive."""
    rho, p = spearman(x, y)
    both = (x > 0) & (y > 0)
    return {"spearman": rho, "p": p, "pearson": pearson(x, y), "sign_agreement": float(np.mean(np.sign(x) == np.sign(y))),
            "median_abs_log_ratio": float(np.median(np.abs(np.log(y[both] / x[both])))) if both.any() else math.nan}


def proxy_tracks_lambda_star(probes: pd.DataFrame) -> Verdict:
    """Claim 5: Spearman ρ (p-value), Pearson r, sign agreement and median |log ratio| of the ``reference``
    proxy (and ``least_squares`` and ``fisher``, reported only) against λ*_fit over policy and occ probes."""
    pts, dropped = proxy_points(probes, "reference")
    nums: dict[str, Any] = {"points": len(pts), "dropped_zero_by_construction": dropped["zero_by_construction"],
                            "dropped_no_finite_fit": dropped["no_finite_fit"]}
    ls: dict[str, Any] = {}
    for other in ("least_squares", "fisher"):  # reported beside it, never part of the verdict
        o_pts, _ = proxy_points(probes, other)
        if len(o_pts) >= MIN_CORRELATION_POINTS:
            ls |= {f"{other}/{k}": v for k, v in _tracking(o_pts).items()}
    why_dropped = (f"{dropped['zero_by_construction']} probe(s) on the first minibatch after a rollout dropped "
                   f"(the proxy is 0 there by construction), {dropped['no_finite_fit']} probe(s) without a finite "
                   "λ*_fit")
    if len(pts) < MIN_CORRELATION_POINTS:
        return _inconclusive(CLAIM_PROXY, f"only {len(pts)} (proxy, λ*_fit) pair(s); {why_dropped}", **nums, **ls)
    t = _tracking(pts)
    nums |= t | ls
    detail = f"Spearman ρ = {t['spearman']:.3g} (p = {t['p']:.2g}) over {len(pts)} probes; {why_dropped}"
    if "fisher/spearman" in ls:
        detail += (f". For comparison, the curvature-aware fisher proxy: ρ = {ls['fisher/spearman']:.3g} "
                   f"(p = {ls['fisher/p']:.2g})")
    if t["spearman"] >= PROXY_RHO_SUPPORTED and t["p"] < PROXY_P:
        return Verdict(CLAIM_PROXY, SUPPORTED, nums, detail)
    if t["spearman"] <= PROXY_RHO_NOT:
        return Verdict(CLAIM_PROXY, NOT_SUPPORTED, nums, detail)
    return Verdict(CLAIM_PROXY, INCONCLUSIVE, nums, detail)


CLAIM_COST = "6. OCC costs negligible time"


def occ_time_cost(metrics: pd.DataFrame) -> Verdict:
    """Claim 6: median ``perf/train_s`` of occ steps over that of detach steps. Diagnosed steps
    (``perf/diag_s`` > 0) are left out: their train time includes the gradient recorder's checks."""
    t, diag = numeric(metrics, "perf/train_s"), numeric(metrics, "perf/diag_s").fillna(0)
    ok = np.isfinite(t) & (diag <= 0)
    occ = t[ok & (metrics.get("regime") == "occ")]
    det = t[ok & (metrics.get("regime") == "detach")]
    nums: dict[str, Any] = {"occ_steps": len(occ), "detach_steps": len(det), "diagnosed_excluded": int((diag > 0).sum())}
    if min(len(occ), len(det)) < MIN_PROBES:
        return _inconclusive(CLAIM_COST, f"needs ≥ {MIN_PROBES} timed steps of both occ ({len(occ)}) and "
                             f"detach ({len(det)})", **nums)
    ratio = float(occ.median() / det.median())
    nums |= {"median_occ_s": float(occ.median()), "median_detach_s": float(det.median()), "ratio": ratio}
    detail = f"median train step occ/detach = {ratio:.3g}"
    pol = t[ok & (metrics.get("regime") == "policy")]
    if len(pol) >= MIN_PROBES:  # same graph as occ (MTP into the trunk): isolates the cost of calibrating λ
        nums["ratio_occ_policy"] = float(occ.median() / pol.median())
        detail += f"; occ/policy (same graph, fixed λ) = {nums['ratio_occ_policy']:.3g}"
    detail += " (separate runs' step times; `occ bench step` times them interleaved on one batch)"
    verdict = SUPPORTED if ratio <= COST_SUPPORTED else NOT_SUPPORTED if ratio > COST_NOT_SUPPORTED else INCONCLUSIVE
    return Verdict(CLAIM_COST, verdict, nums, detail)


def evaluate_claims(metrics: pd.DataFrame, probes: pd.DataFrame, evals: pd.DataFrame) -> list[Verdict]:
    """All six verdicts, in order."""
    return [concave_quadratic(probes), ce_penalty_dominates(probes), policy_corr_decays(probes),
            occ_matches_detach(evals), proxy_tracks_lambda_star(probes), occ_time_cost(metrics)]
