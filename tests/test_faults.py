"""Faults and degenerate input: non-finite steps, SIGKILL mid-run, corrupt files, degenerate batches."""

import math
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace

import pytest
import torch
from rl_fixtures import inject_random_advantages, make_checkpoint, rl_config, rl_trainer, with_signal

import occ_theory.rl.batch as batch_mod
from analysis.load import read_jsonl
from occ_theory.cli import main
from occ_theory.errors import Interrupted, RunStopped
from occ_theory.models import load_model
from occ_theory.train import rl as rl_mod
from occ_theory.train.rl import RLTrainer, latest_checkpoint, run_rl


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "sft")


def _poison(monkeypatch, bad_steps, logprobs=False):
    """Make the RL objective (and with ``logprobs`` the main log-probs) NaN on the given steps (from 1)."""
    original = batch_mod.compute_objectives
    calls = {"n": 0}

    def compute(model, batch, spec, params=None, with_mtp=True, norms=None):
        obj = original(model, batch, spec, params, with_mtp, norms)
        if params is None and torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] in bad_steps:
                obj.rl_objective = obj.rl_objective * float("nan")
                if logprobs:  # a forward that went non-finite: every quantity built on it is NaN
                    obj.logp = obj.logp * float("nan")
        return obj

    monkeypatch.setattr(rl_mod, "compute_objectives", compute)


def test_non_finite_step_is_skipped_counted_and_the_run_continues(ckpt, tmp_path, monkeypatch):
    inject_random_advantages(monkeypatch)
    _poison(monkeypatch, {2})
    run = run_rl(rl_config(ckpt, "policy", "diag.every=0"), out_dir=tmp_path / "r")
    recs = read_jsonl(run / "metrics.jsonl")
    assert [r["rl/skipped"] for r in recs] == [False, True, False, False]
    assert recs[-1]["rl/bad_steps_total"] == 1
    model = load_model(run / "final")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_non_finite_forward_gives_lambda_zero_counted_and_a_skipped_step(ckpt, tmp_path, monkeypatch):
    inject_random_advantages(monkeypatch)
    _poison(monkeypatch, {2}, logprobs=True)
    run = run_rl(rl_config(ckpt, "occ", "diag.every=0"), out_dir=tmp_path / "r")
    recs = read_jsonl(run / "metrics.jsonl")
    assert recs[1]["rl/skipped"] and recs[1]["lambda/used"] == 0.0 and recs[1]["lambda/non_finite_total"] == 1
    assert recs[1]["lambda/reference"] is None  # NaN is written as null
    assert not recs[3]["rl/skipped"] and recs[3]["lambda/used"] != 0.0


def test_too_many_bad_steps_in_a_row_stop_with_a_message_and_a_checkpoint(ckpt, tmp_path, monkeypatch):
    _poison(monkeypatch, {1, 2, 3, 4})
    with pytest.raises(RunStopped, match="consecutive") as err:
        run_rl(rl_config(ckpt, "policy", "rl.max_bad_steps=2", "diag.every=0"), out_dir=tmp_path / "r")
    assert "checkpoint saved" in str(err.value)
    assert latest_checkpoint(tmp_path / "r") is not None
    assert len(read_jsonl(tmp_path / "r" / "metrics.jsonl")) == 1  # step 2 raised before its record


def test_sigkill_mid_run_then_resume_loses_no_completed_record(ckpt, tmp_path):
    run = tmp_path / "killed"
    args = [sys.executable, "-m", "occ_theory.cli", "rl", "--init", str(ckpt), "--out", str(run),
            "--set", "rl.steps=400", "--set", "rl.checkpoint_every=1", "--set", "rl.prompts_per_rollout=2",
            "--set", "rl.group_size=2", "--set", "rl.minibatches=2", "--set", "rl.max_new_tokens=6",
            "--set", "diag.every=0", "--set", "eval.size=2", "--set", "eval.samples=1", "--set", "threads=1",
            "--set", "eval.max_new_tokens=4"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        m = run / "metrics.jsonl"
        if m.exists() and m.read_text().count("\n") >= 30:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = read_jsonl(run / "metrics.jsonl")  # every complete line parses; a torn last line is dropped
    assert len(before) >= 30 and [r["step"] for r in before] == list(range(1, len(before) + 1))
    ckpt_path = latest_checkpoint(run)
    assert ckpt_path is not None and torch.load(ckpt_path, weights_only=True)["step"] >= 2
    assert main(["rl", "--resume", str(run)]) == 0  # a kill mid-write leaves only a temporary file, never a torn one
    after = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in after] == list(range(1, 401))
    assert not list((run / "checkpoints").glob("*.tmp"))  # the resumed run cleared the killed writer's leftovers


def _stopped_at_3(ckpt, run, monkeypatch, *extra):
    """A run SIGTERM stops after step 3 of 4 (a finished run deletes its checkpoints: this one keeps its last)."""
    original = RLTrainer.train_step

    def step(self, mb, first_after_rollout, **kw):
        rec = original(self, mb, first_after_rollout, **kw)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return rec

    monkeypatch.setattr(RLTrainer, "train_step", step)
    with pytest.raises(Interrupted):
        run_rl(rl_config(ckpt, "policy", *extra), out_dir=run)
    monkeypatch.setattr(RLTrainer, "train_step", original)
    return run


def test_corrupt_probe_bundle_and_checkpoint_are_named(ckpt, tmp_path, monkeypatch, capsys):
    inject_random_advantages(monkeypatch)
    run = _stopped_at_3(ckpt, tmp_path / "r", monkeypatch, "diag.every=2", "rl.checkpoint_every=1")
    bundle = run / "probes" / "step_000002" / "bundle.pt"
    bundle.write_bytes(bundle.read_bytes()[:100])
    assert main(["probe", str(run)]) == 2
    assert "step_000002" in capsys.readouterr().err
    assert not (run / "probes.parquet").exists()
    ck = latest_checkpoint(run)
    ck.write_bytes(b"not a checkpoint")
    assert main(["rl", "--resume", str(run)]) == 2
    assert ck.name in capsys.readouterr().err


def test_mismatched_checkpoint_for_the_regime_is_refused(tmp_path, capsys):
    from occ_theory.models import ModelConfig, build_model, build_tokenizer, save_model

    tok = build_tokenizer()
    no_mtp = ModelConfig(family="llama", hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         num_kv_heads=2, max_position_embeddings=64, mtp_depths=0)
    path = save_model(build_model(no_mtp, tok, seed=0), tmp_path / "nomtp", tok)
    assert main(["rl", "--init", str(path), "--regime", "policy", "--out", str(tmp_path / "r")]) == 2
    assert "mtp_depths = 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def _trainer(ckpt, tmp_path, regime):
    return rl_trainer(ckpt, tmp_path / regime, regime, "diag.at=[1]", "diag.every=0")


@pytest.mark.parametrize("regime", ["occ", "policy", "ce"])
def test_degenerate_batches_give_defined_outputs_without_warnings(ckpt, tmp_path, regime):
    """All-equal rewards (A = 0), an empty response mask, q − l_old = 0: no warning, no NaN λ applied."""
    tr = _trainer(ckpt, tmp_path, regime)
    batch, _ = tr.rollout()
    mb, _ = tr.fill_old_logp(batch.split(2)[0])
    cases = {
        "zero_advantages": replace(mb, advantages=torch.zeros(mb.size)),
        "empty_mask": replace(mb, response_mask=torch.zeros_like(mb.response_mask)),
    }
    for name, case in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # numpy/torch division by zero, invalid values
            rec = tr.train_step(case, first_after_rollout=False)
        assert math.isfinite(rec["lambda/used"]), name
        assert not rec["rl/skipped"], name
        if name == "empty_mask" or regime != "ce":  # M is constant: u = 0 and λ* is undefined, with the reason
            assert "u = 0" in rec["diag/sgd/reason"] and math.isnan(rec["diag/sgd/lambda_star"]), name
        else:  # ce with A = 0: u ≠ 0 but g = 0, so C = 0
            assert rec["diag/sgd/corr"] == 0.0 and rec["diag/grad/u_norm"] > 0
        tr.step = 0  # diagnose the next case too


def test_proxies_with_q_equal_to_old_logp_are_zero(ckpt, tmp_path):
    tr = _trainer(ckpt, tmp_path, "occ")
    batch, _ = tr.rollout()
    mb = with_signal(tr, batch.split(2)[0])
    from occ_theory.rl.coef import logprob_proxies

    raw, _ = logprob_proxies(mb.old_logp + 0.1, mb.old_logp, [mb.old_logp.clone()], mb.response_mask, 0,
                             mb.attention_mask)
    assert raw == {"reference": 0.0, "least_squares": 0.0}


def test_same_seed_gives_the_same_metrics_run_to_run(ckpt, tmp_path, monkeypatch):
    inject_random_advantages(monkeypatch)
    runs = [run_rl(rl_config(ckpt, "occ", "rl.proxy=least_squares"), out_dir=tmp_path / f"r{i}") for i in range(2)]
    a, b = (read_jsonl(r / "metrics.jsonl") for r in runs)
    drop = ("perf/", "rollout/tokens_per_s")
    assert [{k: v for k, v in r.items() if not k.startswith(drop)} for r in a] == \
        [{k: v for k, v in r.items() if not k.startswith(drop)} for r in b]
    other = run_rl(rl_config(ckpt, "occ", "rl.proxy=least_squares", "seed=1"), out_dir=tmp_path / "s1")
    c = read_jsonl(other / "metrics.jsonl")
    assert [r["rl/objective"] for r in c] != [r["rl/objective"] for r in a]  # another seed samples otherwise


@pytest.mark.parametrize("regime", ["policy", "real"])
def test_probes_never_change_the_training_they_measure(ckpt, tmp_path, monkeypatch, regime):
    """A run probed every step (every geometry, the real-step curves, the bundles, which hold the live Adam
    state) trains to the same weights and metrics as the same run never probed."""
    inject_random_advantages(monkeypatch)
    probed = run_rl(rl_config(ckpt, regime, "diag.every=1", "diag.curve_real_step=true", "rl.coef_clip=[-5,5]"),
                    out_dir=tmp_path / "probed")
    plain = run_rl(rl_config(ckpt, regime, "diag.every=0", "rl.coef_clip=[-5,5]"), out_dir=tmp_path / "plain")
    rows = read_jsonl(probed / "metrics.jsonl")
    assert all("diag/adam_step/lambda_star" in r and "diag/curve_real_local/r2" in r for r in rows[1:])
    a, b = load_model(probed / "final").state_dict(), load_model(plain / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    keep = ("rl/", "reward/", "lambda/used", "mtp/")
    pick = [{k: v for k, v in r.items() if k.startswith(keep)} for r in read_jsonl(probed / "metrics.jsonl")]
    assert pick == [{k: v for k, v in r.items() if k.startswith(keep)} for r in read_jsonl(plain / "metrics.jsonl")]


def test_resume_drops_the_bundles_past_its_checkpoint_and_a_killed_bundle_writes_leftovers(ckpt, tmp_path,
                                                                                            monkeypatch):
    inject_random_advantages(monkeypatch)
    run = _stopped_at_3(ckpt, tmp_path / "r", monkeypatch, "diag.every=1")
    probes = run / "probes"
    assert torch.load(latest_checkpoint(run), weights_only=True)["step"] == 3  # the stop's own checkpoint
    (probes / "step_000009").mkdir()  # a bundle past the checkpoint, which the resumed run never rewrites
    (probes / ".step_000004.x1y2.tmp").mkdir()  # what a write killed mid-bundle leaves
    kept = (probes / "step_000003" / "bundle.pt").stat().st_mtime_ns
    assert main(["rl", "--resume", str(run)]) == 0
    assert sorted(b.name for b in probes.iterdir()) == [f"step_{s:06d}" for s in (1, 2, 3, 4)]
    assert (probes / "step_000003" / "bundle.pt").stat().st_mtime_ns == kept  # up to the checkpoint: untouched


def test_a_checkpoint_of_another_world_size_is_refused_before_anything_loads(tmp_path):
    from occ_theory.train.checkpoints import restore_training_state

    class Untouched:
        def __getattr__(self, name):
            raise AssertionError(f"{name} used before the world size was checked")

    with pytest.raises(ValueError, match="was written by 2 processes, this run has 1"):
        restore_training_state({}, tmp_path / "step_000003.pt", Untouched(), Untouched(), Untouched(), Untouched(),
                               world=1, writers=2)


def test_checkpoint_of_another_model_is_refused_on_resume(ckpt, tmp_path, monkeypatch, capsys):
    inject_random_advantages(monkeypatch)
    run = _stopped_at_3(ckpt, tmp_path / "r", monkeypatch, "diag.every=0", "rl.checkpoint_every=1")
    ck = latest_checkpoint(run)
    state = torch.load(ck, weights_only=True)
    state["model"] = {k + "_x": v for k, v in state["model"].items()}
    torch.save(state, ck)
    assert main(["rl", "--resume", str(run)]) == 2
    assert "does not match" in capsys.readouterr().err
