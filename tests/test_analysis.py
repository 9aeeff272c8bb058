"""Offline analysis: loading run files, the figures' column checks, the six claim verdicts, the report."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from analysis_fixtures import make_study, rows, synthetic_metrics, write_run

from analysis import claims as C
from analysis import figures as F
from analysis.frames import SUITES, eval_frame, metrics_frame, probes_frame
from analysis.load import RunFileError, load_run, load_runs
from analysis.report import FIGURES, write_report
from analysis.stats import loglog_slope, spearman

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("study")
    make_study(root)
    return root


@pytest.fixture(scope="module")
def frames(study) -> dict[str, pd.DataFrame]:
    runs = load_runs([study])
    return {"metrics": metrics_frame(runs), "probes": probes_frame(runs), "evals": eval_frame(runs)}


# ------------------------------------------------------------------ loader


def test_load_run_reads_config_metrics_probes_and_eval_with_nulls_as_nan(study):
    run = load_run(study / "synthetic__policy__0")
    assert (run.name, run.regime, run.seed) == ("synthetic__policy__0", "policy", 0)
    assert run.config["rl"]["proxy"] == "reference"
    assert run.metrics["step"].is_monotonic_increasing and run.steps == 24
    adam_c = run.metrics["diag/adam/corr"]  # null on step 1 (no Adam state yet), absent between probes
    assert adam_c.dtype == float and math.isnan(adam_c.iloc[0]) and adam_c.notna().any()
    assert run.probes is not None and isinstance(run.probes["curve/lams"].iloc[0], np.ndarray)
    assert set(run.eval["suites"]) == set(SUITES)


def test_load_run_reads_another_probe_file_when_named(study, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(study / "synthetic__policy__0", run_dir)
    alt = pd.read_parquet(run_dir / "probes.parquet")
    alt["diag/curve/beta"] = -123.0
    alt.to_parquet(run_dir / "probes_alt.parquet", index=False)
    assert (load_run(run_dir, "probes_alt.parquet").probes["diag/curve/beta"] == -123.0).all()
    assert not (load_run(run_dir).probes["diag/curve/beta"] == -123.0).any()
    assert load_run(run_dir, "absent.parquet").probes is None
    text = write_report([run_dir], tmp_path / "fig", probes_file="probes_alt.parquet").read_text()
    assert "Probe values from `probes_alt.parquet`" in text


def test_load_runs_finds_run_directories_inside_folders_once(study):
    runs = load_runs([study, study / "synthetic__ce__1"])
    assert len(runs) == 8 and len({r.name for r in runs}) == 8


def test_loader_tolerates_a_truncated_last_metrics_line(tmp_path):
    run = write_run(tmp_path, "r", "policy", 0, synthetic_metrics("policy", 0, steps=5))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "reward/me')
    assert load_run(run).metrics["step"].tolist() == [1, 2, 3, 4, 5]


def test_loader_rejects_a_corrupt_middle_line_naming_file_and_line(tmp_path):
    run = write_run(tmp_path, "r", "policy", 0, synthetic_metrics("policy", 0, steps=5))
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[2] = "{not json\n"
    (run / "metrics.jsonl").write_text("".join(lines))
    with pytest.raises(RunFileError, match=r"metrics\.jsonl: line 3"):
        load_run(run)


def test_loader_rejects_a_corrupt_parquet_naming_it(tmp_path):
    run = write_run(tmp_path, "r", "policy", 0, synthetic_metrics("policy", 0, steps=5))
    (run / "probes.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(RunFileError, match=r"probes\.parquet"):
        load_run(run)


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.yaml"])
def test_loader_names_a_missing_required_file(tmp_path, name):
    run = write_run(tmp_path, "r", "policy", 0, [])
    (run / name).unlink()
    with pytest.raises(RunFileError, match=rf"missing file: .*{re.escape(name)}"):
        load_run(run)


@pytest.mark.parametrize("text, problem", [("rl: [unclosed", "not valid YAML"), ("seed: 0\n", "rl.regime")])
def test_loader_names_a_corrupt_config(tmp_path, text, problem):
    run = write_run(tmp_path, "r", "policy", 0, [])
    (run / "config.yaml").write_text(text)
    with pytest.raises(RunFileError, match=rf"config\.yaml.*{problem}"):
        load_run(run)


def test_loader_names_a_corrupt_eval_json(tmp_path):
    run = write_run(tmp_path, "r", "policy", 0, [])
    (run / "eval.json").write_text('{"suites": ')
    with pytest.raises(RunFileError, match=r"eval\.json"):
        load_run(run)


def test_an_sft_run_directory_is_not_an_rl_run(tmp_path):
    run = write_run(tmp_path, "sft", "occ", 0, [{"step": 1, "sft/loss": 2.0}])
    assert not load_run(run).is_rl


def test_suite_order_matches_the_task_registry():
    from occ_theory.tasks import SUITES as TASK_SUITES

    assert tuple(SUITES) == tuple(TASK_SUITES)


# ------------------------------------------------------------------ figures


@pytest.mark.parametrize("stem, fn, frame", [(s, f, fr) for s, f, fr, _ in FIGURES], ids=[s for s, *_ in FIGURES])
def test_each_figure_writes_a_png_from_synthetic_runs(frames, tmp_path, stem, fn, frame):
    out = fn(frames[frame], tmp_path / f"{stem}.png")
    assert out == tmp_path / f"{stem}.png" and out.stat().st_size > 1000
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("stem, fn, frame", [(s, f, fr) for s, f, fr, _ in FIGURES], ids=[s for s, *_ in FIGURES])
def test_each_figure_rejects_a_frame_missing_a_required_column(frames, tmp_path, stem, fn, frame):
    needed = next(c for c in fn.REQUIRES if c not in ("run", "regime", "step", "seed"))
    df = frames[frame]
    df = df.drop(columns=[c for c in df.columns if c == needed or ("*" in needed and c.startswith("diag/module/"))])
    with pytest.raises(ValueError, match=rf"{re.escape(fn.TITLE)}.*{re.escape(needed)}"):
        fn(df, tmp_path / "x.png")


def test_figures_without_data_for_their_regimes_say_so(frames, tmp_path):
    detach_only = frames["probes"][frames["probes"]["regime"] == "detach"]
    with pytest.raises(ValueError, match="no probe with a measured, non-flat curve"):
        F.f3_curves(detach_only, tmp_path / "f3.png")
    with pytest.raises(ValueError, match="no finite per-module cosine"):
        F.f6_module_cosine(frames["metrics"][frames["metrics"]["regime"] == "detach"], tmp_path / "f6.png")


def test_a_figure_writes_a_pdf_beside_the_png_when_asked(frames, tmp_path):
    F.f5_eval(frames["evals"], tmp_path / "f5.png", pdf=True)
    assert (tmp_path / "f5.pdf").read_bytes()[:4] == b"%PDF"


def test_eval_table_has_one_row_per_regime_and_a_column_per_suite(frames):
    table = F.eval_table(frames["evals"])
    header, _, *body = table.splitlines()
    assert header.split(" | ")[1:-1] == list(SUITES) and header.endswith("length_gen | mean |")
    assert [r.split(" | ")[0].lstrip("| ") for r in body] == ["detach", "ce", "policy", "occ"]
    assert "± " in body[0] and "(2)" in body[0]


# ------------------------------------------------------------------ statistics


def test_spearman_p_value_is_exact_for_small_samples():
    rho, p = spearman([1, 2, 3, 4, 5], [2, 4, 5, 8, 9])
    assert rho == pytest.approx(1.0) and p == pytest.approx(2 / 120)


def test_loglog_slope_recovers_the_power_across_series_with_different_offsets():
    x = 1e-3 / 2.0 ** np.arange(4)
    assert loglog_slope([x, x], [7 * x**3, 0.01 * x**3]) == pytest.approx(3.0)


# ------------------------------------------------------------------ claims: one dataset per verdict

S, N, INC = C.SUPPORTED, C.NOT_SUPPORTED, C.INCONCLUSIVE


def curves(beta: list[float], r2: float = 0.95) -> pd.DataFrame:
    flat = rows("detach", [1], **{"diag/curve/flat": True, "diag/curve/beta": 0.0, "diag/curve/r2": np.nan})
    return pd.concat([flat, rows("policy", list(range(1, len(beta) + 1)), **{
        "diag/curve/flat": False, "diag/curve/beta": beta, "diag/curve/r2": r2})], ignore_index=True)


@pytest.mark.parametrize("data, verdict", [
    (curves([-1.0] * 5), S), (curves([1.0, 1.0, 1.0, -1.0, -1.0]), N), (curves([-1.0] * 5, r2=0.5), N),
    (curves([-1.0, -1.0, -1.0, -1.0, 1.0, 1.0]), INC), (curves([-1.0, -1.0]), INC)])
def test_claim_concave_quadratic_verdicts(data, verdict):
    v = C.concave_quadratic(data)
    assert v.verdict == verdict and v.numbers.get("flat_excluded") == 1


def test_claim_concave_quadratic_reports_how_the_models_lambda_star_matches_the_fit():
    data = curves([-1.0] * 6)
    exact = np.array([0, 0, 0.5, 2.0, -3.0, 4.0, 8.0])  # row 0 is the flat detach curve
    data["diag/sgd/lambda_star"] = exact
    data["diag/curve/lambda_star"] = 2 * exact  # monotone, same signs, a factor of 2 where positive
    v = C.concave_quadratic(data)
    assert v.numbers["exact_vs_fit_points"] == 6
    assert v.numbers["exact_vs_fit_spearman"] == pytest.approx(1.0)
    assert v.numbers["exact_vs_fit_sign_agreement"] == 1.0
    assert v.numbers["exact_vs_fit_median_abs_log_ratio"] == pytest.approx(np.log(2))
    assert "Spearman" in v.detail


def test_claim_concave_quadratic_reports_concavity_where_the_model_predicts_it():
    data = curves([-1.0, -1.0, -1.0, 1.0, 1.0, -1.0])
    data["diag/curve/pred_beta"] = [0.0, -2.0, -2.0, -2.0, -2.0, 3.0, 3.0]  # row 0: the flat detach curve
    v = C.concave_quadratic(data)
    assert v.numbers["pred_concave_share"] == pytest.approx(4 / 6)
    assert v.numbers["concave_share_where_pred_concave"] == pytest.approx(3 / 4)
    assert v.numbers["beta_sign_agrees_with_pred"] == pytest.approx(4 / 6)
    assert v.numbers["convex_share_where_pred_convex"] == pytest.approx(1 / 2)
    assert "4 of 6" in v.detail


def ce(fit: list[float], cos_ce: float = 0.05, cos_policy: float = 0.5) -> pd.DataFrame:
    steps = list(range(1, len(fit) + 1))
    return pd.concat([
        rows("ce", steps, **{"diag/curve/lambda_star": fit, "diag/curve/beta": -1.0, "diag/lambda_used": 0.1,
                             "diag/sgd/cosine": cos_ce}),
        rows("policy", [1, 2, 3], **{"diag/sgd/cosine": cos_policy})], ignore_index=True)


@pytest.mark.parametrize("data, verdict", [
    (ce([np.nan, -0.5, 0.01]), S), (ce([1.0, 2.0, 0.5]), N), (ce([np.nan, -0.5, 0.01], cos_ce=0.9), INC),
    (ce([np.nan, 1.0, 2.0]), INC), (ce([np.nan, -0.5]), INC)])
def test_claim_ce_penalty_dominates_verdicts(data, verdict):
    assert C.ce_penalty_dominates(data).verdict == verdict


def policy(adam_c: list[float], sgd_c: list[float], q: float = -5.0) -> pd.DataFrame:
    n = len(adam_c)
    return rows("policy", list(range(1, n + 1)), **{
        "diag/adam/corr": [np.nan, *adam_c[1:]], "diag/adam/curv": [np.nan, *[q] * (n - 1)],
        "diag/sgd/corr": sgd_c, "diag/sgd/curv": -1.0})


@pytest.mark.parametrize("data, verdict", [
    # Adam C decays tenfold while SGD C grows: the verdict must follow Adam's geometry
    (policy([9, 10, 9, 5, 3, 2, 1, 1, 1, 1], [1, 1, 1, 2, 3, 5, 9, 9, 9, 9]), S),
    (policy([9, 1, 1, 1, 2, 3, 5, 5, 5, 5], [9] * 10), N),
    (policy([9, 10, 9, 8, 7, 7, 7, 7, 7, 7], [9] * 10), INC),
    (policy([9, 10, 1], [1, 1, 1]), INC)])
def test_claim_policy_corr_decays_verdicts(data, verdict):
    v = C.policy_corr_decays(data)
    assert v.verdict == verdict and v.numbers["geometry"] == "adam"


def evals(occ: list[float], detach: list[float]) -> pd.DataFrame:
    recs = [{"run": f"{reg}_{seed}", "regime": reg, "seed": seed, "suite": suite, "greedy_acc": acc + 0.01 * k}
            for reg, accs in (("occ", occ), ("detach", detach)) for seed, acc in enumerate(accs)
            for k, suite in enumerate(SUITES)]
    return pd.DataFrame(recs)


@pytest.mark.parametrize("data, verdict", [
    (evals([0.51, 0.50, 0.52], [0.50, 0.50, 0.50]), S), (evals([0.40, 0.41, 0.39], [0.50, 0.50, 0.50]), N),
    (evals([0.40, 0.50, 0.30], [0.50, 0.50, 0.50]), INC), (evals([0.6], [0.5]), INC)])
def test_claim_occ_matches_detach_verdicts(data, verdict):
    v = C.occ_matches_detach(data)
    assert v.verdict == verdict
    if verdict != INC or v.numbers.get("occ_seeds", 0) > 1:
        assert v.numbers["suites"] == 6 and v.numbers["diff/addition"] == pytest.approx(v.numbers["diff"])


def proxies(fit: list[float], ref: list[float]) -> pd.DataFrame:
    steps = list(range(1, len(fit) + 1))
    return pd.concat([rows("policy", steps, **{"diag/curve/lambda_star": fit, "lambda/reference": ref,
                                               "lambda/least_squares": ref}),
                      rows("ce", steps, **{"diag/curve/lambda_star": fit, "lambda/reference": fit[::-1]})],
                     ignore_index=True)


FIT = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


@pytest.mark.parametrize("data, verdict", [
    # the exact zeros (first minibatch after a rollout) would break the ranking if they were kept
    (proxies([*FIT, 5.0, 5.0], [*[x * 0.3 for x in FIT], 0.0, 0.0]), S),
    (proxies(FIT, FIT[::-1]), N),
    (proxies(FIT, [0.3, 0.1, 0.2, 0.6, 0.4, 0.5, 0.9, 0.7, 0.2, 0.3]), INC),
    (proxies(FIT[:4], FIT[:4]), INC)])
def test_claim_proxy_tracks_lambda_star_verdicts(data, verdict):
    v = C.proxy_tracks_lambda_star(data)
    assert v.verdict == verdict
    if verdict == S:
        assert v.numbers["dropped_zero_by_construction"] == 2 and v.numbers["points"] == 10
        assert v.numbers["sign_agreement"] == 1.0 and v.numbers["median_abs_log_ratio"] == pytest.approx(-math.log(0.3))


def timings(occ_s: float, n: int = 6) -> pd.DataFrame:
    steps = list(range(1, n + 1))
    diag = [0.5 if s == 1 else 0.0 for s in steps]  # the diagnosed step is slow and left out
    return pd.concat([rows("occ", steps, **{"perf/train_s": [9.0, *[occ_s] * (n - 1)], "perf/diag_s": diag}),
                      rows("detach", steps, **{"perf/train_s": [9.0, *[0.010] * (n - 1)], "perf/diag_s": diag})],
                     ignore_index=True)


@pytest.mark.parametrize("data, verdict", [
    (timings(0.0101), S), (timings(0.0120), N), (timings(0.0107), INC), (timings(0.0101, n=3), INC)])
def test_claim_occ_time_cost_verdicts(data, verdict):
    v = C.occ_time_cost(data)
    assert v.verdict == verdict and v.numbers["diagnosed_excluded"] == 2


def test_every_claim_is_inconclusive_without_data():
    empty = pd.DataFrame({"run": [], "regime": [], "seed": [], "step": []})
    verdicts = C.evaluate_claims(empty, empty, pd.DataFrame(columns=["run", "regime", "seed", "suite", "greedy_acc"]))
    assert [v.verdict for v in verdicts] == [INC] * 6


def test_claims_on_the_synthetic_study_follow_its_construction(frames):
    v = {x.claim[0]: x for x in C.evaluate_claims(frames["metrics"], frames["probes"], frames["evals"])}
    assert v["1"].verdict == S and v["2"].verdict == S and v["3"].verdict == S
    assert v["5"].verdict == S and v["6"].verdict == S


# ------------------------------------------------------------------ report


def test_report_on_synthetic_runs_draws_every_figure_and_states_six_claims(study, tmp_path):
    summary = write_report([study], tmp_path)
    text = summary.read_text()
    for stem, *_ in FIGURES:
        assert (tmp_path / f"{stem}.png").stat().st_size > 1000 and f"]({stem}.png)" in text
    assert "Skipped figures" not in text
    assert all(claim in text for claim in (C.CLAIM_CONCAVE, C.CLAIM_CE, C.CLAIM_DECAY, C.CLAIM_OCC, C.CLAIM_PROXY,
                                           C.CLAIM_COST))
    assert f"R² ≥ {C.CONCAVE_R2}" in text and "| synthetic__occ__1 | occ | 1 | 24 |" in text
    assert "| regime | addition |" in text


def test_report_lists_figures_without_data_as_skipped_with_the_reason(tmp_path):
    make_study(tmp_path / "runs", regimes=("detach", "occ"), seeds=(0,), with_probes=False, with_eval=False)
    text = write_report([tmp_path / "runs"], tmp_path / "out").read_text()
    assert (tmp_path / "out" / "f1_reward.png").exists() and (tmp_path / "out" / "f2_decomposition.png").exists()
    assert not (tmp_path / "out" / "f3_curves.png").exists()
    assert "* F3 measured curves: F3 measured curves: the data lacks the column(s) ['curve/lams'" in text
    assert "* F5 evaluation suites:" in text and "_no eval.json results_" in text


def test_report_end_to_end_on_a_tiny_real_run(tmp_path, monkeypatch):
    from rl_fixtures import inject_random_advantages, make_checkpoint, rl_config

    from occ_theory.diagnostics.offline import recompute_run
    from occ_theory.train.rl import run_rl

    inject_random_advantages(monkeypatch)
    ck = make_checkpoint(tmp_path / "ck")
    for regime in ("policy", "occ"):
        recompute_run(run_rl(rl_config(ck, regime, "rl.steps=4", "diag.every=2"), out_dir=tmp_path / "runs" / regime))
    summary = write_report([tmp_path / "runs"], tmp_path / "out")
    text = summary.read_text()
    assert text.count("| **") == 6 and "| policy | policy | 0 | 4 |" in text
    for stem, fn, *_ in FIGURES:  # every figure is drawn or listed as skipped
        assert (tmp_path / "out" / f"{stem}.png").exists() or f"* {fn.TITLE}:" in text
    for stem in ("f1_reward", "f2_decomposition", "f3_curves", "f4_proxies", "f5_eval", "f6_module_cosine"):
        assert (tmp_path / "out" / f"{stem}.png").exists()
    assert json.loads((tmp_path / "runs" / "occ" / "eval.json").read_text())["suites"]


def test_analysis_never_imports_torch():
    code = "import analysis.report, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
