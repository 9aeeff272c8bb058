"""Held-out outcomes: the per-arm table, whether the baseline learned, and the two outcome claims.

Sampled accuracy (``mean_at_k``, mean@k) is the primary held-out metric; greedy pass@1 is reported
beside it (``greedy_acc``); where no run logged ``mean_at_k``, greedy is primary and the numbers say
so (``metric``). A run's accuracy is the mean over suites of its ``eval.json``; a NaN suite accuracy makes it
NaN (never a mean over fewer suites), and a claim reading it says so and is inconclusive.

* ``learning``: the baseline arm (``detach`` where its runs were evaluated, else ``off``) and its held-out gain
  over the SFT checkpoint each run started from, on the
  suites RL trained on (``task.suites``), with its seed-to-seed spread (sd over seeds). A gain not
  above its spread is "no learning": claims about what helps or hurts learning (4 and 7) are then
  ``inconclusive: no learning`` (docs/theory.md section 6). Without the SFT checkpoint's ``eval.json``
  (``occ eval CHECKPOINT``) learning cannot be checked, and those claims are inconclusive.
* Claim 4, non-inferiority of OCC (and of every other coefficient rule, reported) against detach (``off`` when
  no detach arm) on the suites RL trains on, paired by seed, with a margin relative to detach's own gain there
  and the SFT checkpoint as a negative control that must read not supported.
* Claim 7, final accuracy against a fixed λ per MTP loss (ce, policy), the baseline standing at λ = 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from .frames import arm_order, numeric, suites_in
from .stats import interval, noninferiority
from .verdict import (
    INCONCLUSIVE,
    MIN_RUNS,
    NO_LEARNING,
    NOT_SUPPORTED,
    SUPPORTED,
    Verdict,
    combine,
    not_measured,
)

PRIMARY, BESIDE = "mean_at_k", "greedy_acc"
MARGIN_SHARE = 0.2
"""Claim 4: an arm may be worse than detach on the RL suites by at most this share of detach's own gain there over
the SFT checkpoint (one-sided 95% t bound): a margin stated relative to what RL moves the metric."""
BASELINE_ARMS = ("detach", "off")
"""The baseline, in order of preference: detach (what claim 4 compares against), else off. They differ under a
global clip, where detach's θ_M gradient enters the clip's norm."""
CONTROL_ARM = "sft"
"""The negative control of claim 4: the SFT checkpoint itself, entered as an arm; the design must call it worse."""
LAMBDA_LOSSES = ("ce", "policy")
MIN_LAMBDAS = 2
"""Claim 7: at least this many fixed λ > 0 per loss, each with ``MIN_RUNS`` seeds."""
CLAIM_OCC = "4. OCC matches or beats detach on the held-out suites RL trains on"
CLAIM_LAMBDA = "7. final accuracy is concave in a fixed λ, with an interior maximum"

THRESHOLDS = {
    "4": f"non-inferiority on the RL suites: one-sided 95% t lower bound (n_seeds − 1 df, paired by seed) of "
         f"arm − detach in sampled accuracy > −margin, margin = {MARGIN_SHARE:g} × detach's gain there over the SFT "
         f"checkpoint: supported; upper bound < −margin: not supported; at least {MIN_RUNS} paired seeds; the SFT "
         "checkpoint entered as an arm (the negative control) must read not supported, else the design cannot tell "
         "and the claim is inconclusive; a NaN suite accuracy makes its arm inconclusive; inconclusive: no learning "
         "when the baseline did not learn; the six-suite mean and the other suites (forgetting) are reported beside",
    "forgetting": "baseline − SFT checkpoint on the suites RL does not train on (length_gen apart), paired by seed, "
                  "one-sided 95% t bounds: supported when the upper bound is below 0, not supported when the lower "
                  "is above 0; every arm − baseline reported",
    "length": "baseline − SFT checkpoint on length_gen, paired by seed: supported when a one-sided 95% bound "
              "excludes 0; every arm − baseline reported",
    "7": f"per MTP loss, quadratic in λ through the baseline (λ = 0) and ≥ {MIN_LAMBDAS} fixed λ with ≥ {MIN_RUNS} "
         "seeds each: supported if the curvature's 95% seed-bootstrap interval is below 0 and the maximum inside "
         "the λ range; not supported if the interval is above 0; a NaN accuracy makes it inconclusive; "
         "inconclusive: no learning when the baseline did not learn",
}


def primary_metric(evals: pd.DataFrame) -> str:
    return PRIMARY if np.isfinite(numeric(evals, PRIMARY)).any() else BESIDE


def _select(evals: pd.DataFrame, trained_only: bool | None, suites: list[str] | None) -> pd.DataFrame:
    d = evals
    if trained_only is True:
        d = d[d["trained"].astype(bool)]
    elif trained_only is False:  # the suites RL did not train on: forgetting
        d = d[~d["trained"].astype(bool)]
    if suites is not None:
        d = d[d["suite"].isin(suites)]
    return d


def run_accuracy(evals: pd.DataFrame, metric: str, trained_only: bool | None = None,
                 suites: list[str] | None = None) -> pd.DataFrame:
    """One row per run: ``run``, ``arm``, ``regime``, ``seed``, ``mtp_coef``, ``acc``: the mean of ``metric`` over its
    suites (those RL trained on when ``trained_only`` is True, the others when False, or ``suites``). A run with a
    NaN accuracy on any of those suites gets a NaN ``acc``: it is never averaged over fewer suites
    (``nan_suites`` names them)."""
    d = _select(evals, trained_only, suites)
    cols = ["run", "arm", "regime", "seed", "mtp_coef"]
    if d.empty:
        return pd.DataFrame(columns=[*cols, "acc"])
    d = d.assign(_v=numeric(d, metric))
    return (d.groupby(cols, as_index=False, dropna=False)["_v"].agg(lambda v: v.mean(skipna=False))
            .rename(columns={"_v": "acc"}))


def nan_suites(evals: pd.DataFrame, metric: str, trained_only: bool | None = None,
               suites: list[str] | None = None) -> list[str]:
    """``run:suite`` for every selected suite accuracy that is NaN."""
    d = _select(evals, trained_only, suites)
    bad = d[~np.isfinite(numeric(d, metric))]
    return [f"{r}:{s}" for r, s in zip(bad["run"], bad["suite"])]


def _stat(v: pd.Series) -> dict[str, float]:
    v = v.dropna()
    return {"mean": float(v.mean()) if len(v) else math.nan,
            "sd": float(v.std(ddof=1)) if len(v) > 1 else math.nan, "n": len(v)}


def held_out_table(evals: pd.DataFrame, sft_evals: pd.DataFrame) -> dict[str, Any]:
    """Per arm (and ``sft``, once per distinct checkpoint), per suite and for the ``mean`` over suites:
    ``{metric: {"mean", "sd", "n"}}`` for sampled and greedy accuracy, n counting runs (seeds)."""
    sft = sft_evals.drop_duplicates(["init", "suite"]).assign(run=lambda d: d["init"])
    both = pd.concat([evals, sft], ignore_index=True) if len(sft) else evals
    suites = suites_in(set(both["suite"]))
    table: dict[str, Any] = {}
    for arm in [*arm_order(evals["arm"].dropna()), *(["sft"] if len(sft) else [])]:
        d = both[both["arm"] == arm]
        entry = {s: {m: _stat(numeric(d[d["suite"] == s], m)) for m in (PRIMARY, BESIDE)}
                 for s in suites if (d["suite"] == s).any()}
        entry["mean"] = {m: _stat(d.groupby("run")[m].agg(lambda v: v.mean(skipna=False))) for m in (PRIMARY, BESIDE)}
        table[arm] = entry
    return {"primary": primary_metric(both), "suites": suites, "arms": table}


def learning(evals: pd.DataFrame, sft_evals: pd.DataFrame) -> dict[str, Any]:
    """The baseline's held-out gain over the SFT checkpoint (see the module docstring)."""
    metric = primary_metric(evals)
    base = next((a for a in BASELINE_ARMS if (evals["arm"] == a).any()), None)
    out: dict[str, Any] = {"baseline_arm": base, "metric": metric, "baseline_gain": math.nan,
                           "baseline_spread": math.nan, "seeds": 0, "learned": None}
    if base is None:
        return out | {"reason": f"no evaluated baseline run ({' or '.join(BASELINE_ARMS)})"}
    runs = run_accuracy(evals[evals["arm"] == base], metric, trained_only=True)
    start = run_accuracy(sft_evals[sft_evals["run"].isin(runs["run"])], metric, trained_only=True)
    if start.empty:
        return out | {"reason": f"no eval.json in the SFT checkpoint the {base} runs started from, rl.init: "
                                "write it with occ eval CHECKPOINT"}
    gain = runs.set_index("run")["acc"] - start.set_index("run")["acc"].reindex(runs["run"]).to_numpy()
    if nans := nan_suites(evals[evals["arm"] == base], metric, trained_only=True):
        return out | {"nan": nans, "reason": f"{base} has a NaN {metric} on an RL suite ({', '.join(nans)}): its "
                                             "gain is not averaged over fewer suites"}
    gain = gain.dropna()  # runs whose SFT checkpoint has no evaluation
    trained = sorted(set(evals.loc[(evals["arm"] == base) & evals["trained"].astype(bool), "suite"]))
    out |= {"baseline_gain": float(gain.mean()), "baseline_spread": float(gain.std(ddof=1)) if len(gain) > 1 else math.nan,
            "seeds": len(gain), "suites": suites_in(trained),
            "sft_accuracy": float(start["acc"].mean()), "baseline_accuracy": float(runs["acc"].mean())}
    if len(gain) < 2:
        return out | {"reason": f"{len(gain)} {base} seed(s) with an SFT evaluation: no seed-to-seed spread"}
    out["learned"] = bool(out["baseline_gain"] > out["baseline_spread"])
    out["reason"] = (f"{base} gained {out['baseline_gain']:+.3g} {metric} over the SFT checkpoint on the RL suites, "
                     f"seed-to-seed sd {out['baseline_spread']:.2g} over {len(gain)} seeds")
    return out


def _learning_gate(learn: dict[str, Any]) -> tuple[str, str] | None:
    """(verdict, why) when claims about learning cannot be judged, else None."""
    if learn["learned"] is None:
        return INCONCLUSIVE, f"cannot tell whether the baseline learned: {learn['reason']}"
    if not learn["learned"]:
        return NO_LEARNING, learn["reason"] + ": within its spread"
    return None


def arm_difference(evals: pd.DataFrame, arm: str, ref: str, metric: str, trained_only: bool | None = True,
                   margin: float = math.nan, suites: list[str] | None = None) -> dict[str, Any]:
    """``noninferiority`` of ``arm`` − ``ref`` in per-seed accuracy (mean over the suites RL trained on, the other
    suites when ``trained_only`` is False, every suite when None; only ``suites`` when given), paired by seed, with
    ``nan``: the NaN suite accuracies that make a seed's value NaN (a NaN difference leaves the result NaN rather
    than fewer seeds)."""
    sel = evals[evals["arm"].isin([arm, ref])]
    acc = run_accuracy(sel, metric, trained_only, suites).groupby(["arm", "seed"])["acc"].agg(
        lambda v: v.mean(skipna=False))
    a, b = acc.get(arm, pd.Series(dtype=float)), acc.get(ref, pd.Series(dtype=float))
    seeds = sorted(set(a.index) & set(b.index))
    diff = (a[seeds] - b[seeds]).to_numpy()
    nans = nan_suites(sel, metric, trained_only, suites)
    out = noninferiority(diff if not nans else np.array([math.nan] * len(seeds)), margin)
    return out | {"nan": len(nans), "nan_suites": nans}


def control_difference(evals: pd.DataFrame, sft_evals: pd.DataFrame, ref: str, metric: str,
                       margin: float, trained_only: bool | None = True, suites: list[str] | None = None
                       ) -> dict[str, Any]:
    """The SFT checkpoint each ``ref`` run started from, entered as an arm: its accuracy (on the RL suites by
    default) minus each ``ref`` seed's, paired with that seed (claim 4's negative control; forgetting)."""
    runs = run_accuracy(evals[evals["arm"] == ref], metric, trained_only=trained_only, suites=suites)
    start = run_accuracy(sft_evals[sft_evals["run"].isin(runs["run"])], metric, trained_only=trained_only,
                         suites=suites)
    paired = runs.merge(start[["run", "acc"]], on="run", suffixes=("", "_sft"))
    return noninferiority((paired["acc_sft"] - paired["acc"]).to_numpy(), margin)


def _judge(ni: dict[str, Any], margin: float) -> str:
    if ni.get("nan") or not math.isfinite(ni["lower"]) or ni["n"] < MIN_RUNS:
        return INCONCLUSIVE
    return SUPPORTED if ni["lower"] > -margin else NOT_SUPPORTED if ni["upper"] < -margin else INCONCLUSIVE


def tested_arms(evals: pd.DataFrame, ref: str) -> list[str]:
    """Every arm but the baseline and the fixed-λ ones: the coefficient rules (``occ/…``, ``real``, ``cosine``, …)."""
    return [a for a in arm_order(evals["arm"].dropna()) if a != ref and a.split("@")[0] not in LAMBDA_LOSSES]


def occ_matches_detach(evals: pd.DataFrame, learn: dict[str, Any], sft_evals: pd.DataFrame | None = None
                       ) -> Verdict:
    """Claim 4 on the suites RL trains on: per rule arm (``tested_arms``), ``noninferiority`` of arm − detach in
    per-seed sampled accuracy, paired by seed, with the margin ``MARGIN_SHARE`` × detach's gain there; greedy, the
    six-suite mean and the other suites (forgetting) beside it. The verdict is that of ``occ/reference`` (the
    published proxy) where it ran, else of the first occ arm; the others are reported. The SFT checkpoint, entered
    as an arm (``sft_evals``), is the negative control: unless it reads not supported, the design cannot tell a
    trained arm from an untrained one and the claim is inconclusive."""
    ref = next((a for a in ("detach", "off") if (evals["arm"] == a).any()), None)
    arms = tested_arms(evals, ref) if ref is not None else []
    occ_arms = [a for a in arms if a.startswith("occ/")]
    if ref is None or not occ_arms:
        return not_measured("4", CLAIM_OCC, "needs eval.json from occ runs and from detach (or off) runs")
    metric = primary_metric(evals)
    judged = "occ/reference" if "occ/reference" in occ_arms else occ_arms[0]
    gain = learn.get("baseline_gain", math.nan) if learn.get("baseline_arm") == ref else math.nan
    if not math.isfinite(gain) and sft_evals is not None and len(sft_evals):  # the comparator's own gain
        gain = -control_difference(evals, sft_evals, ref, metric, math.nan)["diff"]
    margin = MARGIN_SHARE * gain if math.isfinite(gain) and gain > 0 else math.nan
    nums: dict[str, Any] = {"comparator": ref, "judged_arm": judged, "metric": metric, "suites": "RL suites",
                            "margin": margin, "margin_share_of_gain": MARGIN_SHARE, "baseline_gain": gain}
    verdicts = {}
    for arm in arms:
        prefix = "" if arm == judged else f"{arm}/"
        ni = arm_difference(evals, arm, ref, metric, True, margin)
        verdicts[arm] = _judge(ni, margin)
        nums |= {f"{prefix}{k}": ni[k] for k in ("n", "diff", "se", "lower", "upper", "mdd", "nan")}
        nums[f"{prefix}verdict"] = verdicts[arm]
        nums[f"{prefix}greedy_diff"] = arm_difference(evals, arm, ref, BESIDE, True)["diff"]
        nums[f"{prefix}all_suites_diff"] = arm_difference(evals, arm, ref, metric, None)["diff"]
        nums[f"{prefix}forgetting_diff"] = arm_difference(evals, arm, ref, metric, False)["diff"]
        if ni["nan"]:
            nums[f"{prefix}nan_suites"] = ", ".join(ni["nan_suites"])
    control = {"n": 0}
    if sft_evals is not None and len(sft_evals):
        control = control_difference(evals, sft_evals, ref, metric, margin)
        nums |= {f"control_sft/{k}": control[k] for k in ("n", "diff", "lower", "upper")}
        nums["control_sft/verdict"] = _judge(control | {"nan": 0}, margin)
    n, lower, upper = nums["n"], nums["lower"], nums["upper"]
    detail = (f"{judged} − {ref} = {nums['diff']:+.3g} {metric} on the RL suites (paired by seed, n = {n}); one-sided "
              f"95% bounds [{lower:+.3g}, {upper:+.3g}] against the margin −{margin:.3g} ({MARGIN_SHARE:.0%} of "
              f"{ref}'s gain {gain:+.3g}); the design detects {nums['mdd']:.2g} with 80% power")
    others = [a for a in arms if a != judged]
    if others:
        detail += "; " + ", ".join(f"{a} {nums[f'{a}/diff']:+.3g} ({verdicts[a]})" for a in others)
    if "control_sft/verdict" in nums:
        detail += f"; the SFT checkpoint as an arm (negative control): {nums['control_sft/diff']:+.3g}, "                   f"{nums['control_sft/verdict']}"
    if nums.get("nan"):
        return Verdict("4", CLAIM_OCC, INCONCLUSIVE, nums, f"{judged} has a NaN {metric} ({nums['nan_suites']}): "
                       f"not averaged over fewer suites; {detail}")
    if n < MIN_RUNS:
        return Verdict("4", CLAIM_OCC, INCONCLUSIVE, nums, f"only {n} seed(s) paired between {judged} and {ref}; at "
                       f"least {MIN_RUNS} are needed")
    if gate := _learning_gate(learn):
        return Verdict("4", CLAIM_OCC, gate[0], nums, f"{gate[1]}; {detail}")
    if nums.get("control_sft/verdict", NOT_SUPPORTED) != NOT_SUPPORTED:
        return Verdict("4", CLAIM_OCC, INCONCLUSIVE, nums, "the design cannot tell the untrained SFT checkpoint from "
                       f"{ref} (negative control: {nums['control_sft/verdict']}); {detail}")
    return Verdict("4", CLAIM_OCC, verdicts[judged], nums, detail)


LENGTH_SUITE = "length_gen"
"""The evaluation-only suite of longer problems than any trained on."""
CLAIM_FORGET = "forgetting. RL on its suites costs held-out accuracy on the suites it does not train on"
CLAIM_LENGTH = "length. RL moves accuracy on longer problems than any trained on (length_gen)"


def _against_sft(evals: pd.DataFrame, sft_evals: pd.DataFrame, suites: list[str], claim_id: str, claim: str,
                 worse_is_support: bool) -> Verdict:
    """The baseline against the SFT checkpoint it started from on ``suites`` (paired by seed, one-sided 95% t bounds),
    and every other arm against the baseline there, as numbers. ``worse_is_support``: the claim is that the baseline
    is worse than the checkpoint (forgetting); else that it differs from it (either sign)."""
    ref = next((a for a in BASELINE_ARMS if (evals["arm"] == a).any()), None)
    if ref is None or not suites or sft_evals is None or not len(sft_evals):
        return not_measured(claim_id, claim, "needs the baseline's eval.json, the SFT checkpoint's, and the suites")
    metric = primary_metric(evals)
    d = control_difference(evals, sft_evals, ref, metric, math.nan, None, suites)  # SFT − baseline
    # 0.0 − x, never −x: a difference of 0 is stored and printed as 0, not −0
    nums: dict[str, Any] = {"suites": ", ".join(suites), "baseline": ref, "metric": metric, "n": d["n"],
                            "baseline_minus_sft": 0.0 - d["diff"], "lower": 0.0 - d["upper"], "upper": 0.0 - d["lower"]}
    for arm in arm_order(evals["arm"].dropna()):
        if arm != ref:
            nums[f"{arm}/minus_{ref}"] = arm_difference(evals, arm, ref, metric, None, suites=suites)["diff"] + 0.0
    detail = (f"{ref} − the SFT checkpoint on {', '.join(suites)}: {nums['baseline_minus_sft']:+.3g} {metric} "
              f"(one-sided 95% bounds [{nums['lower']:+.3g}, {nums['upper']:+.3g}], n = {d['n']}); each arm − {ref}: "
              + ", ".join(f"{k.split('/minus_')[0]} {v:+.3g}" for k, v in nums.items() if "/minus_" in k))
    if nans := nan_suites(pd.concat([evals[evals["arm"] == ref], sft_evals]), metric, None, suites):
        nums |= {"nan": len(nans), "nan_suites": nans}
        return Verdict(claim_id, claim, INCONCLUSIVE, nums, f"a NaN {metric} ({', '.join(nans)}): not averaged over "
                       f"fewer suites; {detail}")
    if d["n"] < MIN_RUNS or not math.isfinite(nums["lower"]):
        return Verdict(claim_id, claim, INCONCLUSIVE, nums, f"too few seeds; {detail}")
    scores = pd.concat([evals.loc[evals["suite"].isin(suites), metric], sft_evals.loc[sft_evals["suite"].isin(suites),
                                                                                       metric]]).astype(float)
    if len(scores) and (scores == 0).all():  # a floor: no arm and no seed solves one problem, nothing can move
        nums["at_floor"] = True
        return Verdict(claim_id, claim, INCONCLUSIVE, nums, f"every run and the SFT checkpoint score 0 on "
                       f"{', '.join(suites)}: the suite is at its floor, so no difference can show; {detail}")
    if worse_is_support:
        verdict = SUPPORTED if nums["upper"] < 0 else NOT_SUPPORTED if nums["lower"] > 0 else INCONCLUSIVE
    else:
        verdict = SUPPORTED if nums["lower"] > 0 or nums["upper"] < 0 else INCONCLUSIVE
    return Verdict(claim_id, claim, verdict, nums, detail)


def forgetting(evals: pd.DataFrame, sft_evals: pd.DataFrame) -> Verdict:
    """Forgetting, a row of its own: the baseline against the SFT checkpoint on the suites RL does not train on
    (length generalisation apart); supported when even the upper bound is below 0."""
    others = sorted(set(evals.loc[~evals["trained"].astype(bool), "suite"]) - {LENGTH_SUITE}) if len(evals) else []
    return _against_sft(evals, sft_evals, suites_in(others), "forgetting", CLAIM_FORGET, worse_is_support=True)


def length_generalisation(evals: pd.DataFrame, sft_evals: pd.DataFrame) -> Verdict:
    """Length generalisation, a row of its own: the baseline against the SFT checkpoint on ``length_gen``; supported
    when the interval excludes 0 (either sign)."""
    has = len(evals) and (evals["suite"] == LENGTH_SUITE).any()
    return _against_sft(evals, sft_evals, [LENGTH_SUITE] if has else [], "length", CLAIM_LENGTH,
                        worse_is_support=False)


def _quadratic(lam: np.ndarray, acc: np.ndarray) -> tuple[float, float]:
    """Curvature c of ``acc ≈ a + b·λ + c·λ²`` (least squares) and the λ of its maximum (NaN unless c < 0)."""
    c, b, _ = np.polyfit(lam, acc, 2)
    return float(c), float(-b / (2 * c)) if c < 0 else math.nan


def lambda_points(evals: pd.DataFrame, loss: str, baseline: str | None) -> pd.DataFrame:
    """Per-seed final accuracy (primary metric, every suite) of the fixed-λ arms of ``loss`` and of the baseline at
    λ = 0: columns ``arm``, ``seed``, ``lam``, ``acc`` (NaN where a suite accuracy is)."""
    acc = run_accuracy(evals, primary_metric(evals))
    pts = acc[acc["regime"] == loss].assign(lam=lambda d: pd.to_numeric(d["mtp_coef"], errors="coerce"))
    if baseline is not None:
        pts = pd.concat([acc[acc["arm"] == baseline].assign(lam=0.0), pts], ignore_index=True)
    return pts[np.isfinite(pts["lam"].astype(float))][["arm", "seed", "lam", "acc"]].astype({"lam": float, "acc": float})


def accuracy_vs_lambda(evals: pd.DataFrame, learn: dict[str, Any], seed: int = 0) -> Verdict:
    """Claim 7: per loss in ``LAMBDA_LOSSES``, the curvature of final accuracy in λ (quadratic fit through the
    per-seed points, the baseline at λ = 0) with a 95% interval from resampling seeds within each arm, and
    the λ of the maximum (of the fit, and the best arm)."""
    base = learn.get("baseline_arm")
    nums: dict[str, Any] = {"baseline_at_0": base}
    parts, notes, judged = [], [], False
    for loss in LAMBDA_LOSSES:
        pts = lambda_points(evals, loss, base)
        if (bad := int((~np.isfinite(pts["acc"].astype(float))).sum())) and (pts["lam"] > 0).any():
            parts.append(INCONCLUSIVE)
            notes.append(f"{loss}: {bad} run(s) with a NaN suite accuracy, not averaged over fewer suites")
            nums[f"{loss}/nan_runs"] = bad
            continue
        per_lam = pts.groupby("lam")["acc"].agg(["mean", "count"])
        lams = [x for x in per_lam.index if x > 0]
        enough = [x for x in lams if per_lam.loc[x, "count"] >= MIN_RUNS]
        nums[f"{loss}/lambdas"] = len(lams)
        if not lams:
            continue
        if len(enough) < MIN_LAMBDAS or base is None or per_lam["count"].get(0.0, 0) < MIN_RUNS:
            parts.append(INCONCLUSIVE)
            notes.append(f"{loss}: {len(enough)} λ > 0 with ≥ {MIN_RUNS} seeds (and the baseline at λ = 0); "
                         f"{MIN_LAMBDAS} are needed")
            continue
        curv, lam_max = _quadratic(pts["lam"].to_numpy(), pts["acc"].to_numpy())
        rng = np.random.default_rng(seed)
        groups = [g for _, g in pts.groupby("lam")]
        boot = np.array([_quadratic(*np.concatenate([g[["lam", "acc"]].to_numpy()[rng.integers(0, len(g), len(g))]
                                                     for g in groups]).T)[0] for _ in range(1000)])
        lo, hi = interval(boot)
        interior = math.isfinite(lam_max) and 0 < lam_max < max(lams)
        judged = True
        nums |= {f"{loss}/curvature": curv, f"{loss}/curvature_lo": lo, f"{loss}/curvature_hi": hi,
                 f"{loss}/lambda_max_fit": lam_max, f"{loss}/best_lambda": float(per_lam["mean"].idxmax()),
                 f"{loss}/best_accuracy": float(per_lam["mean"].max())}
        parts.append(SUPPORTED if hi < 0 and interior else NOT_SUPPORTED if lo > 0 else INCONCLUSIVE)
        where = f"maximum of the fit at λ = {lam_max:.3g}" if math.isfinite(lam_max) else "no maximum (convex fit)"
        notes.append(f"{loss}: curvature {curv:.3g} [{lo:.3g}, {hi:.3g}], {where}, best arm λ = "
                     f"{nums[f'{loss}/best_lambda']:g}")
    if not parts:
        return not_measured("7", CLAIM_LAMBDA, "no fixed-λ ce or policy arm with an eval.json", **nums)
    detail = "; ".join(notes)
    if judged and (gate := _learning_gate(learn)):
        return Verdict("7", CLAIM_LAMBDA, gate[0], nums, f"{gate[1]}; {detail}")
    return Verdict("7", CLAIM_LAMBDA, combine(parts), nums, detail)
