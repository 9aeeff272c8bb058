"""Offline analysis: loading run files, the figures' column checks, the report on a synthetic study.

The verdict rules are tested one by one in ``test_analysis_verdicts.py``; where a report writes and what
it never overwrites, and ``summary.json``, in ``test_analysis_report.py``."""

from __future__ import annotations

import fnmatch
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from analysis_fixtures import make_study, synthetic_metrics, write_run

import analysis
from analysis import claims as C
from analysis import figures as F
from analysis import outcome as O
from analysis.claims_curve import CLAIM_CLIP, CLAIM_LOCAL, CLAIM_WIDE
from analysis.frames import (
    ALL_GEOMETRIES,
    SUITES,
    eval_frame,
    held_out_frame,
    metrics_frame,
    probes_frame,
    sft_eval_frame,
)
from analysis.load import (
    STEP_COST_FILE,
    RunFileError,
    arm_name,
    load_run,
    load_runs,
    read_step_cost,
    step_cost_path,
)
from analysis.outcome import held_out_table
from analysis.report import FIGURES, write_report
from analysis.stats import loglog_slope
from analysis.verdict import SUPPORTED

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A folder of 12 synthetic runs (detach, ce, policy, occ × 3 seeds) started from one SFT checkpoint."""
    root = tmp_path_factory.mktemp("study")
    make_study(root)
    return root / "runs"


@pytest.fixture(scope="module")
def frames(study) -> dict[str, pd.DataFrame]:
    runs = load_runs([study])
    frames = {"metrics": metrics_frame(runs), "probes": probes_frame(runs), "evals": eval_frame(runs),
              "sft": sft_eval_frame(runs)}
    return frames | {"held_out": held_out_frame(frames["evals"], frames["sft"])}


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
    assert run.sft_eval is not None and run.sft_eval["suites"]["addition"]["mean_at_k"] == pytest.approx(0.3)


def test_a_relative_rl_init_is_found_from_a_folder_above_the_run(tmp_path):
    (tmp_path / "exp" / "sft" / "ck").mkdir(parents=True)
    (tmp_path / "exp" / "sft" / "ck" / "eval.json").write_text(json.dumps({"suites": {"a": {"greedy_acc": 0.5}}}))
    run = write_run(tmp_path / "exp" / "runs", "r", "policy", 0, [], init="exp/sft/ck")
    assert load_run(run).sft_eval["suites"]["a"]["greedy_acc"] == 0.5
    assert load_run(write_run(tmp_path, "r2", "policy", 0, [], init="nowhere/ck")).sft_eval is None


@pytest.mark.parametrize("regime, rl, arm", [
    ("detach", {"mtp_coef": 0.1}, "detach"), ("ce", {"mtp_coef": 0.1}, "ce@0.1"), ("policy", {"mtp_coef": 0.03},
    "policy@0.03"), ("occ", {"proxy": "fisher", "mtp_coef": 0.1}, "occ/fisher"),
    ("cosine", {"mtp_coef": 0.1}, "cosine"), ("real", {"mtp_coef": 0.1}, "real"),
    ("detach", {"mtp_coef": 0.1, "clip_scope": "separate"}, "detach/separate"),
    ("policy", {"mtp_coef": 0.3, "clip_scope": "shared"}, "policy@0.3/shared")])
def test_arm_names_say_what_distinguishes_runs_of_one_regime(regime, rl, arm):
    assert arm_name(regime, rl) == arm


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
    assert len(runs) == 12 and len({r.name for r in runs}) == 12


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
    needed = next(c for c in fn.REQUIRES if c not in ("run", "regime", "arm", "step", "seed"))
    df = frames[frame]
    df = df.drop(columns=fnmatch.filter(df.columns, needed))
    with pytest.raises(ValueError, match=rf"{re.escape(fn.TITLE)}.*{re.escape(needed)}"):
        fn(df, tmp_path / "x.png")


def test_figures_without_data_for_their_regimes_say_so(frames, tmp_path):
    detach_only = frames["probes"][frames["probes"]["regime"] == "detach"]
    with pytest.raises(ValueError, match="no probe with a measured, non-flat curve"):
        F.f3_curves(detach_only, tmp_path / "f3.png")
    with pytest.raises(ValueError, match="no finite per-module cosine"):
        F.f6_module_cosine(frames["metrics"][frames["metrics"]["regime"] == "detach"], tmp_path / "f6.png")


def test_every_regime_and_the_sft_arm_have_a_colour_of_their_own():
    from analysis.style import _EXTRA, REGIME_COLORS
    from occ_theory.names import REGIMES

    assert set(REGIMES) | {"sft"} <= set(REGIME_COLORS)
    assert len(set(REGIME_COLORS.values()) | set(_EXTRA)) == len(REGIME_COLORS) + len(_EXTRA)


def test_a_figure_writes_a_pdf_beside_the_png_when_asked(frames, tmp_path):
    F.f5_eval(frames["evals"], tmp_path / "f5.png", pdf=True)
    assert (tmp_path / "f5.pdf").read_bytes()[:4] == b"%PDF"


def test_f3_with_one_curve_uses_one_panel_of_canvas(frames, tmp_path):
    from matplotlib.image import imread

    probes = frames["probes"]
    one = probes[(probes["run"] == "synthetic__policy__0") & (probes["step"] == 8)]
    three = probes[probes["run"] == "synthetic__policy__0"]
    w_one = imread(F.f3_curves(one, tmp_path / "one.png")).shape[1]
    w_three = imread(F.f3_curves(three, tmp_path / "three.png")).shape[1]
    assert w_one < 0.4 * w_three


def test_f3_draws_the_real_step_curves_when_logged_else_the_model_curve(frames):
    row = frames["probes"][frames["probes"]["regime"] == "policy"].iloc[3]
    assert [c[0] for c in F._curves_of(row)] == ["real step, fine grid", "real step, local grid"]
    model_only = row.drop([k for k in row.index if str(k).startswith("curve/real_")])
    assert [c[0] for c in F._curves_of(model_only)] == ["model step"]


def test_held_out_table_has_every_arm_and_the_sft_checkpoint_with_sampled_and_greedy(frames):
    table = held_out_table(frames["evals"], frames["sft"])
    assert table["primary"] == "mean_at_k" and table["suites"] == list(SUITES)
    assert list(table["arms"]) == ["detach", "ce@0.1", "policy@0.1", "occ/reference", "sft"]
    det = frames["evals"][(frames["evals"]["arm"] == "detach") & (frames["evals"]["suite"] == "addition")]
    cell = table["arms"]["detach"]["addition"]["mean_at_k"]
    assert cell["n"] == 3 and cell["mean"] == pytest.approx(det["mean_at_k"].mean())
    assert cell["sd"] == pytest.approx(det["mean_at_k"].std(ddof=1))
    sft = table["arms"]["sft"]["mean"]["mean_at_k"]
    assert sft["n"] == 1 and sft["mean"] == pytest.approx(0.3)  # one checkpoint, however many runs started from it
    assert table["arms"]["ce@0.1"]["mean"]["greedy_acc"]["n"] == 3


# ------------------------------------------------------------------ statistics


def test_loglog_slope_recovers_the_power_across_series_with_different_offsets():
    x = 1e-3 / 2.0 ** np.arange(4)
    assert loglog_slope([x, x], [7 * x**3, 0.01 * x**3]) == pytest.approx(3.0)


def test_claims_on_the_synthetic_study_follow_its_construction(frames):
    verdicts, learn = C.evaluate_claims(frames["metrics"], frames["probes"], frames["evals"], frames["sft"])
    v = {x.id: x.verdict for x in verdicts}
    assert learn["learned"] is True and learn["baseline_arm"] == "detach"
    assert all(v[i] == SUPPORTED for i in ("1a", "1b", "clip", "2", "3", "4", "5", "6")), v
    assert v["7"].startswith("inconclusive")  # one fixed λ per loss


# ------------------------------------------------------------------ report


def test_report_on_synthetic_runs_draws_every_figure_and_states_every_claim(study, tmp_path):
    summary = write_report([study], tmp_path)
    text = summary.read_text()
    for stem, *_ in FIGURES:
        assert (tmp_path / f"{stem}.png").stat().st_size > 1000 and f"]({stem}.png)" in text
    assert "Skipped figures" not in text
    assert all(claim in text for claim in (CLAIM_LOCAL, CLAIM_WIDE, CLAIM_CLIP, C.CLAIM_CE, C.CLAIM_DECAY, O.CLAIM_OCC,
                                           C.CLAIM_PROXY, C.CLAIM_COST, O.CLAIM_LAMBDA))
    assert "| synthetic__occ__1 | occ/reference | 1 | 24 |" in text and "| arm | addition |" in text


def test_report_lists_figures_without_data_as_skipped_with_the_reason(tmp_path):
    make_study(tmp_path / "runs", regimes=("detach", "occ"), seeds=(0,), with_probes=False, with_eval=False)
    text = write_report([tmp_path / "runs"], tmp_path / "out").read_text()
    assert (tmp_path / "out" / "f1_reward.png").exists() and (tmp_path / "out" / "f2_decomposition.png").exists()
    assert not (tmp_path / "out" / "f3_curves.png").exists()
    assert "* F3 measured curves: F3 measured curves: the data lacks the column(s) ['curve/*lams'" in text
    assert "* F5 evaluation suites:" in text and "_no eval.json results_" in text


def test_report_end_to_end_on_a_tiny_real_run(tmp_path, monkeypatch):
    from rl_fixtures import inject_random_advantages, make_checkpoint, rl_config

    from occ_theory.bench.cost import write_step_cost
    from occ_theory.diagnostics.offline import recompute_run
    from occ_theory.train.rl import run_rl

    inject_random_advantages(monkeypatch)
    ck = make_checkpoint(tmp_path / "ck")
    for regime in ("policy", "occ", "ce", "detach", "cosine"):
        recompute_run(run_rl(rl_config(ck, regime, "rl.steps=4", "diag.every=2", "diag.curve_real_step=true"),
                             out_dir=tmp_path / "runs" / regime))
    # occ cost: one step of each arm, interleaved, beside the runs, where occ figures finds it
    write_step_cost([tmp_path / "runs"], tmp_path / "runs" / STEP_COST_FILE, rounds=6)
    cost = read_step_cost(tmp_path / "runs" / STEP_COST_FILE)
    assert next(iter(cost["arms"])) == "detach" and set(cost["arms"]) == {"detach", "ce@0.1", "policy@0.1",
                                                                           "occ/reference", "cosine"}
    assert cost["minibatch"]["response_tokens"] > 0 and cost["init"] == str(ck)
    summary = write_report([tmp_path / "runs"], tmp_path / "out")
    text = summary.read_text()
    # every key the analysis names is one the trainer and the probe really write (a renamed key would
    # otherwise leave a claim silently without data, as diag/lambda_used once did)
    runs = load_runs([tmp_path / "runs"])
    have = set().union(*(set(r.metrics.columns) | set(r.probes.columns) for r in runs))
    src = "".join(p.read_text() for p in Path(analysis.__file__).parent.glob("*.py"))
    named = set(re.findall(r'"((?:diag|lambda|perf|curve|stats|reward)/[A-Za-z0-9_/]+[A-Za-z0-9_])"', src))
    assert named and not sorted(named - have)
    geo = set(re.findall(r'geo_key\(\w+, "(\w+)"\)', src))  # per geometry: written in at least one
    assert geo and not sorted(k for k in geo if not any(f"diag/{g}/{k}" in have for g in ALL_GEOMETRIES))
    claims = {c["id"]: c for c in json.loads((tmp_path / "out" / "summary.json").read_text())["claims"]}
    assert claims["2"]["numbers"]["ce_probes"] > 0
    six = claims["6"]["numbers"]
    assert six["design"] == "interleaved" and six["rounds"] == 10  # 6 rounded up to a multiple of the 5 arms
    assert 0 < six["ratio_lo"] <= six["ratio"] <= six["ratio_hi"] and six["median_detach_s"] > 0
    assert claims["6"]["numbers"]["separate_runs_ratio"] is None  # one run per arm: no separate-runs ratio
    assert text.count("| **") == 11 and "| policy | policy@0.1 | 0 | 4 |" in text
    for stem, fn, *_ in FIGURES:  # every figure is drawn or listed as skipped
        assert (tmp_path / "out" / f"{stem}.png").exists() or f"* {fn.TITLE}:" in text
    for stem in ("f1_reward", "f2_decomposition", "f3_curves", "f4_proxies", "f5_eval", "f6_module_cosine"):
        assert (tmp_path / "out" / f"{stem}.png").exists()
    assert json.loads((tmp_path / "runs" / "occ" / "eval.json").read_text())["suites"]


def test_step_cost_file_is_validated_and_must_belong_to_the_runs(study, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"rounds": 3, "arms": {"detach": {"times_s": [0.1, 0.2]}}}')
    with pytest.raises(RunFileError, match=r"bad\.json: arm 'detach' needs 'times_s', 3 finite positive seconds"):
        read_step_cost(bad)
    bad.write_text('{"rounds": 2, "arms": {"detach": {"times_s": [0.1, Infinity]}}}')
    with pytest.raises(RunFileError, match="finite positive"):
        read_step_cost(bad)
    bad.write_text("{")
    with pytest.raises(RunFileError, match="not valid JSON"):
        read_step_cost(bad)
    with pytest.raises(RunFileError, match="missing file"):
        write_report([study], tmp_path / "out", step_cost=tmp_path / "none.json")
    other = tmp_path / "other.json"  # another experiment's arms
    other.write_text(json.dumps({"rounds": 1, "arms": {"detach": {"times_s": [0.1]}, "ce@5": {"times_s": [0.1]}}}))
    with pytest.raises(RunFileError, match="times arm 'ce@5', which none of these runs is"):
        write_report([study], tmp_path / "out", step_cost=other)
    other.write_text(json.dumps({"rounds": 1, "arms": {"detach": {"times_s": [0.1], "run": str(tmp_path)}}}))
    with pytest.raises(RunFileError, match="which is not among these runs"):
        write_report([study], tmp_path / "out", step_cost=other)
    assert not (tmp_path / "out").exists()  # checked before anything is written
    assert step_cost_path(d for d in study.iterdir() if d.is_dir()) == study / STEP_COST_FILE


def test_occ_cost_refuses_runs_whose_init_is_not_a_checkpoint(study):
    from occ_theory.bench.cost import arm_runs

    with pytest.raises(ValueError, match=r"rl.init of .*synthetic__.* is not a checkpoint \(no occ_model.json\)"):
        arm_runs([study])  # the synthetic runs' "checkpoint" holds only an eval.json


def test_analysis_never_imports_torch():
    code = "import analysis.report, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_f3_marks_each_curve_with_its_own_models_lambda_star():
    """The new user's case: a model-step curve in the fixed-P adam geometry was marked with adam_step's λ*_m (767,
    7× off) beside a fit of 112; each curve is marked with its own model's λ*, the real step with the real optimum."""
    row = pd.Series({"lambda/used": 0.1, "diag/curve/geometry": "adam", "diag/adam/lambda_star": 96.7,
                     "diag/adam_step/lambda_star": 767.0, "diag/curve/lambda_star": 112.0,
                     "diag/real_optimum/lambda": 0.05, "diag/adam_real/lambda_star_clamped": 0.04})
    model = {name: v for name, v, *_ in F._markers(row, real=False, color="red")}
    assert model["λ*_m (adam, this curve's model)"] == 96.7 and model["vertex of the fit"] == 112.0
    assert not any("adam_step" in name for name in model)
    real = {name: v for name, v, *_ in F._markers(row, real=True, color="red")}
    assert real["λ_opt (real optimum)"] == 0.05 and real["λ*_real (adam_real, clamped)"] == 0.04
