"""Each verdict rule of docs/theory.md section 6 on synthetic frames built so that the verdict is known."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from analysis_fixtures import SUITES, rows

from analysis import claims as C
from analysis import claims_curve as K
from analysis import outcome as O
from analysis.stats import clustered_spearman, noninferiority, spearman
from analysis.verdict import INCONCLUSIVE, NO_LEARNING, NOT_SUPPORTED, SUPPORTED

S, N, INC = SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE


def runs_of(regime: str, n_runs: int, steps: list[int], **columns) -> pd.DataFrame:
    """``n_runs`` runs of ``regime`` with the same ``columns``; a column given as a function of (run index,
    steps) is evaluated per run."""
    return pd.concat([rows(regime, steps, seed=i, **{k: (v(i, steps) if callable(v) else v) for k, v in columns.items()})
                      for i in range(n_runs)], ignore_index=True)


# ------------------------------------------------------------------ statistics


def test_spearman_p_value_is_scipys():
    from scipy import stats

    x, y = [1, 2, 3, 4, 5, 6], [2, 1, 4, 3, 6, 5]
    assert spearman(x, y) == pytest.approx(tuple(stats.spearmanr(x, y)))


def test_clustered_p_value_is_larger_than_the_pooled_one_on_data_with_a_run_effect():
    """Four runs, each with its own offset in x and in y, and no relation within a run: pooled, 120 points look
    strongly correlated; resampling whole runs shows that only four independent units carry it."""
    rng = np.random.default_rng(0)
    x = np.concatenate([dx + rng.standard_normal(30) for dx in (0, 10, 20, 30)])
    y = np.concatenate([dy + rng.standard_normal(30) for dy in (0, 20, 10, 30)])
    runs = np.repeat(["a", "b", "c", "d"], 30)
    res = clustered_spearman(x, y, runs)
    assert res["spearman"] > 0.5 and res["p_pooled"] < 1e-10
    assert res["p"] > 0.05 and res["spearman_lo"] < 0 < res["spearman_hi"]
    assert res["runs"] == 4


def test_noninferiority_bound_uses_a_t_interval_with_n_minus_1_degrees_of_freedom():
    d = noninferiority([0.01, 0.03, 0.02], margin=0.02)
    se = np.std([0.01, 0.03, 0.02], ddof=1) / math.sqrt(3)
    assert d["df"] == 2 and d["lower"] == pytest.approx(0.02 - 2.919986 * se, rel=1e-5)
    assert d["mdd"] == pytest.approx((2.919986 + 1.060660) * se, rel=1e-5)


# ------------------------------------------------------------------ held-out outcomes: claims 4 and 7


def evals(arms: dict[str, list[float]], greedy_offset: float = 0.0, sft: float | None = 0.3) -> tuple[pd.DataFrame, ...]:
    """Eval frames: per arm, one run per listed seed accuracy (every suite the same); the SFT checkpoint at ``sft``."""
    recs, sft_recs = [], []
    for arm, accs in arms.items():
        regime, _, coef = arm.partition("@")
        regime = regime.split("/")[0]
        for seed, acc in enumerate(accs):
            base = {"run": f"{arm}_{seed}", "regime": regime, "arm": arm, "seed": seed,
                    "mtp_coef": float(coef) if coef else 0.1, "init": "ck", "trained": True, "n": 50}
            recs += [base | {"suite": s, "mean_at_k": acc, "greedy_acc": acc + greedy_offset} for s in SUITES]
            if sft is not None:
                sft_recs += [base | {"arm": "sft", "suite": s, "mean_at_k": sft, "greedy_acc": sft} for s in SUITES]
    return pd.DataFrame(recs), pd.DataFrame(recs[:0] + sft_recs, columns=pd.DataFrame(recs).columns)


LEARNED = [0.50, 0.51, 0.49]
SFT = 0.45  # detach gains +0.05 on the RL suites: the margin is 20% of it, 0.01


def claim4(occ: list[float], detach: list[float] = LEARNED, **kw):
    kw.setdefault("sft", SFT)
    ev, sft = evals({"detach": detach, "occ/reference": occ}, **kw)
    return O.occ_matches_detach(ev, O.learning(ev, sft), sft)


def test_claim4_a_true_deficit_of_two_standard_errors_with_three_seeds_is_not_supported():
    # paired differences −0.010 ± 0.005 per seed: mean −0.01, SE 0.005/√3·… so the deficit is 2 SE or more
    diff = np.array([-0.015, -0.010, -0.005]) - 0.0025
    se = diff.std(ddof=1) / math.sqrt(3)
    assert diff.mean() <= -2 * se
    v = claim4(list(np.array(LEARNED) + diff))
    assert v.verdict != S and v.numbers["lower"] < -v.numbers["margin"]
    assert v.numbers["n"] == 3 and v.numbers["mdd"] > 0


@pytest.mark.parametrize("occ, verdict", [
    ([0.505, 0.512, 0.493], S),  # within the margin, tightly
    ([0.40, 0.41, 0.39], N),  # worse by 0.1: even the upper bound is below −margin
    ([0.40, 0.60, 0.49], INC),  # too noisy to tell
    ([0.5, 0.5], INC)])  # two seeds
def test_claim4_non_inferiority_verdicts(occ, verdict):
    assert claim4(occ).verdict == verdict


def test_claim4_margin_is_a_share_of_what_rl_moves_the_rl_suites():
    v = claim4([0.505, 0.512, 0.493])
    assert v.numbers["baseline_gain"] == pytest.approx(0.05) and v.numbers["margin"] == pytest.approx(0.01)
    assert v.numbers["control_sft/verdict"] == N  # the untrained checkpoint is told apart
    # the margin is the comparator's own gain, whatever other baseline arm ran (an `off` arm that gained more
    # once widened it and turned a true deficit into support)
    occ = [0.481, 0.487, 0.492]
    ev, sft = evals({"detach": LEARNED, "occ/reference": occ, "off": [0.60, 0.61, 0.59]}, sft=SFT)
    with_off = O.occ_matches_detach(ev, O.learning(ev, sft), sft)
    assert with_off.numbers["margin"] == pytest.approx(0.01) and with_off.verdict == claim4(occ).verdict != S


def test_claim4_the_untrained_checkpoint_entered_as_an_arm_reads_not_supported():
    """The audit's case: on 6 seeds where RL moves the metric, an arm that is the SFT checkpoint itself (no training)
    must not pass as non-inferior to detach; in 20 fabricated replicates it never does."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        detach = list(0.55 + 0.02 * rng.standard_normal(6))  # +0.10 over SFT on the RL suites
        untrained = list(0.45 + 0.005 * rng.standard_normal(6))
        assert claim4(untrained, detach).verdict == N


def test_claim4_is_inconclusive_when_the_design_cannot_tell_the_sft_checkpoint_from_detach():
    # detach learned (gain 0.05 > its sd 0.03) but so noisily that the SFT checkpoint is not called worse
    v = claim4([0.47, 0.53, 0.50], detach=[0.47, 0.53, 0.50])
    assert v.numbers["control_sft/verdict"] != N and v.verdict == INC and "negative control" in v.detail


def test_claim4_a_nan_suite_accuracy_is_named_and_never_averaged_away():
    """The audit's case: an occ arm truly 0.05 worse on the RL suites with one NaN entry must not read supported
    (dropping the NaN suite from one arm's mean once made it so)."""
    ev, sft = evals({"detach": LEARNED, "occ/reference": [0.45, 0.46, 0.44]}, sft=SFT)
    ev["trained"] = ev["suite"] != "length_gen"
    ev.loc[(ev["arm"] == "occ/reference") & (ev["seed"] == 1) & (ev["suite"] == "linear"), "mean_at_k"] = np.nan
    v = O.occ_matches_detach(ev, O.learning(ev, sft), sft)
    assert v.verdict == INC and "occ/reference_1:linear" in v.detail and v.numbers["nan"] == 1
    ev.loc[ev["mean_at_k"].isna(), "mean_at_k"] = 0.45  # without the NaN: clearly worse
    assert O.occ_matches_detach(ev, O.learning(ev, sft), sft).verdict == N


def test_claim4_tests_every_rule_arm_and_reports_forgetting_and_the_six_suite_mean():
    ev, sft = evals({"detach": LEARNED, "occ/reference": [0.505, 0.512, 0.493], "real": [0.40, 0.41, 0.39],
                     "policy@0.3": [0.5, 0.5, 0.5]}, sft=SFT)
    ev["trained"] = ev["suite"].isin(["linear", "countdown"])
    v = O.occ_matches_detach(ev, O.learning(ev, sft), sft)
    assert v.verdict == S and v.numbers["real/verdict"] == N and "policy@0.3/verdict" not in v.numbers
    assert v.numbers["forgetting_diff"] == pytest.approx(v.numbers["all_suites_diff"])  # every suite moved alike


def test_claim4_judges_sampled_accuracy_and_reports_greedy_beside_it():
    ev, sft = evals({"detach": LEARNED, "occ/reference": [0.505, 0.512, 0.493]}, sft=SFT)
    ev.loc[ev["arm"] == "occ/reference", "greedy_acc"] = 0.1  # greedy says occ is far worse: not the verdict
    v = O.occ_matches_detach(ev, O.learning(ev, sft), sft)
    assert v.verdict == S and v.numbers["metric"] == "mean_at_k" and v.numbers["greedy_diff"] < -0.3


def test_no_learning_makes_the_claims_about_learning_inconclusive():
    # the baseline's gain over SFT (0.005) is within its seed-to-seed spread (sd 0.01)
    ev, sft = evals({"detach": [0.295, 0.305, 0.315], "occ/reference": [0.30, 0.31, 0.32]})
    learn = O.learning(ev, sft)
    assert learn["baseline_arm"] == "detach" and learn["learned"] is False
    assert learn["baseline_gain"] == pytest.approx(0.005) and learn["baseline_spread"] == pytest.approx(0.01)
    assert O.occ_matches_detach(ev, learn, sft).verdict == NO_LEARNING


def test_learning_prefers_the_detach_baseline_and_needs_the_sft_evaluation():
    ev, sft = evals({"detach": LEARNED, "off": [0.3] * 3})
    assert O.learning(ev, sft)["baseline_arm"] == "detach" and O.learning(ev, sft)["learned"] is True
    ev, sft = evals({"off": LEARNED})
    assert O.learning(ev, sft)["baseline_arm"] == "off"
    ev, sft = evals({"detach": LEARNED, "occ/reference": LEARNED}, sft=None)
    learn = O.learning(ev, sft)
    assert learn["learned"] is None and "occ eval" in learn["reason"]
    assert O.occ_matches_detach(ev, learn, sft).verdict == INC


def test_learning_with_a_nan_baseline_suite_cannot_tell():
    ev, sft = evals({"detach": LEARNED})
    ev.loc[0, "mean_at_k"] = np.nan
    learn = O.learning(ev, sft)
    assert learn["learned"] is None and "NaN" in learn["reason"]


def lam_study(acc_at: dict[float, float], seeds: int = 3) -> tuple[pd.DataFrame, ...]:
    arms = {"detach": [acc_at[0.0] + 0.002 * k for k in range(seeds)]}
    arms |= {f"policy@{lam:g}": [acc + 0.002 * k for k in range(seeds)] for lam, acc in acc_at.items() if lam > 0}
    return evals(arms)


@pytest.mark.parametrize("acc_at, verdict", [
    ({0.0: 0.50, 0.1: 0.56, 0.3: 0.52}, S),  # concave, maximum between 0 and 0.3
    ({0.0: 0.50, 0.1: 0.45, 0.3: 0.52}, N),  # convex
    ({0.0: 0.50, 0.1: 0.56}, INC)])  # one λ
def test_claim7_accuracy_against_a_fixed_lambda(acc_at, verdict):
    ev, sft = lam_study(acc_at)
    v = O.accuracy_vs_lambda(ev, O.learning(ev, sft))
    assert v.verdict == verdict
    if verdict == S:
        assert 0 < v.numbers["policy/lambda_max_fit"] < 0.3 and v.numbers["policy/best_lambda"] == 0.1


def test_claim7_with_two_seeds_per_lambda_is_inconclusive():
    ev, sft = lam_study({0.0: 0.50, 0.1: 0.56, 0.3: 0.52}, seeds=2)
    assert O.accuracy_vs_lambda(ev, O.learning(ev, sft)).verdict == INC


# ------------------------------------------------------------------ claim 1a/1b: the real-step curve

STEPS = [1, 5, 9, 13, 17]


def real_curves(n_runs: int = 3, r2: float = 0.97, beta_model: float = -2.0, ratio: float = 1.3,
                delta_at: float = 1e-6, regime: str = "policy", real_star: float = 0.8, real_delta: float = 1e-6,
                at_edge: bool = False) -> pd.DataFrame:
    """Real-step probes: the local fit (β −2), the real optimum at λ = 1, adam_step's λ* at ``ratio`` times it with
    the real Δ ``delta_at`` there, adam_real's clamped λ* at ``real_star`` with the real Δ ``real_delta``; sgd
    proposes the opposite sign. Step 1 (a sign step) is a control."""
    def step1_nan(value):
        return lambda i, s: [np.nan if t == 1 else value for t in s]

    cols = {"diag/curve_real_local/alpha": 1.0, "diag/curve_real_local/beta": -2.0, "diag/curve_real_local/r2": r2,
            "diag/real_optimum/lambda": 1.0, "diag/real_optimum/delta": 2e-6, "diag/real_optimum/at_edge": at_edge,
            "diag/real_optimum_noclip/lambda": 0.5, "diag/real_optimum_noclip/delta": 1e-6,
            "diag/sgd/beta_model": 3.0, "diag/sgd/lambda_star": -4.0, "diag/sgd/delta_at_lambda_star": -1e-5,
            # Adam geometries have no value at step 1: left out, not filled from sgd
            "diag/adam_step/beta_model": step1_nan(beta_model), "diag/adam_step/lambda_star": step1_nan(ratio),
            "diag/adam_step/delta_at_lambda_star": step1_nan(delta_at),
            "diag/adam_step/lambda_star_noclip": step1_nan(ratio),
            "diag/adam_step/delta_at_lambda_star_noclip": step1_nan(-1e-7),
            "diag/adam_step/alpha_rel_err": 0.1, "diag/adam_step/beta_rel_err": 0.2,
            "diag/adam_real/beta": -1.0, "diag/adam_real/lambda_star_clamped": real_star,
            "diag/adam_real/delta_at_lambda_star": real_delta, "diag/adam_real_noclip/lambda_star": 0.6,
            "diag/adam_real/delta_at_lambda_star_noclip": 1e-6,
            "diag/control": lambda i, s: ["first_step" if t == 1 else "" for t in s]}
    return runs_of(regime, n_runs, STEPS, **cols)


@pytest.mark.parametrize("data, verdict", [
    (real_curves(), S), (real_curves(r2=0.5), N), (real_curves(beta_model=2.0), S),  # judged on adam_real's β
    (real_curves(n_runs=2), INC)])
def test_claim1a_local_quadratic_verdicts(data, verdict):
    v = K.local_quadratic(data)
    assert v.verdict == verdict


def test_claim1a_reports_each_geometry_and_leaves_the_controls_out():
    v = K.local_quadratic(real_curves(beta_model=2.0))
    assert v.numbers["adam_real/verdict"] == S and v.numbers["adam_step/beta_sign_agreement"] == 0.0
    assert v.numbers["adam_step/verdict"] == N  # reported with its own verdict, not the claim's
    assert v.numbers["adam_step/beta_sign_points"] == 12 and v.numbers["sgd/beta_sign_points"] == 12
    assert v.numbers["controls/first_step"] == 3 and v.numbers["adam_step/median_beta_rel_err"] == 0.2


def test_claim1a_splits_the_real_curvature_apart_where_the_clip_acts_at_zero():
    """The split is bimodal (the clip carries nearly all of β where it acts at λ = 0, none elsewhere): its median
    over every probe hides that, so it is reported for each side too."""
    d = real_curves()
    active = d["step"].isin([5, 13])
    d = d.assign(**{"diag/adam_real/clip_active": active, "diag/real_beta/clip_share": np.where(active, 0.9, 0.0),
                    "diag/real_beta/vhat_share": np.where(active, 0.1, 0.8),
                    "diag/real_beta/rest_share": np.where(active, 0.0, 0.2)})
    v = K.local_quadratic(d)
    n_active = int((active & (d["step"] > 1)).sum())
    assert v.numbers["real_beta/clip_active/probes"] == n_active
    assert v.numbers["real_beta/clip_active/median_clip_share"] == 0.9
    assert v.numbers["real_beta/clip_inactive/median_vhat_share"] == 0.8
    assert f"where the clip acts at λ = 0 ({n_active} probes): clip 90%" in v.detail
    unknown = K.local_quadratic(d.drop(columns=["diag/adam_real/clip_active"]))  # no clip flag: one split, said so
    assert "median split over every probe: clip" in unknown.detail
    assert unknown.numbers["real_beta/clip_active/probes"] == unknown.numbers["real_beta/clip_inactive/probes"] == 0


@pytest.mark.parametrize("data, verdict", [
    (real_curves(), S), (real_curves(real_star=3.0), N),  # adam_real 3× off the real optimum
    (real_curves(real_delta=-1e-6), N),  # within 2×, but the real Δ is negative there
    (real_curves(real_star=-0.8), N), (real_curves(n_runs=2), INC),
    (real_curves(ratio=3.0, delta_at=-1e-6), S)])  # adam_step's misses are reported, not judged
def test_claim1b_located_within_a_factor_of_two_with_a_nonnegative_real_delta(data, verdict):
    v = K.wide_interior_maximum(data)
    assert v.verdict == verdict


def test_claim1b_judges_each_geometry_against_the_real_optimum():
    v = K.wide_interior_maximum(real_curves(real_star=0.3))
    assert v.numbers["adam_step/located_share"] == 1.0 and v.numbers["sgd/located_share"] == 0.0  # opposite sign
    assert v.numbers["adam_real/located_share"] == 0.0 and v.verdict == N  # 0.3 against 1.0: off by more than 2
    assert v.numbers["adam_step/verdict"] == S
    assert v.numbers["noclip/adam_real/located_share"] == 1.0  # 0.6 against the clip-free 0.5
    assert v.numbers["noclip/adam_step/located_share"] == 0.0  # 1.3 against 0.5, and a negative Δ there
    assert v.numbers["controls/first_step"] == 3 and v.numbers["probes"] == 12
    worse = K.wide_interior_maximum(real_curves(ratio=3.0))
    assert worse.numbers["adam_step/within_2x_share"] == 0.0
    negative = K.wide_interior_maximum(real_curves(delta_at=-1e-6))
    assert negative.numbers["adam_step/within_2x_share"] == 1.0
    assert negative.numbers["adam_step/delta_nonnegative_share"] == 0.0


def test_claim1b_leaves_out_an_optimum_at_the_edge_of_its_grid():
    """An optimum at the grid's edge is a bound (the real Δ may still rise beyond it): every geometry would 'miss'
    it by construction. Such probes are counted, never judged."""
    v = K.wide_interior_maximum(real_curves(at_edge=True))
    assert v.numbers["optimum_at_edge"] == 12 and v.numbers["probes"] == 0 and v.verdict == INC


def test_claim1_without_the_real_step_columns_is_inconclusive_naming_them():
    old = rows("policy", STEPS, **{"diag/curve/beta": -1.0, "diag/curve/r2": 0.99})
    for fn, col in ((K.local_quadratic, "diag/curve_real_local/alpha"), (K.wide_interior_maximum,
                                                                        "diag/real_optimum/lambda")):
        v = fn(old)
        assert v.verdict == "inconclusive: not measured" and col in v.detail and "curve_real_step" in v.detail


def detach_probes(coupled: bool, n_runs: int = 3) -> pd.DataFrame:
    det = runs_of("detach", n_runs, STEPS, arm="detach", **{
        "diag/control": "detach", "diag/adam_real/clip_factor": 0.9,
        "diag/adam_real/clip_factor_at_used": 0.85 if coupled else 0.9,
        "diag/real_optimum/delta_at_used": -3e-7 if coupled else 0.0, "diag/real_optimum/lambda": 0.0})
    pol = real_curves().assign(arm="policy@0.3", **{"diag/adam_real/clip_active": [True, False] * 7 + [True]})
    return pd.concat([det, pol], ignore_index=True)


def test_clip_coupling_is_read_off_the_clip_factor_at_the_lambda_detach_used():
    v = K.clip_coupling(detach_probes(coupled=True))
    assert v.verdict == S and v.numbers["detach_probes"] == 15 and v.numbers["detach_share_delta_at_used_negative"] == 1
    assert v.numbers["clip_active_at_0_points"] == 12  # the first-step controls left out
    assert K.clip_coupling(detach_probes(coupled=False)).verdict == N  # the clip never moves with λ: no coupling
    assert K.clip_coupling(real_curves()).verdict == "inconclusive: not measured"  # no detach arm


# ------------------------------------------------------------------ claim 2: ce


def ce_probes(fit, n_runs: int = 3, alpha: float = 1e-4, beta: float = -1e-2, cos_ce: float = 0.05) -> pd.DataFrame:
    """ce probes (λ used 0.1) in the adam_step geometry, step 1 in sgd only; policy probes with cos 0.5."""
    ce = runs_of("ce", n_runs, [1, 2, 3, 4], **{
        "lambda/used": 0.1, "diag/real_optimum/lambda": lambda i, s: [fit] * len(s),
        "diag/adam_step/alpha_model": lambda i, s: [np.nan if t == 1 else alpha for t in s],
        "diag/adam_step/beta_model": lambda i, s: [np.nan if t == 1 else beta for t in s],
        "diag/adam_step/lambda_star": 0.01, "diag/sgd/cosine": cos_ce})
    pol = runs_of("policy", n_runs, [2, 3, 4], **{"diag/sgd/cosine": 0.5, "diag/adam_step/beta_model": -1.0})
    return pd.concat([ce, pol], ignore_index=True)


@pytest.mark.parametrize("data, verdict", [
    (ce_probes(0.01), S),
    (ce_probes(np.nan), INC),  # λ_opt NaN everywhere: no support, however the rest looks
    (ce_probes(1.0), N),  # λ_opt above the λ used
    (ce_probes(0.01, alpha=1e-2), N),  # the linear gain exceeds the penalty at the λ used
    (ce_probes(0.01, n_runs=2), INC)])
def test_claim2_ce_penalty_dominates_verdicts(data, verdict):
    assert C.ce_penalty_dominates(data).verdict == verdict


def test_claim2_a_nan_real_optimum_never_counts_as_support():
    v = C.ce_penalty_dominates(ce_probes(np.nan))
    assert v.numbers["nan_fit"] == 9 and v.numbers["small_opt_points"] == 0
    assert v.numbers["geometry"] == "adam_step" and v.numbers["excluded_other_geometry"] == 0  # step 1: a control


def test_claim2_tests_the_penalty_at_the_lambda_used():
    v = C.ce_penalty_dominates(ce_probes(0.01))
    # ½·λ·|β| / |α| = 0.5·0.1·1e-2 / 1e-4 = 5
    assert v.numbers["median_penalty_to_gain"] == pytest.approx(5.0) and v.numbers["penalty_share"] == 1.0
    assert v.numbers["cosine_geometry"] == "sgd"


# ------------------------------------------------------------------ claim 3: policy


def decay(c_late: float, q_late: float, n_runs: int = 3, q_sign_mixed: bool = False) -> pd.DataFrame:
    steps = list(range(1, 13))

    def c(i, s):
        return [np.nan if t == 1 else (1.0 if t <= 5 else c_late) * (1 + 0.01 * i) for t in s]

    def q(i, s):
        if q_sign_mixed:  # |Q| persists, but late Q changes sign in 3 of 4 probes
            return [np.nan if t == 1 else -1.0 if t <= 5 else (1.0 if t % 4 else -1.0) for t in s]
        return [np.nan if t == 1 else (-1.0 if t <= 5 else q_late) for t in s]

    return runs_of("policy", n_runs, steps, **{"diag/adam_step/corr": c, "diag/adam_step/curv": q,
                                               "diag/sgd/corr": 1.0, "diag/sgd/curv": -1.0})


@pytest.mark.parametrize("data, verdict", [
    (decay(0.1, -1.0), S), (decay(2.0, -1.0), N), (decay(0.1, -1.0, q_sign_mixed=True), N), (decay(0.7, -1.0), INC),
    (decay(0.1, -1.0, n_runs=2), INC)])
def test_claim3_policy_corr_decays_verdicts(data, verdict):
    v = C.policy_corr_decays(data)
    assert v.verdict == verdict
    if verdict != INC or v.numbers["policy_probes"] > 22:  # step 1, a control, is left out before the geometry
        assert v.numbers["geometry"] == "adam_step" and v.numbers["excluded_other_geometry"] == 0


def test_claim3_reports_signed_medians_and_the_share_of_negative_q():
    v = C.policy_corr_decays(decay(0.1, -1.0, q_sign_mixed=True))
    assert v.numbers["median_Q_late"] == 1.0 and v.numbers["share_Q_negative_late"] == pytest.approx(0.25)
    assert v.numbers["median_Q_early"] == -1.0 and v.numbers["share_Q_negative_early"] == 1.0


# ------------------------------------------------------------------ claim 5: proxy


def proxy_probes(within: str, n_runs: int = 3) -> pd.DataFrame:
    """λ_opt and the reference proxy per minibatch index k (1 or 2); within each k they agree (``within="rank"``)
    or are reversed (``"reversed"``), while k itself shifts both (so pooling over k would show agreement)."""
    def fit(i, s):
        return [(1 + 0.1 * j + 0.01 * i) * (10 if k == 2 else 1) for j, k in zip(range(len(s)), _k(s))]

    def ref(i, s):
        f = fit(i, s)
        return [v if within == "rank" else (2 * (11 if k == 2 else 1.1) * (1 + 0.05) - v) for v, k in zip(f, _k(s))]

    return runs_of("policy", n_runs, list(range(1, 11)), **{
        "diag/real_optimum/lambda": fit, "lambda/reference": ref, "minibatch_index": lambda i, s: _k(s),
        "base_coef": 0.1, "diag/adam_step/proj": fit, "stats/q_minus_old/mean": -2.0, "stats/l_minus_old/mean": 0.1,
        "stats/q_minus_old/std": 1.0, "stats/q_minus_old/max_abs": 5.0, "diag/lr": 1e-3, "diag/curve/l_eff": 1e4})


def _k(steps: list[int]) -> list[int]:
    return [1 if t % 2 else 2 for t in steps]


def test_claim5_compares_proxy_and_lambda_star_within_one_minibatch_index():
    reversed_ = proxy_probes("reversed")
    pooled, _ = spearman(reversed_["diag/real_optimum/lambda"], reversed_["lambda/reference"])
    assert pooled > 0.5  # pooling over k would call it tracking
    v = C.proxy_tracks_lambda_star(reversed_)
    assert v.verdict == N and v.numbers["spearman"] < -0.9 and v.numbers["minibatch_index_source"] == "minibatch_index"
    assert C.proxy_tracks_lambda_star(proxy_probes("rank")).verdict == S


def test_claim5_reports_the_head_gap_and_theorys_reading():
    v = C.proxy_tracks_lambda_star(proxy_probes("rank"))
    assert v.numbers["head_gap_median"] == -2.0 and v.numbers["head_gap_share_negative"] == 1.0
    assert v.numbers["head_gap_over_drift"] == pytest.approx(20.0)
    assert v.numbers["proxy_over_c_vs_kappa/spearman"] == pytest.approx(1.0)
    assert v.numbers["c_eta_leff_median"] == pytest.approx(1.0)  # c·η·L_eff = 0.1·1e-3·1e4
    assert v.numbers["k1/points"] == 12 and v.numbers["k2/points"] == 15  # step 1 (a control) left out


def test_claim5_reports_every_rules_applied_lambda_against_the_real_optimum():
    """A rule that edits θ_S's update (cosine) logs a constant ``lambda/used`` (its MTP head's coefficient); what
    it applies to θ_S is its realised b/a, which the probe records. The real rule's own λ is ``lambda/used``.
    Fixed-λ arms are no rule."""
    def opt(i, s):
        return [(0.1 * j + 0.01 * i) * (-1 if k == 2 else 1) for j, k in zip(range(len(s)), _k(s))]

    steps = list(range(2, 22))
    common = {"diag/real_optimum/lambda": opt, "minibatch_index": lambda i, s: _k(s)}
    cos = runs_of("cosine", 3, steps, **common, **{
        "arm": "cosine", "lambda/rule": "cosine", "lambda/used": 0.1, "diag/realised/weight_g": 2.0,
        "diag/realised/weight_u": lambda i, s: [2 * v for v in opt(i, s)]})
    real = runs_of("real", 3, steps, **common, **{"arm": "real", "lambda/rule": "real",
                                                  "lambda/used": lambda i, s: [-v for v in opt(i, s)]})
    fixed = runs_of("policy", 3, steps, **common, **{"arm": "policy@3", "lambda/rule": "fixed", "lambda/used": 3.0})
    out = C._rules_against_optimum(pd.concat([cos, real, fixed], ignore_index=True))
    assert out["rules/cosine/spearman"] == pytest.approx(1.0) and out["rules/cosine/distinct_lambdas"] > 5
    assert out["rules/real/spearman"] == pytest.approx(-1.0) and out["rules/real/points"] == 60
    assert out["rules/real/p"] < 0.05 and out["rules/real/spearman_hi"] < 0
    assert not any(k.startswith("rules/policy") for k in out)
    as_logged = C._rules_against_optimum(cos.drop(columns=["diag/realised/weight_g", "diag/realised/weight_u"]))
    assert as_logged["rules/cosine/distinct_lambdas"] == 1  # without the realised weights: the head's constant λ
    unknown = cos.copy()
    unknown.loc[unknown.index[0], "diag/realised/weight_u"] = np.nan  # what it applied is unknown: left out, not 0.1
    n = C._rules_against_optimum(cos)["rules/cosine/points"]
    assert C._rules_against_optimum(unknown)["rules/cosine/points"] == n - 1


def test_claim5_with_two_runs_is_inconclusive():
    assert C.proxy_tracks_lambda_star(proxy_probes("rank", n_runs=2)).verdict == INC


def test_claim5_no_pattern_of_nans_turns_noise_into_support():
    """The audit's case: pure noise with NaN proxies placed on its discordant points looks like tracking (ρ ≈ 0.7)
    once the NaNs are dropped; they are counted, and with them placed worst the verdict cannot be supported."""
    rng = np.random.default_rng(0)
    noise = runs_of("policy", 4, list(range(2, 32, 2)), **{
        "diag/real_optimum/lambda": lambda i, s: list(rng.standard_normal(len(s))),
        "lambda/reference": lambda i, s: list(rng.standard_normal(len(s))), "minibatch_index": 1})
    x, y = noise["diag/real_optimum/lambda"], noise["lambda/reference"]
    discordant = np.sign(x - x.median()) != np.sign(y - y.median())
    noise.loc[discordant, "lambda/reference"] = np.nan
    v = C.proxy_tracks_lambda_star(noise)
    assert v.numbers["spearman"] > 0.5 and v.numbers["nan_points"] == int(discordant.sum())
    assert v.numbers["spearman_worst_case_nan"] < 0 and v.verdict != S


# ------------------------------------------------------------------ claim 6 and the empty case


def timings(occ_s: float, n_runs: int = 3) -> pd.DataFrame:
    steps = list(range(1, 7))
    # the probed step (a probe record: diag/lr) is slow and left out; the recorder's bookkeeping runs every step
    diag = {"perf/diag_s": [0.5 if s == 1 else 0.02 for s in steps], "diag/lr": [1e-3 if s == 1 else np.nan
                                                                                  for s in steps]}
    return pd.concat([runs_of("occ", n_runs, steps, arm="occ/reference", **{"perf/train_s": [9.0, *[occ_s] * 5]}, **diag),
                      runs_of("occ", n_runs, steps, arm="occ/fisher", **{"perf/train_s": [9.0, *[1.0] * 5]}, **diag),
                      runs_of("detach", n_runs, steps, arm="detach", **{"perf/train_s": [9.0, *[0.010] * 5]}, **diag)],
                     ignore_index=True)


@pytest.mark.parametrize("data, verdict", [
    (timings(0.0101), S), (timings(0.0120), N), (timings(0.0107), INC), (timings(0.0101, n_runs=2), INC)])
def test_claim6_occ_time_cost_verdicts(data, verdict):
    v = C.occ_time_cost(data)  # occ/fisher's slow runs are another arm: not pooled into occ/reference's
    assert v.verdict == verdict and v.numbers["diagnosed_excluded"] == len(data) // 6  # step 1 of each run


def step_cost(ratio: float, rounds: int = 30, noise: float = 0.02, arms=("detach", "occ/reference", "policy@0.3"),
              seed: int = 0) -> dict:
    """``occ cost``'s file: per-round step times, every arm but detach ``ratio`` times detach's, with a shared
    per-round load drift (cancels in a round's ratio) and independent noise of relative size ``noise``."""
    rng = np.random.default_rng(seed)
    drift = 0.2 * np.exp(rng.normal(0.0, 0.3, rounds))
    times = {a: drift * (1.0 if a == "detach" else ratio) * np.exp(rng.normal(0.0, noise, rounds)) for a in arms}
    return {"rounds": rounds, "arms": {a: {"times_s": t.tolist()} for a, t in times.items()}}


@pytest.mark.parametrize("cost, verdict", [
    (step_cost(1.0), S), (step_cost(1.2), N), (step_cost(1.06), INC),
    (step_cost(1.0, noise=0.3), INC),
    (step_cost(1.0, rounds=5), INC), (step_cost(1.0, arms=("detach", "occ/fisher")), INC)])
def test_claim6_interleaved_design_judges_the_per_round_ratio_with_its_interval(cost, verdict):
    v = C.occ_time_cost(timings(0.0120), cost)  # the separate runs say "not supported"; the interleaved design rules
    assert v.verdict == verdict and v.numbers["design"] == "interleaved"
    assert v.numbers["separate_runs_ratio"] == pytest.approx(1.2)
    if "ratio" in v.numbers and cost["rounds"] >= 6:
        assert v.numbers["ratio_lo"] <= v.numbers["ratio"] <= v.numbers["ratio_hi"]


def test_claim6_a_negligible_median_without_power_is_not_support():
    v = C.occ_time_cost(timings(0.0101), step_cost(1.0, noise=0.3))
    assert v.numbers["ratio"] <= C.COST_SUPPORTED < C.COST_NOT_SUPPORTED < v.numbers["ratio_hi"]
    assert v.verdict == INC  # the interval, not the median, keeps it from support


def test_claim6_refuses_arms_timed_over_different_rounds():
    cost = step_cost(1.0)
    cost["arms"]["detach"]["times_s"] = cost["arms"]["detach"]["times_s"][:-1]
    with pytest.raises(ValueError, match="as many finite positive times"):
        C.occ_time_cost(timings(0.0101), cost)


def test_claim6_interleaved_ratio_is_the_median_of_per_round_ratios():
    cost = {"rounds": 7, "arms": {"detach": {"times_s": [1, 2, 4, 1, 1, 1, 1]},
                                  "occ/reference": {"times_s": [1.0, 2.2, 4.0, 1.1, 0.9, 1.0, 1.5]},
                                  "policy@3": {"times_s": [1, 2, 4, 1, 1, 1, 1]}}}
    v = C.occ_time_cost(timings(0.0101), cost)
    assert v.numbers["ratio"] == pytest.approx(1.0)  # sorted ratios 0.9 1 1 1 1.1 1.1 1.5: median 1.0, not 11.7/11
    assert (v.numbers["ratio_lo"], v.numbers["ratio_hi"]) == pytest.approx((0.9, 1.5))  # n = 7: x(1), x(7)
    assert v.numbers["vs_policy@3/ratio"] == pytest.approx(1.0)
    assert v.numbers["policy@3/ratio"] == 1.0 and v.numbers["occ/reference/mean_ratio"] == pytest.approx(11.7 / 11)
    once = {"rounds": 8, "arms": {"detach": {"times_s": [1.0] * 8}, "occ/reference": {"times_s": [1.0] * 8},
                                  "real": {"times_s": [5.0, 1, 1, 1] * 2}}}  # λ paid once per rollout of 4 steps
    r = C.occ_time_cost(timings(0.0101), once).numbers
    assert r["real/ratio"] == 1.0 and r["real/mean_ratio"] == 2.0


def test_median_interval_is_the_binomial_order_statistic_interval_and_covers():
    from analysis.stats import median_interval

    assert median_interval(np.arange(30.0)) == (9.0, 20.0)  # x(10), x(21) of 1-based order statistics
    assert all(math.isnan(x) for x in median_interval([1.0, 2.0, 3.0, 4.0, 5.0]))  # 2·0.5^5 > 0.05
    rng = np.random.default_rng(1)
    hits = [lo <= math.log(2) <= hi for lo, hi in (median_interval(rng.exponential(size=25)) for _ in range(2000))]
    assert np.mean(hits) >= 0.94


def test_every_claim_is_inconclusive_without_data():
    empty = pd.DataFrame({"run": [], "regime": [], "arm": [], "seed": [], "step": []})
    ev = pd.DataFrame(columns=["run", "regime", "arm", "seed", "mtp_coef", "init", "suite", "trained", "greedy_acc",
                               "mean_at_k"])
    verdicts, _ = C.evaluate_claims(empty, empty, ev, ev)
    assert [v.id for v in verdicts] == ["1a", "1b", "clip", "2", "3", "4", "forgetting", "length", "5", "6", "7"]
    assert all(v.verdict == "inconclusive: not measured" for v in verdicts), [v.verdict for v in verdicts]


def test_forgetting_and_length_generalisation_are_rows_of_their_own():
    """The baseline against the SFT checkpoint on the suites RL does not train on (length_gen apart) and on
    length_gen, paired by seed; every arm against the baseline beside it."""
    ev, sft = evals({"detach": LEARNED, "occ/reference": [0.5, 0.5, 0.5]}, sft=SFT)
    ev["trained"] = ev["suite"].isin(["linear", "countdown"])
    for d in (ev, sft):
        d.loc[d["suite"].isin(["addition", "signed", "multiplication"]), "mean_at_k"] -= \
            np.where(d.loc[d["suite"].isin(["addition", "signed", "multiplication"]), "arm"] == "sft", 0.0, 0.2)
    v = O.forgetting(ev, sft)
    assert v.verdict == S and v.numbers["baseline_minus_sft"] == pytest.approx(-0.15, abs=0.02)
    assert v.numbers["suites"] == "addition, signed, multiplication" and "occ/reference/minus_detach" in v.numbers
    length = O.length_generalisation(ev, sft)
    assert length.id == "length" and length.numbers["suites"] == "length_gen"
    floor = [d.assign(mean_at_k=np.where(d["suite"] == "length_gen", 0.0, d["mean_at_k"])) for d in (ev, sft)]
    at_floor = O.length_generalisation(*floor)  # nobody solves a length_gen problem: nothing can move, no "-0"
    assert at_floor.verdict == "inconclusive at this scale" and at_floor.numbers["at_floor"]
    assert "at its floor" in at_floor.detail and not re.search(r"-0(?![.\d])", at_floor.detail)
    assert all(math.copysign(1, at_floor.numbers[k]) > 0 for k in ("baseline_minus_sft", "lower", "upper"))
    # a NaN score is named, neither a floor nor "too few seeds", and never averaged over fewer suites
    nan_run = floor[0].copy()
    nan_run.loc[(nan_run["suite"] == "length_gen") & (nan_run["run"] == "detach_1"), "mean_at_k"] = np.nan
    nan_suite = nan_run.copy()
    nan_suite.loc[(nan_suite["suite"] == "addition") & (nan_suite["run"] == "detach_0"), "mean_at_k"] = np.nan
    for v in (O.length_generalisation(nan_run, floor[1]), O.forgetting(nan_suite, sft)):
        assert v.verdict == "inconclusive at this scale" and v.numbers["nan"] == 1
        assert "not averaged over fewer suites" in v.detail and "at_floor" not in v.numbers
    assert O.forgetting(ev.assign(trained=True), sft).verdict == "inconclusive: not measured"
