"""Data parallelism: two gloo processes give the numbers of one process on the concatenated batch."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from rl_fixtures import make_checkpoint, rl_trainer, with_signal

from analysis.load import read_jsonl
from occ_theory.diagnostics.probe import OptimizerSnapshot, ProbeSettings, run_probe, shared_params
from occ_theory.models import load_model
from occ_theory.rl.batch import Norms, ObjectiveSpec, RLBatch, compute_objectives
from occ_theory.rl.coef import Coefficient
from occ_theory.theory import grad
from occ_theory.train.dist import Dist

SETTINGS = ProbeSettings(dtype="float64", curve_points=5, bootstrap=0, taylor_halvings=2,
                         fisher_all_geometries=True)  # β_F in every geometry, each compared across processes
SPEC = ObjectiveSpec.for_regime("policy")
COEF = Coefficient(0.1, "fixed", 0.1)


def _snapshot(model) -> OptimizerSnapshot:
    g = torch.Generator().manual_seed(3)
    state = {k: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(p),
                 "exp_avg_sq": 1e-4 * torch.rand(p.shape, generator=g)} for k, p in shared_params(model).items()}
    return OptimizerSnapshot("adamw", 1e-3, (0.9, 0.999), 1e-8, 0.0, state)


def _measure(model, batch: RLBatch, dist: Dist) -> dict:
    """Everything compared: g and u on θ_S, and the full probe (decomposition, proxies, curve, Taylor)."""
    norms = Norms.of(batch, model.num_mtp, dist.sum) if dist.active else None
    params = shared_params(model)

    def J(p):
        return compute_objectives(model, batch, SPEC, params=p, with_mtp=False, norms=norms).rl_objective

    def M(p):
        return compute_objectives(model, batch, SPEC, params=p, norms=norms).mtp

    g, u = dist.sum(grad(J, params)[1]), dist.sum(grad(M, params)[1])
    probe = run_probe(model, batch, SPEC, COEF, _snapshot(model), SETTINGS, dist=dist).record
    return {"g": g, "u": u, "probe": probe}


def _worker(rank: int, world: int, init_file: str, ckpt: str, batch_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        whole = RLBatch.from_tensors(torch.load(batch_path, weights_only=True))
        n = whole.size // world
        shard = whole.select(slice(rank * n, (rank + 1) * n))
        res = _measure(load_model(ckpt), shard, Dist(rank, world))
        if rank == 0:
            torch.save(res, out_path)
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    ckpt = make_checkpoint(tmp / "ck")
    tr = rl_trainer(ckpt, tmp / "r", "policy", "rl.prompts_per_rollout=2", "rl.group_size=4", "rl.minibatches=1")
    batch, _ = tr.rollout()
    whole = with_signal(tr, batch, noise=0.02)
    torch.save(whole.tensors(), tmp / "batch.pt")
    return tmp, ckpt, whole


def test_two_gloo_processes_equal_one_process_on_the_concatenated_batch(setup):
    tmp, ckpt, whole = setup
    single = _measure(load_model(ckpt), whole, Dist())
    out = tmp / "two.pt"
    mp.spawn(_worker, args=(2, str(tmp / "init"), str(ckpt), str(tmp / "batch.pt"), str(out)), nprocs=2, join=True)
    two = torch.load(out, weights_only=False)
    for key in ("g", "u"):  # float32 gradients: agreement to float32 rounding of the summation order
        for name, t in single[key].items():
            err = float((two[key][name] - t).abs().max() / t.abs().max().clamp_min(1e-30))
            assert err < 1e-5, (key, name, err)
    compared = []
    for k, v in single["probe"].items():
        w = two["probe"][k]
        if isinstance(v, float) and math.isfinite(v):
            assert w == pytest.approx(v, rel=1e-7, abs=1e-12), k
            compared.append(k)
        elif isinstance(v, list):
            assert w == pytest.approx(v, rel=1e-6, abs=1e-12), k
    for must in ("diag/sgd/corr", "diag/sgd/cross", "diag/sgd/curv", "diag/adam/corr", "diag/adam/cross",
                 "diag/adam/curv", "diag/sgd/curv_fisher", "lambda/reference", "lambda/least_squares",
                 "lambda/fisher", "diag/curve/alpha", "diag/curve/beta"):
        assert must in compared, must


def test_torchrun_two_processes_end_to_end(setup, tmp_path):
    _, ckpt, _ = setup
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "occ_theory.cli", "rl", "--init", str(ckpt), "--regime", "occ", "--out", str(out),
           "--set", "rl.steps=4", "--set", "rl.prompts_per_rollout=2", "--set", "rl.group_size=4",
           "--set", "rl.minibatches=2", "--set", "rl.max_new_tokens=8", "--set", "diag.every=2",
           "--set", "diag.curve_points=5", "--set", "diag.bootstrap=5", "--set", "eval.size=2",
           "--set", "eval.samples=1", "--set", "eval.max_new_tokens=6", "--set", "threads=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]  # one writer: rank 0
    bundle = torch.load(out / "probes" / "step_000002" / "bundle.pt", weights_only=True)
    assert bundle["batch"]["input_ids"].shape[0] == 4 and bundle["extra"]["world"] == 2  # the global minibatch
    assert json.loads((out / "eval.json").read_text())["suites"]
