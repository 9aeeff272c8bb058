"""Where ``occ figures`` writes, what it never overwrites, and ``summary.json`` with the README table from it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from analysis_fixtures import make_study, synthetic_metrics, write_run

from analysis.load import RunFileError
from analysis.readme_table import BEGIN, END, generated_block, render
from analysis.readme_table import main as readme_main
from analysis.report import MARKER_FILE, SUMMARY_JSON, write_report


def small_runs(root: Path) -> Path:
    """One detach run without probes or eval: a report of two figures, fast."""
    write_run(root / "runs", "detach__0", "detach", 0, synthetic_metrics("detach", 0, steps=6))
    return root / "runs"


def test_the_default_output_goes_beside_the_runs_not_into_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "figures").mkdir()
    summary = write_report([small_runs(tmp_path)])
    assert summary == (tmp_path / "runs" / "report" / "summary.md").resolve()
    assert list((tmp_path / "figures").iterdir()) == []


def test_a_non_empty_folder_it_did_not_create_is_not_overwritten_without_force(tmp_path):
    runs, out = small_runs(tmp_path), tmp_path / "figures"
    (out / "calibration").mkdir(parents=True)
    (out / "f1_reward.png").write_bytes(b"committed figure")
    (out / "f3_curves.png").write_bytes(b"committed figure this report does not draw")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"--out .*figures: not empty.*--force"):
        write_report([runs], out)
    assert (out / "f1_reward.png").read_bytes() == b"committed figure" and not (out / "summary.md").exists()
    write_report([runs], out, force=True)
    assert (out / "f1_reward.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "f3_curves.png").exists()  # a stale report figure is removed ...
    assert (out / "notes.txt").read_text() == "mine" and (out / "calibration").is_dir()  # ... nothing else


def test_the_report_of_the_same_runs_is_refreshed_without_force_and_drops_stale_figures(tmp_path):
    runs, out = small_runs(tmp_path), tmp_path / "out"
    write_report([runs], out)
    (out / "f8_geometries.png").write_bytes(b"from an earlier report")
    write_report([runs], out)
    assert not (out / "f8_geometries.png").exists()
    assert "f1_reward.png" in json.loads((out / MARKER_FILE).read_text())["files"]
    other = write_run(tmp_path / "other", "r", "detach", 1, synthetic_metrics("detach", 1, steps=6))
    with pytest.raises(ValueError, match="not a report of these runs"):
        write_report([other], out)


def test_a_probe_file_no_run_has_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"--probes typo\.parquet: no run has this file"):
        write_report([small_runs(tmp_path)], tmp_path / "out", probes_file="typo.parquet")
    assert not (tmp_path / "out").exists()


def test_no_output_folder_is_created_when_there_are_no_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFileError, match="no run directory"):
        write_report([tmp_path / "empty"], tmp_path / "X")
    assert not (tmp_path / "X").exists()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("study")
    make_study(root, regimes=("detach", "occ"), steps=12)
    return write_report([root / "runs"], root / "out").parent


def test_summary_json_holds_every_claim_the_held_out_table_the_arms_and_learning(report):
    s = json.loads((report / SUMMARY_JSON).read_text())
    assert [c["id"] for c in s["claims"]] == ["1a", "1b", "clip", "2", "3", "4", "forgetting", "length", "5", "6", "7"]
    c4 = next(c for c in s["claims"] if c["id"] == "4")
    assert c4["verdict"] == "supported" and "non-inferiority" in c4["thresholds"]
    assert c4["numbers"]["margin"] == pytest.approx(0.2 * s["learning"]["baseline_gain"])
    assert c4["numbers"]["control_sft/verdict"] == "not supported"
    assert s["arms"] == {"detach": 3, "occ/reference": 3, "sft": 1}
    assert set(s["held_out"]["arms"]) == {"detach", "occ/reference", "sft"}
    cell = s["held_out"]["arms"]["detach"]["mean"]["mean_at_k"]
    assert cell["n"] == 3 and 0 < cell["sd"] < 0.05
    assert s["learning"]["baseline_arm"] == "detach" and s["learning"]["learned"] is True
    assert s["learning"]["baseline_gain"] == pytest.approx(cell["mean"] - 0.3, abs=0.02)  # on the 5 RL suites


def test_summary_json_round_trips_into_the_readme_table(report, capsys):
    s = json.loads((report / SUMMARY_JSON).read_text())
    table = render(s)
    for c in s["claims"]:
        assert f"| **{c['verdict']}** |" in table and c["claim"] in table
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    suites = s["held_out"]["suites"]
    for arm, entry in s["held_out"]["arms"].items():
        cells = rows[arm].strip("| ").split(" | ")[1:]
        for suite, text in zip([*suites, "mean"], cells):
            st = entry[suite]["mean_at_k"]
            mean, n = re.fullmatch(r"([\d.]+)(?: ± [\d.]+)? \((\d+)\)", text).groups()
            assert float(mean) == pytest.approx(st["mean"], abs=5e-4) and int(n) == st["n"]
        assert float(cells[-1]) == pytest.approx(entry["mean"]["greedy_acc"]["mean"], abs=5e-4)
    assert f"gained {s['learning']['baseline_gain']:.3f}" in table
    assert readme_main([str(report / SUMMARY_JSON)]) == 0 and capsys.readouterr().out == table


def test_the_readme_table_is_spliced_between_its_markers_and_nothing_else_moves(report, tmp_path, capsys):
    tables = render(json.loads((report / SUMMARY_JSON).read_text()))
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\nprose before\n{BEGIN}\nstale table\n{END}\nprose after\n")
    assert readme_main([str(report / SUMMARY_JSON), str(readme)]) == 0
    text = readme.read_text()
    assert generated_block(text) == tables and text.startswith("# title\nprose before\n")
    assert text.endswith(f"{END}\nprose after\n") and "stale" not in text
    readme.write_text("no markers\n")
    assert readme_main([str(report / SUMMARY_JSON), str(readme)]) == 2 and "expected one" in capsys.readouterr().err
    assert readme.read_text() == "no markers\n"


def test_the_committed_results_page_holds_the_committed_summary():
    """The reference experiment's numbers are figures/summary.json's, rendered, never typed in."""
    root = Path(__file__).resolve().parents[1]
    summary = root / "figures" / SUMMARY_JSON
    if not summary.is_file():
        pytest.skip("no committed figures/summary.json yet")
    assert generated_block((root / "docs" / "results.md").read_text()) == render(json.loads(summary.read_text()))


def test_copies_of_one_run_count_once_whatever_their_names(tmp_path):
    """The new user's case: runs are bit-for-bit deterministic on CPU, so three runs of an arm started without
    --seed are copies. Each arm's copies count once in the verdicts and the arms' seed counts, and are named."""
    import shutil

    make_study(tmp_path, regimes=("detach", "occ"), seeds=(0,), steps=12)
    runs = tmp_path / "runs"
    for src in list(runs.iterdir()):
        for i in (1, 2):
            shutil.copytree(src, runs / f"{src.name}_copy{i}")
    s = json.loads((write_report([runs], tmp_path / "out").parent / SUMMARY_JSON).read_text())
    assert s["arms"] == {"detach": 1, "occ/reference": 1, "sft": 1} and len(s["runs"]) == 2
    assert len(s["repeats"]) == 4 and all("as synthetic__" in r["why"] for r in s["repeats"])
    claims = {c["id"]: c for c in s["claims"]}
    assert claims["4"]["verdict"].startswith("inconclusive") and claims["5"]["verdict"].startswith("inconclusive")
    # a copy whose config was edited to claim another seed is still the same training log: counted once
    cfg = runs / "synthetic__occ__0_copy1" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("seed: 0", "seed: 7"))
    s = json.loads((write_report([runs], tmp_path / "out2").parent / SUMMARY_JSON).read_text())
    assert s["arms"]["occ/reference"] == 1 and any("same training log" in r["why"] for r in s["repeats"])


def test_a_broken_run_stops_the_report_in_one_line_unless_skipped_and_is_named(tmp_path):
    make_study(tmp_path, regimes=("detach", "occ"), seeds=(0, 1), steps=12)
    runs = tmp_path / "runs"
    (runs / "synthetic__occ__1" / "config.yaml").write_text("rl: [unclosed\n")
    (runs / "headless").mkdir()
    (runs / "headless" / "metrics.jsonl").write_text('{"step": 1}\n')
    torn = runs / "synthetic__detach__1" / "metrics.jsonl"
    torn.write_text(torn.read_text() + '{"step": 13, "rew')
    with pytest.raises(ValueError) as err:
        write_report([runs], tmp_path / "out")
    msg = str(err.value)
    assert "\n" not in msg and "synthetic__occ__1/config.yaml" in msg and "not valid YAML at line" in msg
    assert "--skip-bad" in msg
    assert not (tmp_path / "out").exists()
    s = json.loads((write_report([runs], tmp_path / "out", skip_bad=True).parent / SUMMARY_JSON).read_text())
    dropped = {Path(d["run"]).name: d["why"] for d in s["dropped"]}
    assert set(dropped) == {"synthetic__occ__1", "headless"} and dropped["headless"] == "no config.yaml"
    assert any(p["run"] == "synthetic__detach__1" and "cut off" in p["why"] for p in s["partial"])
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "Left out (cannot be read)" in text and "headless" in text and "Partial" in text
    from occ_theory.cli import main  # the same through occ figures

    assert main(["figures", str(runs), "--out", str(tmp_path / "cli")]) == 2 and not (tmp_path / "cli").exists()
    assert main(["figures", str(runs), "--out", str(tmp_path / "cli"), "--skip-bad"]) == 0
    assert "synthetic__occ__1" in (tmp_path / "cli" / "summary.md").read_text()


def test_the_most_complete_copy_of_a_run_is_the_one_counted(tmp_path):
    """A crashed run and its complete rerun of one arm and seed: the one with eval.json counts, whatever the names."""
    import shutil

    make_study(tmp_path, regimes=("detach",), seeds=(0,), steps=12)
    runs = tmp_path / "runs"
    done = runs / "synthetic__detach__0"
    crashed = runs / "a_crashed_copy"
    shutil.copytree(done, crashed)
    (crashed / "eval.json").unlink()
    lines = (crashed / "metrics.jsonl").read_text().splitlines()[:5]
    (crashed / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    s = json.loads((write_report([runs], tmp_path / "out").parent / SUMMARY_JSON).read_text())
    assert [r["name"] for r in s["runs"]] == ["synthetic__detach__0"]
    assert s["repeats"] == [{"run": "a_crashed_copy", "why": "arm detach seed 0, as synthetic__detach__0"}]
