"""``occ bench``: the report's structure, the trainer benchmark's skip, and the helpers (no timing assertions)."""

import json
import sys

import pytest
import torch

from occ_theory.bench import Settings, common, run_one, settings_from
from occ_theory.bench.rollout import generated_tokens, left_pad, random_prompts
from occ_theory.cli import build_parser, main


def test_quick_step_and_rollout_write_json_with_ratios_and_targets_and_a_markdown_report(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "step", "rollout", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert {"cpu", "cores", "threads", "torch", "transformers", "cuda"} <= set(doc["machine"])
    assert doc["settings"]["quick"] and doc["settings"]["names"] == ["step", "rollout"]

    step = doc["benchmarks"]["step"]
    assert step["error"] is None and step["memory"]["peak_rss_mb"] > 0
    rows = {r["contender"]: r for r in step["rows"]}
    geometry = "one more geometry (4 geometries vs 3 geometries)"
    rules = {"real", "adam_step", "cosine", "cosine_weighted", "pcgrad", "upgrad"}
    assert set(rows) == {"detach", "occ/reference", "occ/least_squares", "occ/fisher", "policy", "policy+diagnostics",
                         geometry, "run, no probes", "run + probes every 4",
                         "run + probes every 4 with the real step"} | rules
    for name in rules:
        assert rows[name]["vs"] == "detach" and rows[name]["ratio"] > 0 and rows[name]["target"] is None
    assert rows[geometry]["target"] == "<= 1" and rows[geometry]["ratio"] > 0
    assert rows["run + probes every 4"]["vs"] == "run, no probes" and rows["run + probes every 4"]["ratio"] > 1
    for name in ("occ/reference", "occ/least_squares", "occ/fisher"):
        assert rows[name]["vs"] == "detach" and rows[name]["target"] == "<= 1.03"
        assert rows[name]["ratio"] > 0 and isinstance(rows[name]["met"], bool)
    assert rows["policy+diagnostics"]["vs"] == "policy" and rows["policy+diagnostics"]["target"] == "<= 8"
    assert rows["detach"]["ratio"] is None and rows["detach"]["median_ms"] > 0

    rollout = doc["benchmarks"]["rollout"]
    assert rollout["error"] is None
    contenders = ["hand-written static-KV", "generate dynamic", "generate static"]  # --quick: no compiled one
    assert [(r["batch"], r["contender"]) for r in rollout["rows"]] == [(b, c) for b in (64, 8) for c in contenders]
    for r in rollout["rows"]:
        assert r["tok_s"] > 0 and 0 < r["tok_per_row"] <= 40 and r["first_call_s"] > 0
        assert (r["ratio"] is None) == (r["contender"] == "hand-written static-KV")
        assert r["ratio"] is None or r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
    decision = rollout["tables"]["hand-written against the fastest generate"]
    assert [d["batch"] for d in decision] == [64, 8]
    for d in decision:
        assert d["target"] == ">= 1.5" and d["best generate"] in contenders[1:] and isinstance(d["met"], bool)
        best = next(r for r in rollout["rows"] if (r["batch"], r["contender"]) == (d["batch"], d["best generate"]))
        assert d["ratio"] == best["ratio"]

    md = out.with_suffix(".md").read_text()
    assert "## step" in md and "## rollout" in md and "| contender |" in md and doc["machine"]["cpu"] in md


def test_trainer_benchmark_skips_cleanly_without_trl(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now raises ImportError
    s = settings_from(build_parser().parse_args(["bench", "--quick", "trainer"]))
    res = run_one("trainer", s)
    assert res.error is None and res.rows == []
    assert "TRL is not importable" in res.skipped and "occ-theory[trl]" in res.skipped
    assert "skipped: TRL is not importable" in common.render(res)


def test_pretrained_benchmark_skips_cleanly_without_the_model(tmp_path):
    s = settings_from(build_parser().parse_args(["bench", "--quick", "pretrained", "--pretrained-dir",
                                                 str(tmp_path / "absent")]))
    assert s.argv()[-2:] == ["--pretrained-dir", str(tmp_path / "absent")]
    res = run_one("pretrained", s)
    assert res.error is None and res.rows == []
    assert "occ models fetch smollm2" in res.skipped and "--pretrained-dir" in res.skipped


def test_hvp_benchmark_still_gives_both_methods_against_the_gradient():
    from occ_theory.bench.hvp import bench_hvp

    res = bench_hvp(["tiny"], repeats=1)
    assert [r["method"] for r in res.rows] == ["fwd-rev", "rev-rev"]
    assert all(r["ratio"] > 0 and r["target"] == "<= 3" for r in res.rows)


def test_settings_reject_unknown_benchmarks_and_sizes_before_any_work():
    parse = build_parser().parse_args
    with pytest.raises(ValueError, match="unknown benchmark"):
        settings_from(parse(["bench", "nope"]))
    with pytest.raises(ValueError, match="--sizes"):
        settings_from(parse(["bench", "--sizes", "huge"]))
    s = settings_from(parse(["bench", "--quick"]))
    assert s == Settings(("hvp", "step", "rollout", "trainer", "scaling"), 2, ("tiny",), 1, True, 900.0)  # 135M: named only
    assert settings_from(parse(["bench", "pretrained"])).names == ("pretrained",)
    assert settings_from(parse(["bench"])).repeats == 7


def test_interleave_rotates_the_starting_contender_and_pairs_rounds():
    order = []
    fns = {k: (lambda k=k: order.append(k) or k) for k in "abc"}
    s = common.interleave(fns, rounds=3, warmup=1, memory=False)
    assert order[:3] == list("abc") and order[3:] == list("abc") + list("bca") + list("cab")
    assert all(len(x.times) == 3 and x.values == [k] * 3 for k, x in s.items())


def test_measure_memory_sees_an_allocation_on_top_of_live_memory():
    if not common.PEAK.can_reset:
        pytest.skip("no /proc/self/clear_refs: per-call peaks are unavailable here")
    s = common.Samples()
    common.measure_memory(lambda: torch.ones(64 * 1024 * 1024 // 4).add_(1).sum(), s)  # 64 MB, freed at once
    assert s.rss_delta_mb > 48 and s.peak_rss_mb >= s.rss_delta_mb


def test_generated_tokens_count_like_the_sampler_up_to_and_including_eos(tmp_path):
    eos, pad = 2, 0
    out = torch.tensor([[9, 5, 2, 0, 0], [9, 5, 6, 7, 8], [9, 2, 0, 0, 0]])  # prompt width 1
    assert generated_tokens(out, 1, eos) == 2 + 4 + 1

    from occ_theory.bench.fixtures import checkpoint
    from occ_theory.models import load_model, load_tokenizer
    from occ_theory.rl.sampler import generate

    ckpt = checkpoint(tmp_path / "ckpt")
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    prompts = random_prompts(8, tok.bos_token_id, 100, seed=0)
    assert all(6 <= len(p) <= 14 for p in prompts)
    ro = generate(model, prompts, 40, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                  generator=torch.Generator().manual_seed(0))
    assert generated_tokens(ro.input_ids, ro.prompt_len, tok.eos_token_id) == int(ro.response_lengths.sum())
    ids, mask = left_pad(prompts, pad)
    assert ids.shape == mask.shape and int(mask.sum()) == sum(map(len, prompts))


def test_report_pieces():
    assert common.target(1.02, "<=", 1.03) == {"ratio": 1.02, "target": "<= 1.03", "met": True}
    assert common.target(1.4, ">=", 1.5)["met"] is False
    table = common.markdown_table([{"a": 1.23456, "met": False}, {"a": None, "met": True}])
    assert table.splitlines()[2] == "| 1.23 | **NO** |" and table.splitlines()[3] == "|  | yes |"
    res = common.BenchResult("x", rows=[{"a": 1}], tables={"fits": [{"b": 2}]}, notes=["why"],
                             memory={"peak_rss_mb": 10.0})
    text = common.render(res)
    assert "## x" in text and "fits:" in text and "* why" in text and "peak_rss_mb 10" in text


def test_the_whole_run_rows_run_two_rounds_in_the_same_folder(tmp_path):
    """The full mode's whole-run rows: every round a fresh run in the same run directory (round 2 once crashed on
    the directory round 1 left), the default probe against no probes with the target, the real step's beside it."""
    from rl_fixtures import make_checkpoint

    from occ_theory.bench.step import RUN_TARGET, _run_rows

    rows = {r["contender"]: r for r in _run_rows(make_checkpoint(tmp_path / "ck"), tmp_path, 1, 2, 4, 2)}
    assert list(rows) == ["run, no probes", "run + probes every 2", "run + probes every 2 with the real step"]
    assert all(r["calls"] == 2 and r["median_ms"] > 0 for r in rows.values())
    assert rows["run + probes every 2"]["target"] == f"<= {RUN_TARGET:g}"
    assert rows["run + probes every 2 with the real step"]["target"] is None
    assert rows["run + probes every 2 with the real step"]["vs"] == "run, no probes"
