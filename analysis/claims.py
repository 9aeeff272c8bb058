"""The claims under test, each a pure function of tidy frames returning a ``Verdict`` (``verdict.py``).

Claims 1a/1b (the real-step curve) live in ``claims_curve``, claims 4 and 7 (held-out outcomes) in
``outcome``; here are the probe claims 2, 3, 5 and the cost claim 6, and ``evaluate_claims``.
Judging rules shared by all (docs/theory.md section 6) are in ``verdict``: at least ``MIN_RUNS`` runs per
arm, run-clustered intervals and p-values, a NaN never counts as support. Every quantity in a
geometry is read in one geometry (``frames.run_geometry``), never pooled across geometries.
Every threshold is a module constant, listed in ``THRESHOLDS`` and printed in the report.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from . import claims_curve, outcome
from .frames import (
    control,
    cosine,
    geo_key,
    lambda_star_fit,
    minibatch_index,
    numeric,
    proxy_points,
    run_geometry,
)
from .stats import (
    cluster_bootstrap,
    impute_discordant,
    interval,
    median_interval,
    p_two_sided,
    pearson,
    spearman,
    spearman_rho,
)
from .verdict import (
    INCONCLUSIVE,
    MIN_POINTS,
    MIN_RUNS,
    NOT_MEASURED,
    NOT_SUPPORTED,
    SHARE_HIGH,
    SHARE_LOW,
    SUPPORTED,
    Verdict,
    combine,
    inconclusive,
    judge_share,
    too_few_runs,
)

DECAY_C_BELOW, DECAY_Q_ABOVE, DECAY_C_NOT = 0.5, 0.5, 1.0
"""Claim 3: late/early signed median C < 0.5 with its run-clustered interval below 1, and late/early signed
median Q > 0.5: supported; the C ratio's interval at or above 1, or the Q ratio's interval below 0.5: not
supported."""
PROXY_RHO_SUPPORTED, PROXY_P, PROXY_RHO_NOT = 0.5, 0.05, 0.2
"""Claim 5: within-minibatch-index Spearman ρ ≥ 0.5 with run-clustered p < 0.05: supported; ρ ≤ 0.2: not supported."""
COST_SUPPORTED, COST_NOT_SUPPORTED = 1.03, 1.10
"""Claim 6: step time occ/detach ≤ 1.03 (with the interleaved design's interval below 1.10): supported; above 1.10
(the interval's lower end, interleaved): not supported."""

THRESHOLDS: dict[str, str] = {
    "general": f"inconclusive with fewer than {MIN_RUNS} runs per arm or {MIN_POINTS} points; intervals and "
               "p-values pooling probes resample whole runs (95% cluster bootstrap); a NaN never counts as support; "
               f"share rule: supported at share ≥ {SHARE_HIGH} with the interval's lower end ≥ {SHARE_LOW}, not "
               f"supported at share < {SHARE_LOW} with the upper end < {SHARE_HIGH}",
    **claims_curve.THRESHOLDS,
    "2": "ce probes in the run's geometry: share with a finite real optimum λ_opt ≤ 0 or below the λ used, and share "
         "where the "
         "penalty ½λ²|β_m| exceeds λ|α_m| at the λ used (β_m < 0), each by the share rule; and median |cos(g,u)| "
         "ce < policy",
    "3": f"policy probes in the run's geometry, last third over first third of the steps: signed median C ratio < "
         f"{DECAY_C_BELOW} with interval below {DECAY_C_NOT} and Q ratio > {DECAY_Q_ABOVE}: supported; C ratio "
         f"interval ≥ {DECAY_C_NOT} or Q ratio interval < {DECAY_Q_ABOVE}: not supported",
    **outcome.THRESHOLDS,
    "5": f"reference proxy vs the real optimum λ_opt within each minibatch index: mean ρ ≥ {PROXY_RHO_SUPPORTED} with "
         f"run-clustered p < {PROXY_P}, also with every NaN proxy or λ_opt placed where it hurts ρ most: supported; "
         f"ρ ≤ {PROXY_RHO_NOT}: not supported; at least {MIN_POINTS} points",
    "6": f"interleaved (occ cost): median per-round step time occ/reference over detach ≤ {COST_SUPPORTED} with the "
         f"95% interval's upper end ≤ {COST_NOT_SUPPORTED}: supported; lower end > {COST_NOT_SUPPORTED}: not supported. "
         f"Without it, separate runs: mean of per-run median step times ≤ {COST_SUPPORTED}: supported; > "
         f"{COST_NOT_SUPPORTED}: not supported",
}


def _absent(n: int) -> str:
    """The inconclusive verdict's wording: not measured when there is nothing at all to judge (an arm not run, a
    setting off), at this scale when there is some but too little."""
    return NOT_MEASURED if not n else INCONCLUSIVE


def _regime(df: pd.DataFrame, regime: str) -> pd.DataFrame:
    return df[df["regime"] == regime] if "regime" in df else df.iloc[0:0]


def _median(v: pd.Series) -> float:
    v = v.dropna()
    return float(v.median()) if len(v) else math.nan


def step_coefficients(df: pd.DataFrame, geometry: str) -> tuple[pd.Series, pd.Series]:
    """(α_m, β_m) of Δ(λ) = λα_m + ½λ²β_m in ``geometry``: ``diag/G/alpha_model``, ``beta_model`` where logged,
    else the fixed-P model's η(C + ηX) and η²Q (``diag/G/corr``, ``cross``, ``curv``, ``diag/lr``)."""
    a, b = numeric(df, geo_key(geometry, "alpha_model")), numeric(df, geo_key(geometry, "beta_model"))
    if np.isfinite(b).any():
        return a, b
    lr = numeric(df, "diag/lr")
    cross = numeric(df, geo_key(geometry, "cross")).fillna(0.0)
    return lr * (numeric(df, geo_key(geometry, "corr")) + lr * cross), lr**2 * numeric(df, geo_key(geometry, "curv"))


CLAIM_CE = "2. under cross-entropy the correlation is weak and the penalty dominates"


def ce_penalty_dominates(probes: pd.DataFrame) -> Verdict:
    """Claim 2, over ``ce`` probes in the run's geometry G (rows without G left out and counted; first-step probes,
    a sign step, are controls and left out): (a) the real optimum λ_opt (``lambda_star_fit``) is finite and ≤ 0
    or below the λ used (``lambda/used``); a NaN is counted, never support; (b) the penalty dominates at the λ
    used: β_m < 0 and ½λ²|β_m| > λ|α_m|; (c) median |cos(g, u)| in G's geometry (parameter space where G has none
    logged) is lower under ce than under policy."""
    ce = _regime(probes, "ce")
    ce = ce[control(ce) == ""]
    g = run_geometry(ce)
    alpha, beta = step_coefficients(ce, g)
    lam = numeric(ce, "lambda/used")
    in_g = np.isfinite(alpha) & np.isfinite(beta) & np.isfinite(lam)
    fit, fit_src = lambda_star_fit(ce)
    nums: dict[str, Any] = {"geometry": g, "fit_source": fit_src, "ce_probes": int(in_g.sum()),
                            "excluded_other_geometry": int((np.isfinite(lam) & ~in_g).sum())}
    if why := too_few_runs(ce.loc[in_g, "run"], f"ce probes in the {g} geometry"):
        return inconclusive("2", CLAIM_CE, why, _absent(in_g.sum()), **nums)
    d, a, b, lam, fit = ce[in_g], alpha[in_g], beta[in_g], lam[in_g], fit[in_g]
    has_fit = np.isfinite(fit)
    nums["nan_fit"] = int((~has_fit).sum())
    small_v, small = judge_share(((fit <= 0) | (fit < lam))[has_fit], d.loc[has_fit, "run"], "small_opt")
    penalty_v, penalty = judge_share((b < 0) & (0.5 * lam.abs() * b.abs() > a.abs()), d["run"], "penalty")
    cos_ce, cos_geom = cosine(d, g)
    pol = _regime(probes, "policy")
    cos_pol = cosine(pol[np.isfinite(step_coefficients(pol, g)[1])], cos_geom)[0] if cos_geom != "sgd" \
        else cosine(pol, "sgd")[0]
    med_ce, med_pol = _median(cos_ce.abs()), _median(cos_pol.abs())
    nums |= small | penalty | {
        "cosine_geometry": cos_geom, "median_abs_cos_ce": med_ce, "median_abs_cos_policy": med_pol,
        "median_cos_ce": _median(cos_ce), "share_cos_positive_ce": float((cos_ce.dropna() > 0).mean())
        if cos_ce.notna().any() else math.nan,
        "median_penalty_to_gain": _median((0.5 * lam.abs() * b.abs() / a.abs()).where(b < 0))}
    weak_v = INCONCLUSIVE if not (math.isfinite(med_ce) and math.isfinite(med_pol)) else \
        SUPPORTED if med_ce < med_pol else INCONCLUSIVE
    detail = (f"the real optimum ({fit_src}) is ≤ 0 or below the λ used in {small['small_opt_share']:.0%} of "
              f"{small['small_opt_points']} ce probes with a finite one ({nums['nan_fit']} NaN, not counted as "
              f"support); in the {g} geometry the penalty exceeds the linear gain at the λ used in "
              f"{penalty['penalty_share']:.0%}; "
              f"median |cos| ({cos_geom}) ce {med_ce:.3g} vs policy {med_pol:.3g}")
    return Verdict("2", CLAIM_CE, combine([small_v, penalty_v, weak_v]), nums, detail)


CLAIM_DECAY = "3. under policy loss C decays while Q persists"


def _late_over_early(v: np.ndarray, t: np.ndarray) -> float:
    early, late = np.median(v[t <= 1 / 3]) if (t <= 1 / 3).any() else math.nan, \
        np.median(v[t >= 2 / 3]) if (t >= 2 / 3).any() else math.nan
    return float(late / early) if early != 0 else math.nan


def policy_corr_decays(probes: pd.DataFrame) -> Verdict:
    """Claim 3: over ``policy`` probes in the run's geometry, the signed medians of C and Q over the last
    third of the probed step range divided by those over the first third, with run-clustered intervals;
    beside them the share of probes with Q < 0 (the penalty) early and late."""
    pol = _regime(probes, "policy")
    pol = pol[control(pol) == ""]  # the first step (a sign step) is a control
    g = run_geometry(pol, "corr")
    c, q, step = numeric(pol, geo_key(g, "corr")), numeric(pol, geo_key(g, "curv")), numeric(pol, "step")
    ok = np.isfinite(c) & np.isfinite(q) & np.isfinite(step)
    nums: dict[str, Any] = {"geometry": g, "policy_probes": int(ok.sum()),
                            "excluded_other_geometry": int((np.isfinite(step) & ~ok).sum())}
    if why := too_few_runs(pol.loc[ok, "run"], f"policy probes in the {g} geometry"):
        return inconclusive("3", CLAIM_DECAY, why, _absent(ok.sum()), **nums)
    c, q, step, runs = c[ok].to_numpy(), q[ok].to_numpy(), step[ok].to_numpy(), pol.loc[ok, "run"].to_numpy()
    if step.max() == step.min():
        return inconclusive("3", CLAIM_DECAY, "every policy probe is at one step", **nums)
    t = (step - step.min()) / (step.max() - step.min())
    early, late = t <= 1 / 3, t >= 2 / 3
    nums |= {"early_probes": int(early.sum()), "late_probes": int(late.sum()),
             "median_C_early": float(np.median(c[early])), "median_C_late": float(np.median(c[late])),
             "median_Q_early": float(np.median(q[early])), "median_Q_late": float(np.median(q[late])),
             "share_Q_negative_early": float((q[early] < 0).mean()), "share_Q_negative_late": float((q[late] < 0).mean()),
             "share_C_positive_early": float((c[early] > 0).mean()), "share_C_positive_late": float((c[late] > 0).mean())}
    if nums["median_C_early"] <= 0 or nums["median_Q_early"] == 0:
        return inconclusive("3", CLAIM_DECAY, "the signed median of C early is not positive (or of Q is 0): no "
                            "decay to measure", **nums)
    rc, rq = _late_over_early(c, t), _late_over_early(q, t)
    rc_lo, rc_hi = interval(cluster_bootstrap(_late_over_early, [c, t], runs))
    rq_lo, rq_hi = interval(cluster_bootstrap(_late_over_early, [q, t], runs))
    nums |= {"C_ratio": rc, "C_ratio_lo": rc_lo, "C_ratio_hi": rc_hi, "Q_ratio": rq, "Q_ratio_lo": rq_lo,
             "Q_ratio_hi": rq_hi}
    detail = (f"late/early signed median C = {rc:.3g} [{rc_lo:.3g}, {rc_hi:.3g}], Q = {rq:.3g} [{rq_lo:.3g}, "
              f"{rq_hi:.3g}] (run-clustered 95%, {g} geometry); Q < 0 in {nums['share_Q_negative_early']:.0%} of "
              f"early and {nums['share_Q_negative_late']:.0%} of late probes")
    if rc_lo >= DECAY_C_NOT or rq_hi < DECAY_Q_ABOVE:
        return Verdict("3", CLAIM_DECAY, NOT_SUPPORTED, nums, detail)
    verdict = SUPPORTED if rc < DECAY_C_BELOW and rc_hi < DECAY_C_NOT and rq > DECAY_Q_ABOVE else INCONCLUSIVE
    return Verdict("3", CLAIM_DECAY, verdict, nums, detail)


CLAIM_PROXY = "5. the log-probability proxy tracks λ*"


def _within_k_rho(x: np.ndarray, y: np.ndarray, k: np.ndarray, worst: bool = False) -> float:
    """Spearman ρ within each minibatch index k, averaged with weights = points (k with < 3 points skipped).
    ``worst``: every NaN point placed where it hurts ρ most within its k (``stats.impute_discordant``)."""
    rhos, ws = [], []
    for kk in np.unique(k[np.isfinite(k)]) if np.isfinite(k).any() else [np.nan]:
        sel = (k == kk) if np.isfinite(kk) else np.ones(len(k), bool)
        rho = spearman_rho(*impute_discordant(x[sel], y[sel])) if worst else spearman_rho(x[sel], y[sel])
        if math.isfinite(rho):
            rhos.append(rho)
            ws.append(sel.sum())
    return float(np.average(rhos, weights=ws)) if rhos else math.nan


def tracking(pts: pd.DataFrame, truth: str = "fit", value: str = "proxy") -> dict[str, Any]:
    """How ``value`` tracks ``truth`` within each minibatch index ``k``: the points-weighted mean Spearman ρ with a
    run-clustered p-value and interval, each k's ρ and scipy's pooled p, Pearson r, sign agreement, and the
    median |log ratio| where both are positive."""
    x, y, k = (pts[c].to_numpy(float) for c in (truth, value, "k"))
    rho = _within_k_rho(x, y, k)
    boot = cluster_bootstrap(_within_k_rho, [x, y, k], pts["run"])
    lo, hi = interval(boot)
    both = (x > 0) & (y > 0)
    out = {"spearman": rho, "p": p_two_sided(boot) if math.isfinite(rho) else math.nan, "spearman_lo": lo,
           "spearman_hi": hi, "pearson": pearson(x, y), "sign_agreement": float(np.mean(np.sign(x) == np.sign(y))),
           "median_abs_log_ratio": float(np.median(np.abs(np.log(y[both] / x[both])))) if both.any() else math.nan}
    for kk in np.unique(k[np.isfinite(k)]):
        r, p = spearman(x[k == kk], y[k == kk])
        out |= {f"k{int(kk)}/spearman": r, f"k{int(kk)}/p_pooled": p, f"k{int(kk)}/points": int((k == kk).sum())}
    return out


def _reading(probes: pd.DataFrame) -> dict[str, Any]:
    """docs/theory.md section 4's reading of the reference proxy, reported beside claim 5: the head gap (statistics
    of q − l_old against l − l_old), ``proxy/c`` against κ = ``diag/G/proj``, and c against 1/(η·L_eff)
    (``diag/curve/l_eff``) as the median of c·η·L_eff (1 when the reading holds)."""
    d = probes[probes["regime"].isin(["policy", "occ"])]
    gap, drift = numeric(d, "stats/q_minus_old/mean"), numeric(d, "stats/l_minus_old/mean")
    out: dict[str, Any] = {
        "head_gap_median": _median(gap), "head_gap_share_negative": float((gap.dropna() < 0).mean())
        if gap.notna().any() else math.nan, "head_gap_median_std": _median(numeric(d, "stats/q_minus_old/std")),
        "head_gap_median_max_abs": _median(numeric(d, "stats/q_minus_old/max_abs")),
        "head_gap_over_drift": _median(gap.abs()) / _median(drift.abs()) if _median(drift.abs()) else math.nan}
    g = "adam" if np.isfinite(numeric(d, geo_key("adam", "proj"))).any() else run_geometry(d, "proj")  # κ = C/‖Pu‖²
    c = numeric(d, "base_coef")
    k, _ = minibatch_index(d)
    kappa = pd.DataFrame({"run": d.get("run"), "k": k, "kappa": numeric(d, geo_key(g, "proj")),
                          "ratio": numeric(d, "lambda/reference") / c})
    kappa = kappa[np.isfinite(kappa["kappa"]) & np.isfinite(kappa["ratio"]) & (kappa["k"] != 0)]
    out["kappa_geometry"] = g
    if len(kappa) >= MIN_POINTS:
        t = tracking(kappa, "kappa", "ratio")
        out |= {f"proxy_over_c_vs_kappa/{k_}": t[k_] for k_ in ("spearman", "p", "sign_agreement",
                                                                 "median_abs_log_ratio")}
    c_eta_l = c * numeric(d, "diag/lr") * numeric(d, "diag/curve/l_eff")
    c_eta_l = c_eta_l[c_eta_l > 0]
    out |= {"c_eta_leff_median": _median(c_eta_l), "c_eta_leff_points": len(c_eta_l)}
    return out


def proxy_tracks_lambda_star(probes: pd.DataFrame) -> Verdict:
    """Claim 5: the ``reference`` proxy against the real optimum λ_opt (``lambda_star_fit``) over policy and occ
    probes, compared within one minibatch index after a rollout (``tracking``). A probe where the proxy or λ_opt is
    NaN is counted and kept: "supported" also needs ρ with every such point placed where it hurts ρ most
    (``stats.impute_discordant``), so that no pattern of NaNs can make noise look like tracking. Beside it: the
    same against λ*_m of the run's geometry, the ``least_squares`` and ``fisher`` proxies, the λ every rule arm
    applied against λ_opt (``_rules_against_optimum``), and THEORY's reading (``_reading``). Controls (detach, the
    first step) are left out."""
    probes = probes[control(probes) == ""]
    pts, dropped = proxy_points(probes, "reference")
    every, _ = proxy_points(probes, "reference", keep_nan=True)
    _, fit_src = lambda_star_fit(probes)
    _, k_src = minibatch_index(probes)
    nan_points = len(every) - len(pts)
    nums: dict[str, Any] = {"points": len(pts), "fit_source": fit_src, "minibatch_index_source": k_src,
                            "dropped_zero_by_construction": dropped["zero_by_construction"],
                            "nan_points": nan_points, "nan_proxy": dropped["proxy_not_finite"],
                            "nan_optimum": dropped["no_finite_fit"]}
    why_dropped = (f"{dropped['zero_by_construction']} probe(s) on the first minibatch after a rollout left out "
                   f"(the proxy is 0 there by construction); {nan_points} with a NaN proxy or λ_opt, counted")
    if len(pts) < MIN_POINTS or (why := too_few_runs(pts["run"], "(proxy, λ_opt) pairs")):
        why = why if len(pts) >= MIN_POINTS else f"only {len(pts)} (proxy, λ_opt) pair(s)"
        return inconclusive("5", CLAIM_PROXY, f"{why}; {why_dropped}", _absent(len(every)), **nums,
                            **_reading(probes))
    t = tracking(pts)
    worst = _within_k_rho(*(every[c].to_numpy(float) for c in ("fit", "proxy", "k")), worst=True) \
        if nan_points else t["spearman"]
    nums |= t | {"spearman_worst_case_nan": worst}
    g = run_geometry(probes)
    exact, _ = proxy_points(probes, "reference", truth=numeric(probes, geo_key(g, "lambda_star")))
    if len(exact) >= MIN_POINTS:
        nums |= {f"vs_{g}_lambda_star/{k}": v for k, v in tracking(exact).items() if "/" not in k}
    for other in ("least_squares", "fisher"):  # reported beside it, never part of the verdict
        o_pts, _ = proxy_points(probes, other)
        if len(o_pts) >= MIN_POINTS:
            nums |= {f"{other}/{k}": v for k, v in tracking(o_pts).items() if "/" not in k}
    nums |= _rules_against_optimum(probes) | _reading(probes)
    detail = (f"within-minibatch-index Spearman ρ = {t['spearman']:.3g} (run-clustered p = {t['p']:.2g}; interval "
              f"[{t['spearman_lo']:.2g}, {t['spearman_hi']:.2g}]) over {len(pts)} probes of {pts['run'].nunique()} "
              f"runs, against {fit_src}; {why_dropped}")
    if nan_points:
        detail += f" (ρ with them placed worst: {worst:.3g})"
    if "fisher/spearman" in nums:
        detail += f". The curvature-aware fisher proxy: ρ = {nums['fisher/spearman']:.3g} (p = {nums['fisher/p']:.2g})"
    if rules := [k.split("/spearman")[0][len("rules/"):] for k in nums if k.startswith("rules/") and
                 k.endswith("/spearman")]:
        detail += "; each rule's applied λ: " + ", ".join(
            f"{r} ρ = {nums[f'rules/{r}/spearman']:.2g} (p = {nums[f'rules/{r}/p']:.2g}"
            + (f", {n} distinct λ" if (n := nums[f"rules/{r}/distinct_lambdas"]) < 5 else "") + ")" for r in rules)
    if t["spearman"] >= PROXY_RHO_SUPPORTED and t["p"] < PROXY_P and worst >= PROXY_RHO_SUPPORTED:
        return Verdict("5", CLAIM_PROXY, SUPPORTED, nums, detail)
    if t["spearman"] <= PROXY_RHO_NOT:
        return Verdict("5", CLAIM_PROXY, NOT_SUPPORTED, nums, detail)
    return Verdict("5", CLAIM_PROXY, INCONCLUSIVE, nums, detail)


def _rules_against_optimum(probes: pd.DataFrame) -> dict[str, Any]:
    """The λ each coefficient rule's arm (``lambda/rule`` neither off nor fixed) applied at its probes against
    λ_opt, within a minibatch index: ``rules/<arm>/spearman`` with its run-clustered p and interval, sign
    agreement, median |log ratio|, points and the number of distinct λ applied. The applied λ is the probe's
    realised b/a (``diag/realised/weight_u`` over ``weight_g``) for the rules that edit θ_S's update (cosine,
    pcgrad, upgrad, …: their ``lambda/used`` is the MTP head's constant coefficient), else ``lambda/used``."""
    out: dict[str, Any] = {}
    if not {"arm", "lambda/rule", "regime"} <= set(probes):
        return out
    rule = probes["lambda/rule"]
    probes = probes[rule.notna() & ~rule.isin(["off", "fixed"])]
    for arm in sorted(set(probes["arm"].dropna())):
        d = probes[probes["arm"] == arm]
        a, b = numeric(d, "diag/realised/weight_g"), numeric(d, "diag/realised/weight_u")
        # what the rule applied to θ_S, read where proxy_points reads it (a copy: the frame is not changed)
        d = d.assign(**{"lambda/used": (b / a).where(np.isfinite(a) & (a != 0), numeric(d, "lambda/used"))})
        pts, _ = proxy_points(d, "lambda/used", regimes=tuple(set(d["regime"].dropna())))
        if d["lambda/rule"].isin(["reference", "least_squares"]).any():  # λ = 0 on a rollout's first minibatch
            pts = pts[pts["k"] != 0]
        if len(pts) >= MIN_POINTS:
            t = tracking(pts)
            out |= {f"rules/{arm}/{k}": t[k] for k in ("spearman", "p", "spearman_lo", "spearman_hi", "sign_agreement",
                                                        "median_abs_log_ratio")}
            out |= {f"rules/{arm}/points": len(pts), f"rules/{arm}/distinct_lambdas": int(pts["proxy"].nunique())}
    return out


CLAIM_COST = "6. OCC costs negligible time"


def _separate_runs_cost(metrics: pd.DataFrame) -> tuple[float, dict[str, Any], str]:
    """occ/reference over detach from separate runs: the mean over those runs of each run's median
    ``perf/train_s`` (NaN with fewer than ``MIN_RUNS`` of either). Probed steps (those with a probe record,
    ``diag/lr``) are left out; the gradient recorder's per-step work (``diag.every`` > 0) stays in."""
    t = numeric(metrics, "perf/train_s")
    probed = np.isfinite(numeric(metrics, "diag/lr"))
    ok = np.isfinite(t) & ~probed
    d = metrics[ok].assign(_t=t[ok])
    per_run = d.groupby(["arm", "run"])["_t"].median()
    occ, det = per_run.get("occ/reference", pd.Series(dtype=float)), per_run.get("detach", pd.Series(dtype=float))
    nums: dict[str, Any] = {"occ_runs": len(occ), "detach_runs": len(det), "diagnosed_excluded": int(probed.sum())}
    if min(len(occ), len(det)) < MIN_RUNS:
        return math.nan, nums, f"needs ≥ {MIN_RUNS} timed runs of both occ ({len(occ)}) and detach ({len(det)})"
    ratio = float(occ.mean() / det.mean())
    nums |= {"mean_occ_s": float(occ.mean()), "mean_detach_s": float(det.mean()), "ratio": ratio,
             "ratio_sd_over_runs": float(math.sqrt((occ.std(ddof=1) / occ.mean()) ** 2 +
                                                   (det.std(ddof=1) / det.mean()) ** 2) * ratio)}
    detail = (f"train step occ/reference over detach = {ratio:.3g} (per-run medians of separate runs, {len(occ)} and "
              f"{len(det)} runs)")
    pol = per_run[per_run.index.get_level_values("arm").str.startswith("policy")]
    if len(pol) >= MIN_RUNS:  # same graph as occ (MTP into the trunk): isolates the cost of calibrating λ
        nums["ratio_occ_policy"] = float(occ.mean() / pol.mean())
        detail += f"; occ/reference over policy (same graph, fixed λ) = {nums['ratio_occ_policy']:.3g}"
    return ratio, nums, detail


def _interleaved_ratios(cost: dict[str, Any], num: str, den: str) -> tuple[float, float, float, int]:
    """Median and 95% interval over rounds of ``num``'s step time over ``den``'s in the same round."""
    a, b = (np.asarray(cost["arms"][k]["times_s"], dtype=float) for k in (num, den))
    if a.shape != b.shape or not (np.all(np.isfinite(a) & (a > 0)) and np.all(np.isfinite(b) & (b > 0))):
        raise ValueError(f"step cost: {num} and {den} need as many finite positive times ({len(a)} and {len(b)})")
    r = a / b
    lo, hi = median_interval(r)
    return float(np.median(r)), lo, hi, len(r)


def occ_time_cost(metrics: pd.DataFrame, step_cost: dict[str, Any] | None = None) -> Verdict:
    """Claim 6. With ``step_cost`` (``occ cost``: one step of each arm timed round-robin on one minibatch): the
    median over rounds of occ/reference's step time over detach's in the same round, with its distribution-free
    95% interval; supported at a median ≤ ``COST_SUPPORTED`` with the interval's upper end ≤ ``COST_NOT_SUPPORTED``
    (the design excludes a non-negligible cost), not supported when the lower end is above
    ``COST_NOT_SUPPORTED``. Every other arm's ratio to detach (median per round, ``<arm>/ratio``, and total time,
    ``<arm>/mean_ratio``: a rule that pays once per rollout has a cheap median step), occ/reference over the fixed-λ
    policy arms (the same graph as occ: the cost of calibrating λ alone) and the separate runs' ratio are reported
    beside it.
    Without it, separate runs' step times (``_separate_runs_cost``): they also differ by the machine's load while
    each ran, by the responses each policy wrote and by the gradient recorder's per-step work, so a small cost is
    beyond that design."""
    sep_ratio, sep_nums, sep_detail = _separate_runs_cost(metrics)
    if step_cost is None:
        if not math.isfinite(sep_ratio):
            return inconclusive("6", CLAIM_COST, sep_detail, _absent(sep_nums["occ_runs"] * sep_nums["detach_runs"]),
                                **sep_nums)
        detail = sep_detail + (" (separate runs' step times, which also differ by load, response length and the "
                               "recorder's work; `occ cost` times every arm interleaved on one minibatch)")
        verdict = (SUPPORTED if sep_ratio <= COST_SUPPORTED else NOT_SUPPORTED if sep_ratio > COST_NOT_SUPPORTED
                   else INCONCLUSIVE)
        return Verdict("6", CLAIM_COST, verdict, sep_nums, detail)
    arms = step_cost["arms"]
    nums: dict[str, Any] = {"design": "interleaved", "rounds": int(step_cost["rounds"]),
                            "separate_runs_ratio": sep_ratio}
    if "detach" not in arms or "occ/reference" not in arms:
        return inconclusive("6", CLAIM_COST, f"step_cost.json times {sorted(arms)}: needs detach and occ/reference",
                            **nums)
    ratio, lo, hi, n = _interleaved_ratios(step_cost, "occ/reference", "detach")
    nums |= {"ratio": ratio, "ratio_lo": lo, "ratio_hi": hi,
             "median_detach_s": float(np.median(arms["detach"]["times_s"])),
             "median_occ_s": float(np.median(arms["occ/reference"]["times_s"]))}
    others, every = [], []
    for arm in sorted(arms):
        if arm == "detach":
            continue
        nums[f"{arm}/ratio"], *_ = _interleaved_ratios(step_cost, arm, "detach")
        # total time over detach's: a rule that pays once per rollout (real, every rl.coef_every steps) has a cheap
        # median step and a dear mean one
        nums[f"{arm}/mean_ratio"] = float(np.sum(arms[arm]["times_s"]) / np.sum(arms["detach"]["times_s"]))
        if arm != "occ/reference":
            every.append(f"{arm} {nums[f'{arm}/ratio']:.3g} ({nums[f'{arm}/mean_ratio']:.3g})")
        if arm.startswith("policy"):
            nums[f"vs_{arm}/ratio"], *_ = _interleaved_ratios(step_cost, "occ/reference", arm)
            others.append(f"occ/reference over {arm} (same graph, fixed λ) {nums[f'vs_{arm}/ratio']:.3g}")
    detail = (f"one step of each arm round-robin on one minibatch, {n} rounds: occ/reference over detach = {ratio:.3g} "
              f"[{lo:.3g}, {hi:.3g}] (median of per-round ratios, distribution-free 95% interval)")
    if others:
        detail += "; " + ", ".join(others)
    if every:
        detail += "; every other arm over detach, median (total time): " + ", ".join(every)
    if math.isfinite(sep_ratio):
        detail += (f"; separate runs' median step times gave {sep_ratio:.3g} (confounded by load, response length and "
                   "the gradient recorder's per-step work)")
    if not math.isfinite(hi):
        return inconclusive("6", CLAIM_COST, detail + f"; too few rounds ({n}) for an interval", **nums)
    verdict = (SUPPORTED if ratio <= COST_SUPPORTED and hi <= COST_NOT_SUPPORTED else
               NOT_SUPPORTED if lo > COST_NOT_SUPPORTED else INCONCLUSIVE)
    return Verdict("6", CLAIM_COST, verdict, nums, detail)


SEPARATE_ARM = "detach/separate"
"""The clip's remedy: detach with θ_S and θ_M clipped apart (``rl.clip_scope: separate``)."""


def evaluate_claims(metrics: pd.DataFrame, probes: pd.DataFrame, evals: pd.DataFrame,
                    sft_evals: pd.DataFrame | None = None, step_cost: dict[str, Any] | None = None
                    ) -> tuple[list[Verdict], dict[str, Any]]:
    """Every verdict, in order (1a, 1b, clip, 2, 3, 4, forgetting, length, 5, 6, 7), and the learning check behind 4
    and 7.
    ``step_cost``: ``occ cost``'s interleaved step times, the design claim 6 is judged on when given."""
    sft_evals = sft_evals if sft_evals is not None else evals.iloc[0:0]
    learn = outcome.learning(evals, sft_evals)
    remedy = None
    if {SEPARATE_ARM, "detach"} <= set(evals["arm"].dropna()):
        remedy = outcome.arm_difference(evals, SEPARATE_ARM, "detach", outcome.primary_metric(evals))
    return [claims_curve.local_quadratic(probes), claims_curve.wide_interior_maximum(probes),
            claims_curve.clip_coupling(probes, metrics, remedy), ce_penalty_dominates(probes),
            policy_corr_decays(probes), outcome.occ_matches_detach(evals, learn, sft_evals),
            outcome.forgetting(evals, sft_evals), outcome.length_generalisation(evals, sft_evals),
            proxy_tracks_lambda_star(probes), occ_time_cost(metrics, step_cost),
            outcome.accuracy_vs_lambda(evals, learn)], learn
