"""What a new user ran into (issue 15): each test reproduces one failure and checks the fix."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from rl_fixtures import inject_random_advantages, make_checkpoint, rl_config

from occ_theory.atomic import atomic_write_text
from occ_theory.cli import main
from occ_theory.errors import Diverged, Interrupted, RunStopped
from occ_theory.jsonl import read_jsonl
from occ_theory.models import build_tokenizer, load_model
from occ_theory.rl.sampler import NonFiniteLogitsError, generate
from occ_theory.tasks import UserTask, is_eval_prompt
from occ_theory.train import sft as sft_mod
from occ_theory.train.config import load_config
from occ_theory.train.logging import MetricsWriter
from occ_theory.train.rl import RLTrainer, latest_checkpoint, resume_rl, run_rl
from occ_theory.train.sft import run_sft

SFT_TINY = ["model.family=qwen2", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1",
            "model.num_heads=2", "model.num_kv_heads=1", "model.max_position_embeddings=128", "model.mtp_depths=1",
            "sft.steps=4", "sft.batch_size=4", "sft.warmup=0", "sft.eval_every=0", "sft.eval_size=2",
            "eval.max_new_tokens=4", "task.suites=[addition]", "threads=1"]
NO_PERF = ("perf/", "rollout/tokens_per_s")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "sft")


@pytest.fixture(scope="module")
def probed_run(ckpt, tmp_path_factory):
    """An RL run with probe bundles at steps 1, 2 and 4."""
    cfg = rl_config(ckpt, "policy", "diag.every=2", "diag.bootstrap=0", "diag.curve_points=3")
    return run_rl(cfg, out_dir=tmp_path_factory.mktemp("probed") / "r")


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(NO_PERF)} for r in read_jsonl(run / "metrics.jsonl")]


def _user_file(path: Path, n: int = 40, long_prompt: str | None = None, odd: bool = False) -> Path:
    rows = [{"prompt": f"{a}+{a + 1}=", "answer": 2 * a + 1} for a in range(n)]
    if long_prompt is not None:
        rows[1]["prompt"] = long_prompt
    if odd:
        rows[2]["prompt"] = "\t1+1 é="
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------ 2: outputs checked before any work


def test_unwritable_outputs_fail_at_once_with_one_line(ckpt, probed_run, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where a directory is expected")
    cases = [
        ["eval", str(ckpt), "--json", str(blocker / "out.json")],
        ["eval", str(ckpt), "--json", str(tmp_path)],  # a directory where a file is expected
        ["sft", "--set", "sft.steps=1", "--out", str(blocker / "run")],
        ["rl", "--init", str(ckpt), "--out", str(blocker / "run")],
        ["figures", str(probed_run), "--out", str(blocker / "figs")],
        ["quickstart", "--out", str(blocker / "qs")],
    ]
    for argv in cases:
        t0 = time.perf_counter()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"occ {argv[0]}: error: ") and err.count("\n") == 1, err
        assert str(blocker) in err or str(tmp_path) in err
        assert time.perf_counter() - t0 < 10, argv  # no model was loaded, nothing computed
    (probed_run / "busy.parquet").mkdir()
    assert main(["probe", str(probed_run), "--set", "diag.grid_cap=1", "--probes", "busy.parquet"]) == 2
    assert "busy.parquet" in capsys.readouterr().err


# ------------------------------------------------------------------ 3: a bad probe bundle


def test_a_bad_bundle_keeps_what_was_computed_and_skip_bad_goes_on(probed_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(probed_run, run)
    bundle = run / "probes" / "step_000002" / "bundle.pt"
    bundle.write_bytes(bundle.read_bytes()[:100])
    assert main(["probe", str(run), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "step_000002" in err and "--skip-bad" in err
    assert not (run / "probes.parquet").exists()  # the output is complete or absent
    assert list(pd.read_parquet(run / "probes.partial.parquet")["step"]) == [1]
    assert main(["probe", str(run), "--skip-bad", "--threads", "1"]) == 0
    assert "step_000002" in capsys.readouterr().err
    assert list(pd.read_parquet(run / "probes.parquet")["step"]) == [1, 4]
    (run / "probes" / "step_000004" / "bundle.pt").unlink()  # a missing bundle
    assert main(["probe", str(run), "--steps", "4", "--probes", "p4.parquet"]) == 2
    assert "step_000004" in capsys.readouterr().err


# ------------------------------------------------------------------ 4: SIGINT / SIGTERM save a checkpoint


def _rl_args(ckpt: Path, out: Path, steps: int) -> list[str]:
    return ["rl", "--init", str(ckpt), "--regime", "policy", "--out", str(out), "--set", f"rl.steps={steps}",
            "--set", "rl.prompts_per_rollout=2", "--set", "rl.group_size=2", "--set", "rl.minibatches=2",
            "--set", "rl.max_new_tokens=6", "--set", "rl.lr=1e-3", "--set", "diag.every=0",
            "--set", "eval.size=2", "--set", "eval.samples=1", "--set", "eval.max_new_tokens=4",
            "--set", "threads=1"]


def test_ctrl_c_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(ckpt, tmp_path):
    run = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "occ_theory.cli", *_rl_args(ckpt, run, 60)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        m = run / "metrics.jsonl"
        if m.exists() and m.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert f"occ rl --resume {run}" in err
    saved = torch.load(latest_checkpoint(run), weights_only=True)["step"]
    assert 1 <= saved < 60 and len(read_jsonl(run / "metrics.jsonl")) == saved
    assert main(["rl", "--resume", str(run)]) == 0
    assert main(_rl_args(ckpt, tmp_path / "straight", 60)) == 0
    assert _metrics(run) == _metrics(tmp_path / "straight")
    assert json.loads((run / "eval.json").read_text()) == json.loads((tmp_path / "straight" / "eval.json").read_text())


def test_sigterm_mid_rollout_checkpoints_the_rest_of_the_rollout(ckpt, tmp_path, monkeypatch):
    inject_random_advantages(monkeypatch)
    cfg = rl_config(ckpt, "occ", "diag.every=0", "rl.steps=6", "rl.minibatches=2")
    original = RLTrainer.train_step

    def step(self, mb, first_after_rollout, **kw):
        rec = original(self, mb, first_after_rollout, **kw)
        if self.step == 3:  # the first minibatch of the second rollout: one minibatch is left
            os.kill(os.getpid(), signal.SIGTERM)
        return rec

    monkeypatch.setattr(RLTrainer, "train_step", step)
    with pytest.raises(Interrupted, match="SIGTERM") as err:
        run_rl(cfg, out_dir=tmp_path / "r")
    assert "occ rl --resume" in str(err.value)
    assert torch.load(latest_checkpoint(tmp_path / "r"), weights_only=True)["step"] == 3
    monkeypatch.setattr(RLTrainer, "train_step", original)
    resume_rl(tmp_path / "r")
    run_rl(cfg, out_dir=tmp_path / "straight")
    assert _metrics(tmp_path / "r") == _metrics(tmp_path / "straight")


def test_tensorboard_drops_the_abandoned_steps_after_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsWriter(tmp_path) as w:
        for s in range(1, 5):
            w.write({"step": s, "x": float(s)})
    with MetricsWriter(tmp_path, purge_step=3) as w:  # resumed from the checkpoint of step 2
        for s in range(3, 5):
            w.write({"step": s, "x": 10.0 * s})
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("x")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


# ------------------------------------------------------------------ 5, 6: non-finite SFT and RL


def test_sft_skips_a_non_finite_step_and_stops_after_too_many(tmp_path, monkeypatch):
    original = sft_mod.sft_losses
    calls = {"n": 0, "bad": {2}}

    def losses(*args, **kwargs):
        out = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in calls["bad"]:
            out["nll"] = out["nll"] * float("nan")
        return out

    monkeypatch.setattr(sft_mod, "sft_losses", losses)
    ck = run_sft(load_config(None, SFT_TINY), out_dir=tmp_path / "one_bad")
    recs = read_jsonl(tmp_path / "one_bad" / "metrics.jsonl")
    assert [r["sft/skipped"] for r in recs] == [False, True, False, False] and recs[-1]["sft/bad_steps_total"] == 1
    assert all(torch.isfinite(p).all() for p in load_model(ck).parameters())
    calls.update(n=0, bad=set(range(1, 10)))
    with pytest.raises(RunStopped, match=r"sft\.max_bad_steps"):
        run_sft(load_config(None, [*SFT_TINY, "sft.max_bad_steps=2"]), out_dir=tmp_path / "all_bad")
    assert not (tmp_path / "all_bad" / "checkpoint").exists()


def test_diverging_sft_stops_without_a_non_finite_checkpoint(tmp_path):
    with pytest.raises(RunStopped):
        run_sft(load_config(None, [*SFT_TINY, "sft.lr=1e30", "sft.grad_clip=0", "sft.steps=8"]),
                out_dir=tmp_path / "r")
    assert not (tmp_path / "r" / "checkpoint").exists()


def test_the_sampler_names_non_finite_logits(ckpt):
    model = load_model(ckpt)
    with torch.no_grad():
        next(model.trunk.parameters()).fill_(float("nan"))
    tok = build_tokenizer()
    for greedy in (True, False):
        with pytest.raises(NonFiniteLogitsError, match="not finite"):
            generate(model, [[1, 20, 21]], 4, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                     generator=torch.Generator().manual_seed(0), greedy=greedy)


def test_diverging_rl_stops_with_a_message_and_no_non_finite_checkpoint(ckpt, tmp_path, monkeypatch):
    inject_random_advantages(monkeypatch)
    cfg = rl_config(ckpt, "policy", "diag.every=0", "rl.lr=1e30", "rl.grad_clip=0", "rl.steps=40",
                    "rl.checkpoint_every=1")
    with pytest.raises((Diverged, RunStopped)) as err:
        run_rl(cfg, out_dir=tmp_path / "r")
    assert "IndexError" not in str(err.value)
    for path in (tmp_path / "r" / "checkpoints").glob("step_*.pt"):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values()), path


# ------------------------------------------------------------------ 7, 8: user data


def test_user_prompts_must_fit_the_context(ckpt, tmp_path, capsys):
    long = _user_file(tmp_path / "long.jsonl", long_prompt="1+" * 75 + "=")  # 151 characters, 128 positions
    with pytest.raises(ValueError, match=r"long\.jsonl, line 2: the prompt is 152 tokens .*128 positions"):
        run_sft(load_config(None, [*SFT_TINY, f"task.user_data={long}"]), out_dir=tmp_path / "s")
    assert not (tmp_path / "s").exists()
    huge = _user_file(tmp_path / "huge.jsonl", long_prompt="7" * 10_000_000)
    t0 = time.perf_counter()
    assert main(["rl", "--init", str(ckpt), "--set", f"task.user_data={huge}", "--out", str(tmp_path / "r")]) == 2
    assert "huge.jsonl, line 2: the prompt has 10000000 characters" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 60 and not (tmp_path / "r").exists()


def test_user_data_is_evaluated_on_its_held_out_split(ckpt, tmp_path):
    data = _user_file(tmp_path / "data.jsonl", odd=True)
    task = UserTask.from_file(data)
    held = [p.prompt for p in task.problems if is_eval_prompt(p.prompt)]
    assert held and [p.prompt for p in task.held_out(100)] == held  # the documented split, in file order
    run_sft(load_config(None, [*SFT_TINY, f"task.user_data={data}"]), out_dir=tmp_path / "s")
    log = (tmp_path / "s" / "run.log").read_text()
    assert "2 characters in 1 records" in log and "line 3" in log  # the tab and the é
    assert "user data" in log and str(data) in log
    assert "eval/user/greedy_acc" in read_jsonl(tmp_path / "s" / "metrics.jsonl")[-1]
    run = run_rl(rl_config(ckpt, "policy", "diag.every=0", f"task.user_data={data}", "eval.size=100"),
                 out_dir=tmp_path / "r")
    res = json.loads((run / "eval.json").read_text())
    assert list(res["suites"]) == ["user"] and res["suites"]["user"]["n"] == len(held)
    assert res["settings"]["data"] == str(data)


# ------------------------------------------------------------------ 9: threads


def test_eval_and_probe_honour_the_thread_setting(ckpt, probed_run, tmp_path):
    torch.set_num_threads(2)
    assert main(["eval", str(ckpt), "--set", "threads=1", "--set", "eval.size=1", "--set", "eval.samples=1",
                 "--set", "eval.max_new_tokens=2", "--json", str(tmp_path / "e.json")]) == 0
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    assert main(["probe", str(probed_run), "--steps", "1", "--threads", "1", "--set", "diag.bootstrap=0",
                 "--probes", "t.parquet"]) == 0
    assert torch.get_num_threads() == 1


# ------------------------------------------------------------------ small things


@pytest.mark.parametrize(("argv", "named"), [
    (["sft", "--seed", "-1"], "--seed"),
    (["rl", "--seed", "x"], "--seed"),
    (["probe", "somewhere", "--steps", "1,x"], "--steps"),
])
def test_bad_options_are_named(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and named in capsys.readouterr().err


def test_errors_name_the_option(ckpt, probed_run, tmp_path, capsys):
    assert main(["probe", str(probed_run), "--steps", "999", "--probes", "x.parquet"]) == 2
    assert "--steps" in (err := capsys.readouterr().err) and "999" in err and "1, 2, 4" in err
    assert main(["rl", "--init", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--init" in err and "rl.init" in err and "tokenizer" not in err


def test_written_files_follow_the_umask(ckpt, tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        ck = make_checkpoint(tmp_path / "ck")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert {f.stat().st_mode & 0o777 for f in ck.iterdir()} == {0o644}
    assert ck.stat().st_mode & 0o777 == 0o755


def test_occ_eval_shows_progress_and_its_settings_and_no_transformers_bars(ckpt, tmp_path):
    out = subprocess.run([sys.executable, "-m", "occ_theory.cli", "eval", str(ckpt), "--set", "eval.size=2",
                          "--set", "eval.samples=1", "--set", "eval.max_new_tokens=2", "--set", "threads=1",
                          "--json", str(tmp_path / "e.json")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "[eval]" in out.stderr and "Loading weights" not in out.stderr
    assert "size 2" in out.stdout
    assert json.loads((tmp_path / "e.json").read_text())["settings"]["size"] == 2


def test_help_says_where_to_start_and_shows_defaults():
    from occ_theory.cli import build_parser

    parser = build_parser()
    assert "occ quickstart" in parser.format_help()
    sub = parser._subparsers._group_actions[0].choices
    assert "(default: off,detach,ce,policy,occ)" in " ".join(sub["quickstart"].format_help().split())
