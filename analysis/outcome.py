"""Held-out outcomes: the per-arm table, whether the baseline learned, and the two outcome claims.

Sampled accuracy (``mean_at_k``, mean@k) is the primary held-out metric; greedy pass@1 is reported
beside it (``greedy_acc``); where no run logged ``mean_at_k``, greedy is primary and the numbers say
so (``metric``). A run's accuracy is the mean over suites of its ``eval.json``.

* ``learning``: the baseline arm (``off`` where its runs were evaluated, else ``detach``: both train
  the policy identically) and its held-out gain over the SFT checkpoint each run started from, on the
  suites RL trained on (``task.suites``), with its seed-to-seed spread (sd over seeds). A gain not
  above its spread is "no learning": claims about what helps or hurts learning (4 and 7) are then
  ``inconclusive: no learning`` (docs/theory.md section 6). Without the SFT checkpoint's ``eval.json``
  (``occ eval CHECKPOINT``) learning cannot be checked, and those claims are inconclusive.
* Claim 4, non-inferiority of OCC against detach (``off`` when no detach arm), paired by seed.
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
    inconclusive,
)

PRIMARY, BESIDE = "mean_at_k", "greedy_acc"
NONINFERIORITY_MARGIN = 0.02
"""Claim 4: OCC may be worse than detach by at most 0.02 absolute accuracy (one-sided 95% t bound)."""
BASELINE_ARMS = ("off", "detach")
LAMBDA_LOSSES = ("ce", "policy")
MIN_LAMBDAS = 2
"""Claim 7: at least this many fixed λ > 0 per loss, each with ``MIN_RUNS`` seeds."""
CLAIM_OCC = "4. OCC matches or beats detach on the held-out suites"
CLAIM_LAMBDA = "7. final accuracy is concave in a fixed λ, with an interior maximum"

THRESHOLDS = {
    "4": f"non-inferiority: one-sided 95% t lower bound (n_seeds − 1 df, paired by seed) of occ − detach in sampled "
         f"accuracy > −{NONINFERIORITY_MARGIN}: supported; upper bound < −{NONINFERIORITY_MARGIN}: not supported; "
         f"at least {MIN_RUNS} paired seeds; inconclusive: no learning when the baseline did not learn",
    "7": f"per MTP loss, quadratic in λ through the baseline (λ = 0) and ≥ {MIN_LAMBDAS} fixed λ with ≥ {MIN_RUNS} "
         "seeds each: supported if the curvature's 95% seed-bootstrap interval is below 0 and the maximum inside "
         "the λ range; not supported if the interval is above 0; inconclusive: no learning when the baseline did not learn",
}


def primary_metric(evals: pd.DataFrame) -> str:
    return PRIMARY if np.isfinite(numeric(evals, PRIMARY)).any() else BESIDE


def run_accuracy(evals: pd.DataFrame, metric: str, trained_only: bool = False,
                 suites: list[str] | None = None) -> pd.DataFrame:
    """One row per run: ``run``, ``arm``, ``regime``, ``seed``, ``mtp_coef``, ``acc`` (mean of ``metric`` over its
    suites: those RL trained on when ``trained_only``, or ``suites``)."""
    d = evals[np.isfinite(numeric(evals, metric))]
    if trained_only:
        d = d[d["trained"].astype(bool)]
    if suites is not None:
        d = d[d["suite"].isin(suites)]
    cols = ["run", "arm", "regime", "seed", "mtp_coef"]
    if d.empty:
        return pd.DataFrame(columns=[*cols, "acc"])
    return d.groupby(cols, as_index=False, dropna=False)[metric].mean().rename(columns={metric: "acc"})


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
        entry["mean"] = {m: _stat(d.groupby("run")[m].mean()) for m in (PRIMARY, BESIDE)}
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
        return out | {"reason": f"no eval.json in the SFT checkpoint the {base} runs started from (rl.init; "
                                "write it with occ eval CHECKPOINT)"}
    gain = runs.set_index("run")["acc"] - start.set_index("run")["acc"]
    gain = gain.dropna()
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


def occ_matches_detach(evals: pd.DataFrame, learn: dict[str, Any]) -> Verdict:
    """Claim 4: per occ arm, ``noninferiority`` of occ − detach in per-seed sampled accuracy (mean over the
    suites both evaluated), paired by seed, greedy beside it. The verdict is that of ``occ/reference`` (the
    published proxy) where it ran, else of the first occ arm; the others are reported."""
    ref = next((a for a in ("detach", "off") if (evals["arm"] == a).any()), None)
    occ_arms = arm_order(a for a in evals["arm"].dropna() if str(a).startswith("occ/"))
    if ref is None or not occ_arms:
        return inconclusive("4", CLAIM_OCC, "needs eval.json from occ runs and from detach (or off) runs")
    metric = primary_metric(evals)
    judged = "occ/reference" if "occ/reference" in occ_arms else occ_arms[0]
    nums: dict[str, Any] = {"comparator": ref, "judged_arm": judged, "metric": metric, "margin": NONINFERIORITY_MARGIN}
    for arm in occ_arms:
        sel = evals[evals["arm"].isin([arm, ref])]
        suites = sorted(set.intersection(*sel.groupby("run")["suite"].apply(set)))
        prefix = "" if arm == judged else f"{arm}/"
        for m, tag in ((metric, ""), (BESIDE, "greedy_")):
            acc = run_accuracy(sel, m, suites=suites).groupby(["arm", "seed"])["acc"].mean()
            a, b = acc.get(arm, pd.Series(dtype=float)), acc.get(ref, pd.Series(dtype=float))
            seeds = sorted(set(a.index) & set(b.index))
            ni = noninferiority((a[seeds] - b[seeds]).to_numpy(), NONINFERIORITY_MARGIN)
            keys = ("n", "diff", "se", "lower", "upper", "mdd") if not tag else ("diff", "lower")
            nums |= {f"{prefix}{tag}{k}": ni[k] for k in keys}
        nums[f"{prefix}suites"] = len(suites)
    n, lower, upper = nums["n"], nums["lower"], nums["upper"]
    detail = (f"{judged} − {ref} = {nums['diff']:+.3g} {metric} (paired by seed, n = {n}); one-sided 95% bounds "
              f"[{lower:+.3g}, {upper:+.3g}] against the margin −{NONINFERIORITY_MARGIN}; the design detects "
              f"{nums['mdd']:.2g} with 80% power")
    if n < MIN_RUNS:
        return Verdict("4", CLAIM_OCC, INCONCLUSIVE, nums, f"only {n} seed(s) paired between {judged} and {ref}; at "
                       f"least {MIN_RUNS} are needed")
    if gate := _learning_gate(learn):
        return Verdict("4", CLAIM_OCC, gate[0], nums, f"{gate[1]}; {detail}")
    verdict = SUPPORTED if lower > -NONINFERIORITY_MARGIN else NOT_SUPPORTED if upper < -NONINFERIORITY_MARGIN \
        else INCONCLUSIVE
    return Verdict("4", CLAIM_OCC, verdict, nums, detail)


def _quadratic(lam: np.ndarray, acc: np.ndarray) -> tuple[float, float]:
    """Curvature c of ``acc ≈ a + b·λ + c·λ²`` (least squares) and the λ of its maximum (NaN unless c < 0)."""
    c, b, _ = np.polyfit(lam, acc, 2)
    return float(c), float(-b / (2 * c)) if c < 0 else math.nan


def lambda_points(evals: pd.DataFrame, loss: str, baseline: str | None) -> pd.DataFrame:
    """Per-seed final accuracy (primary metric) of the fixed-λ arms of ``loss`` and of the baseline at λ = 0:
    columns ``arm``, ``seed``, ``lam``, ``acc``."""
    acc = run_accuracy(evals, primary_metric(evals))
    pts = acc[acc["regime"] == loss].assign(lam=lambda d: pd.to_numeric(d["mtp_coef"], errors="coerce"))
    if baseline is not None:
        pts = pd.concat([acc[acc["arm"] == baseline].assign(lam=0.0), pts], ignore_index=True)
    return pts[np.isfinite(pts["lam"])][["arm", "seed", "lam", "acc"]]


def accuracy_vs_lambda(evals: pd.DataFrame, learn: dict[str, Any], seed: int = 0) -> Verdict:
    """Claim 7: per loss in ``LAMBDA_LOSSES``, the curvature of final accuracy in λ (quadratic fit through the
    per-seed points, the baseline at λ = 0) with a 95% interval from resampling seeds within each arm, and
    the λ of the maximum (of the fit, and the best arm)."""
    base = learn.get("baseline_arm")
    nums: dict[str, Any] = {"baseline_at_0": base}
    parts, notes, judged = [], [], False
    for loss in LAMBDA_LOSSES:
        pts = lambda_points(evals, loss, base)
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
        return inconclusive("7", CLAIM_LAMBDA, "no fixed-λ ce or policy arm with an eval.json", **nums)
    detail = "; ".join(notes)
    if judged and (gate := _learning_gate(learn)):
        return Verdict("7", CLAIM_LAMBDA, gate[0], nums, f"{gate[1]}; {detail}")
    return Verdict("7", CLAIM_LAMBDA, combine(parts), nums, detail)
