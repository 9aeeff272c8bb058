"""dist.strategy fsdp: FSDP2 on two gloo processes gives the numbers of ddp and of one process on the whole batch.

The trainer runs float64 (a float64 copy of the tiny checkpoint), so agreement is to float64 rounding of the
summation order: the losses, every coefficient rule's λ, the recorder's g and u per module, identity 3, C, X, Q
and λ* of every geometry, adam_real and the real step's curve, the clip in each scope, the weights after three
steps, a resumed run, and a bundle written under fsdp re-probed offline. Negative controls: FSDP2's default MEAN
reduction, and the functional gather without ``Partial()``, each fail the comparison they would spoil.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from rl_fixtures import make_checkpoint, rl_config, with_signal

from occ_theory.rl.batch import RLBatch

WORLD = 2
STEPS = 3
PROBE = ("diag.every=0", "diag.at=[3]", "diag.first=true", "diag.dtype=float64", "diag.bootstrap=0",
         "diag.curve_points=5", "diag.taylor_halvings=1", "diag.optimum_per_decade=2", "diag.stationary=true",
         "rl.lr=3e-3")
CASES = {  # every coefficient rule that differentiates the model, every clip scope, the KL reference, a θ_S edit
    "real": ("real", "rl.clip_scope=separate", "rl.grad_clip=0.05", "diag.curve_real_step=true"),
    "fisher": ("occ", "rl.proxy=fisher", "rl.clip_scope=global", "rl.grad_clip=0.05", "rl.kl_coef=0.05"),
    "cosine": ("cosine", "rl.clip_scope=shared", "rl.grad_clip=0.05"),
    "bundle_only": ("real", "rl.clip_scope=separate", "rl.grad_clip=0.05", "diag.curve_real_step=true",
                    "diag.bundle_only=true"),
}
COMPARED = ("real", "fisher", "cosine")


@contextlib.contextmanager
def _float64() -> Iterator[None]:
    """Trainers (RL and SFT) build their model in float64 (the checkpoint is float32), with RMSNorm and attention's
    softmax in float64 too (``models.precision``: transformers rounds them to float32, which turns the last-bit
    differences of another batch shape into float32 ones). Undone on exit (the other tests' models stay float32)."""
    from transformers.models.qwen2 import modeling_qwen2

    import occ_theory.train.rl as rl
    import occ_theory.train.sft as sft
    from occ_theory.models.precision import EXACT_EAGER, _exact_rms_norm

    def exact(model):
        model.trunk.config._attn_implementation = EXACT_EAGER
        return model.double()

    load_any, build_model = rl.load_any, sft.build_model
    with pytest.MonkeyPatch.context() as m:
        m.setattr(modeling_qwen2.Qwen2RMSNorm, "forward", _exact_rms_norm)
        m.setattr(rl, "load_any", lambda *a, **k: (lambda mt: (exact(mt[0]), mt[1]))(load_any(*a, **k)))
        m.setattr(sft, "build_model", lambda *a, **k: exact(build_model(*a, **k)))
        yield


def _config(ckpt: Path, case: str, strategy: str, *extra: str):
    regime, *rest = CASES[case]
    return rl_config(ckpt, regime, *PROBE, *rest, f"dist.strategy={strategy}", *extra)


def _trainer(ckpt: Path, out: Path, case: str, strategy: str, dist, *extra: str):
    from occ_theory.train.rl import RLTrainer
    from occ_theory.train.run import RunContext

    cfg = _config(ckpt, case, strategy, *extra)
    ctx = replace(RunContext.create(cfg, case, out_dir=out), main=dist.main)
    return RLTrainer(cfg, ctx, dist)


def _shard(batch: RLBatch, rank: int, world: int) -> RLBatch:
    n = batch.size // world
    return batch.select(slice(rank * n, (rank + 1) * n))


def _train(tr, batches: list[RLBatch], rank: int, world: int, steps: range) -> list[dict]:
    return [tr.train_step(_shard(batches[i], rank, world), first_after_rollout=i == 0, minibatch_index=i)
            for i in steps]


def _run(ckpt: Path, tmp: Path, strategy: str, dist, batches: list[RLBatch], cases, resume: tuple = ()) -> dict:
    """Each case's three steps' records and final weights (full, on rank 0), the strategy's name and where rank 0
    wrote its bundles; for the cases in ``resume`` also the third step again from the checkpoint after the second
    (``bundle_only``: its first step)."""
    out = {}
    for case in cases:
        where = tmp / f"{case}_{strategy}_{dist.world}" / f"rank{dist.rank}"
        tr = _trainer(ckpt, where, case, strategy, dist)
        recs = _train(tr, batches, dist.rank, dist.world, range(1 if case == "bundle_only" else 2))
        ckpt_path = tr.save_checkpoint() if case in resume else None
        recs += _train(tr, batches, dist.rank, dist.world, range(2, STEPS) if case != "bundle_only" else range(0))
        res = {"recs": recs, "weights": tr.strategy.model_state(tr.model), "strategy": tr.strategy.name,
               "bundles": where.with_name("rank0") / "probes"}
        for other in ((strategy, "ddp") if strategy == "fsdp" else (strategy,)) if case in resume else ():
            # the checkpoint resumes under its own strategy, and under the other one: one format
            again = _trainer(ckpt, where.with_name(f"{where.name}_resumed_{other}"), case, other, dist)
            again.load_checkpoint(tmp / f"{case}_{strategy}_{dist.world}" / "rank0" / "checkpoints" / ckpt_path.name)
            res[f"resumed_{other}"] = {"recs": _train(again, batches, dist.rank, dist.world, range(2, STEPS)),
                                       "weights": again.strategy.model_state(again.model)}
        out[case] = res
    return out


PLAN = (("ddp", COMPARED, ()), ("fsdp", (*COMPARED, "bundle_only"), ("real",)))
"""What the two processes run, in one process group: each strategy's cases and the cases resumed."""


def _worker(rank: int, world: int, init: str, ckpt: str, tmp: str) -> None:
    from occ_theory.train.dist import Dist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        with _float64():
            batches = [RLBatch.from_tensors(b) for b in torch.load(Path(tmp) / "batches.pt", weights_only=True)]
            for strategy, cases, resume in PLAN:
                res = _run(Path(ckpt), Path(tmp), strategy, Dist(rank, world), batches, cases, resume)
                if rank == 0:
                    torch.save(res, Path(tmp) / f"{strategy}.pt")
            controls = _controls(Path(ckpt), batches[0], Dist(rank, world))
            if rank == 0:
                torch.save(controls, Path(tmp) / "controls.pt")
            tdist.barrier()
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process on the whole batches, then ddp and fsdp on two processes, each case three steps."""
    from occ_theory.train.dist import Dist

    tmp = tmp_path_factory.mktemp("fsdp")
    ckpt = make_checkpoint(tmp / "ck")
    with _float64():
        tr = _trainer(ckpt, tmp / "batches", "fisher", "ddp", Dist())  # its KL reference fills ref_logp
        batch, _ = tr.rollout()
        batches = [with_signal(tr, batch, seed=i, noise=0.02) for i in range(STEPS)]
        torch.save([b.tensors() for b in batches], tmp / "batches.pt")
        one = _run(ckpt, tmp, "ddp", Dist(), batches, COMPARED)
    mp.spawn(_worker, args=(WORLD, str(tmp / "init"), str(ckpt), str(tmp)), nprocs=WORLD, join=True)
    two = {strategy: torch.load(tmp / f"{strategy}.pt", weights_only=False) for strategy, *_ in PLAN}
    return {"one": one, **two, "controls": torch.load(tmp / "controls.pt", weights_only=False), "ckpt": ckpt,
            "tmp": tmp}


SKIP = ("perf/", "rollout/")
SEARCHED = ("real_optimum", "optimum_ratio")
"""The real optimum is refined on a grid to a tolerance (its evaluation count may differ by one)."""
PER_PROCESS = ("rl/ratio_mean", "rl/entropy", "rl/clip_frac")
"""Means of the processes' own token means (float32): not the whole batch's, on purpose or not."""


def _tolerance(key: str, across_world: bool) -> float | None:
    """Relative tolerance of a record key (None: not compared). ``across_world``: one process against two."""
    if key.startswith(SKIP) or key.endswith("/evaluations") or (across_world and key in PER_PROCESS):
        return None
    if any(s in key for s in SEARCHED):
        return 1e-5
    if across_world and key.endswith("rel_err"):  # a relative error of a Taylor model: a difference of near equals
        return 1e-7
    return 1e-10


def _close(a, b, rel: float) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return abs(a - b) <= 1e-13 + rel * abs(a)
    return a == b


def _compare(ref: list[dict], got: list[dict], what: str, across_world: bool) -> int:
    """The records agree key by key (``_tolerance``); returns how many values were compared."""
    n, bad = 0, []
    for step, (r, g) in enumerate(zip(ref, got, strict=True), start=1):
        assert set(r) == set(g), (what, step, set(r) ^ set(g))
        for k, v in r.items():
            rel = _tolerance(k, across_world)
            if rel is None:
                continue
            if not _close(v, g[k], rel):
                bad.append((what, step, k, v, g[k]))
            n += 1
    assert not bad, "\n".join(map(str, bad))
    return n


def _compare_online(ref: dict, got: dict, what: str, across_world: bool) -> int:
    """Two probes' online.json (scalars and the curves' points) agree key by key; returns how many lists agreed."""
    assert set(ref) == set(got), (what, set(ref) ^ set(got))
    lists, bad = 0, []
    for k, v in ref.items():
        rel = _tolerance(k, across_world)
        if rel is None:
            continue
        a, b = _from_json(v), _from_json(got[k])
        pairs = zip(a, b, strict=True) if isinstance(a, list) else [(a, b)]
        if not all(_close(x, y, rel) for x, y in pairs):
            bad.append((what, k, a, b))
        lists += isinstance(a, list)
    assert not bad, "\n".join(map(str, bad))
    return lists


def _weights_agree(ref: dict, got: dict, what: str) -> None:
    for k, w in ref.items():
        err = float((got[k] - w).abs().max() / w.abs().max().clamp_min(1e-30))
        assert err <= 1e-10, (what, k, err)


@pytest.mark.parametrize("case", COMPARED)
def test_fsdp_equals_ddp_equals_one_process(runs, case):
    """Three steps (probes at 1 and 3): every logged number (losses, λ and the proxies, the clip's norms and factor,
    g and u per module, identity 3, C, X, Q and λ* of every geometry, adam_real, the real optimum), the probes'
    curves (online.json) and the weights after the third step."""
    from occ_theory.diagnostics.offline import read_online

    one, ddp, fsdp = (runs[k][case] for k in ("one", "ddp", "fsdp"))
    assert (one["strategy"], ddp["strategy"], fsdp["strategy"]) == ("ddp", "ddp", "fsdp")
    assert _compare(ddp["recs"], fsdp["recs"], "fsdp against ddp", across_world=False) > 300
    _weights_agree(ddp["weights"], fsdp["weights"], "fsdp against ddp")
    for name, other in (("ddp", ddp), ("fsdp", fsdp)):
        _compare(one["recs"], other["recs"], f"{name} against one process", across_world=True)
        _weights_agree(one["weights"], other["weights"], f"{name} against one process")
    lists = 12 if case == "real" else 4  # the measured curve and the Taylor residuals; the real step's curves
    for step in ("step_000001", "step_000003"):  # the probe's curves too
        ref = read_online(one["bundles"] / step)
        assert _compare_online(ref, read_online(ddp["bundles"] / step), f"ddp {step}", across_world=True) >= lists
        assert _compare_online(read_online(ddp["bundles"] / step), read_online(fsdp["bundles"] / step),
                               f"fsdp {step}", across_world=False) >= lists
    recs = fsdp["recs"]
    probed = (recs[0], recs[2])  # diag.first and diag.at=[3]
    real = ("diag/adam_real/beta", "diag/real_optimum/lambda") if case == "real" else ()  # diag.curve_real_step
    for must in ("diag/identity3/rel_err", "diag/grad/g_norm", "diag/grad/u_norm", "diag/module/embed/corr",
                 "diag/module/block.1/cos", "diag/sgd/corr", "diag/sgd/cross", "diag/sgd/curv", "diag/adam/corr",
                 "diag/adam/cross", "diag/adam/curv", *real):
        assert math.isfinite(probed[1][must]), must
    for must in ("diag/sgd/lambda_star", "diag/adam/lambda_star", "diag/adam_step/lambda_star",
                 "diag/adam_stationary/lambda_star", "diag/adam_real/lambda_star", "lambda/used", "lambda/reference"):
        assert must in recs[2], must
    assert all(r["rl/clip_active"] for r in recs)  # the clip acts in every scope tested
    assert all(r["diag/identity3/rel_err"] < 1e-12 for r in probed)


def test_fsdp_resumes_from_its_checkpoint_to_the_same_step_under_either_strategy(runs):
    """The third step from the checkpoint after the second (full state, written on rank 0, loaded into the shards,
    or into ddp's replicas: one checkpoint format) is the third step of the run that went on."""
    run = runs["fsdp"]["real"]
    for other in ("fsdp", "ddp"):
        again = run[f"resumed_{other}"]
        assert _compare(run["recs"][2:], again["recs"], f"resumed under {other}", across_world=False) > 100
        _weights_agree(run["weights"], again["weights"], f"resumed under {other}")


def _reprobe(runs, bundle: Path) -> dict:
    from occ_theory.diagnostics.bundle import load_bundle, probe_from_bundle
    from occ_theory.models import load_model

    with _float64():
        return probe_from_bundle(load_bundle(bundle), load_model(runs["ckpt"]).double()).record


def _from_json(v):
    return [_from_json(x) for x in v] if isinstance(v, list) else math.nan if v is None else v


def test_a_bundle_written_under_fsdp_reprobes_offline_to_the_online_numbers(runs):
    """Rank 0's bundle (the full weights and AdamW state gathered from the shards, the global minibatch), re-probed in
    one process, gives its online.json; a bundle_only run writes the same bundle without probing online."""
    from occ_theory.diagnostics.offline import read_online

    bundles = runs["fsdp"]["real"]["bundles"]
    online = read_online(bundles / "step_000003")
    offline = _reprobe(runs, bundles / "step_000003")
    checked = 0
    for k, v in online.items():
        rel = _tolerance(k, across_world=True)
        if rel is None or k not in offline:
            continue
        want = _from_json(v)
        pairs = zip(want, offline[k], strict=True) if isinstance(want, list) else [(want, offline[k])]
        assert all(_close(a, b, rel) for a, b in pairs), (k, want, offline[k])
        checked += 1
    assert checked > 100 and "curve/deltas" in online and "curve/real_local_deltas" in online
    only = runs["fsdp"]["bundle_only"]
    assert only["recs"][0]["diag/bundle_only"] and "diag/sgd/corr" not in only["recs"][0]
    assert not (only["bundles"] / "step_000001" / "online.json").exists()
    again = _reprobe(runs, only["bundles"] / "step_000001")
    first = runs["fsdp"]["real"]["recs"][0]  # the same step probed online by the run that probes
    keys = [k for k in first if k.startswith("diag/") and "identity3" not in k and _tolerance(k, True) and k in again]
    assert len(keys) > 100 and all(_close(first[k], again[k], _tolerance(k, True)) for k in keys)


def _controls(ckpt: Path, whole: RLBatch, dist) -> dict:
    """g = ∇J of the global batch (this process's rows, global token counts) three ways on the sharded model."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    from occ_theory.models import load_model
    from occ_theory.rl.batch import Norms, ObjectiveSpec, compute_objectives
    from occ_theory.train.fsdp import Sharded

    rank, world = dist.rank, dist.world
    batch = _shard(whole, rank, world)
    spec, norms = ObjectiveSpec.for_regime("policy"), Norms.of(batch, 1, dist.sum)
    out = {}
    for divide in (1.0, float(world)):  # the toolkit's sum, and FSDP2's default MEAN
        strategy = Sharded(dist)
        model = strategy.wrap(load_model(ckpt).double())
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(divide)
        compute_objectives(model, batch, spec, with_mtp=False, norms=norms).rl_objective.backward()
        out[f"fsdp_divide_{divide:g}"] = strategy.full_grads(dict(model.named_parameters()))
    plain = load_model(ckpt).double()
    named = dict(model.named_parameters())
    for partial in (True, False):  # the functional gather inside the loss, with and without Partial()
        leaves = {k: p.detach().requires_grad_(True) for k, p in named.items()}
        grad_placements = [Partial()] if partial else None
        full = {k: t.redistribute(placements=[Replicate()]).to_local(grad_placements=grad_placements)
                for k, t in leaves.items()}
        J = compute_objectives(plain, batch, spec, params=full, with_mtp=False, norms=norms).rl_objective
        grads = torch.autograd.grad(J, list(leaves.values()), allow_unused=True, materialize_grads=True)
        out[f"partial_{partial}"] = {k: g.full_tensor() for k, g in zip(leaves, grads)}
    some = next(iter(out["partial_True"].values()))
    shard = DTensor.from_local(some.chunk(world)[rank].clone(), strategy.mesh, [Shard(0)])
    out["float_of_dtensor_sum"] = (float(shard.pow(2).sum()), float(some.pow(2).sum()))
    return out


def test_negative_controls_fsdp_mean_reduction_and_a_gather_without_partial_drop_the_sum(runs):
    """FSDP2's default MEAN would make each process's gradient 1/world of the global one (the divide factor 1 of
    shard_model is what makes identity 3 hold); the functional gather through DTensor leaves differentiates
    correctly with ``Partial()`` grad placements and silently drops the other processes' data without it. And why
    the probe takes a gathered plain copy instead of DTensor leaves: ``float()`` of a sum over a sharded DTensor is
    this process's partial sum, without a word."""
    from occ_theory.models import load_model
    from occ_theory.rl.batch import ObjectiveSpec, compute_objectives
    from occ_theory.theory import grad

    tmp, out = runs["tmp"], runs["controls"]
    batch = RLBatch.from_tensors(torch.load(tmp / "batches.pt", weights_only=True)[0])
    model = load_model(runs["ckpt"]).double()
    names = set(out["partial_True"])
    J = lambda p: compute_objectives(model, batch, ObjectiveSpec.for_regime("policy"), params=p,  # noqa: E731
                                     with_mtp=False).rl_objective
    with _float64():
        want = grad(J, {k: p.detach() for k, p in model.named_parameters() if k in names})[1]

    def err(got: dict) -> float:
        return max(float((got[k] - w).abs().max() / w.abs().max().clamp_min(1e-30)) for k, w in want.items())

    assert err(out["fsdp_divide_1"]) < 1e-12 and err(out["partial_True"]) < 1e-12
    assert err({k: 2 * t for k, t in out["fsdp_divide_2"].items()}) < 1e-12  # the mean: half the sum
    assert err(out["fsdp_divide_2"]) > 0.4 and err(out["partial_False"]) > 1e-3
    local, whole = out["float_of_dtensor_sum"]
    assert local < whole and not math.isclose(local, whole)


def _torchrun(*args: str, port: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port", str(port),
           "-m", "occ_theory.cli", *args]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_torchrun_fsdp_sft_then_rl_with_probes_and_its_bundles_reprobe_offline(tmp_path):
    """``torchrun --nproc_per_node 2 -m occ_theory.cli sft|rl ... --set dist.strategy=fsdp``: two SFT steps, then
    four RL steps with probes, a checkpoint per rollout and the evaluation from its checkpoint; ``occ probe RUN``
    (one process, RUN/init gathered on rank 0) recomputes every bundle to its online.json."""
    import pandas as pd

    from analysis.load import read_jsonl
    from occ_theory.diagnostics.offline import read_online, recompute_run

    _torchrun("sft", "--config", "tiny", "--out", str(tmp_path / "sft"), "--set", "dist.strategy=fsdp",
              "--set", "sft.steps=2", "--set", "sft.batch_size=8", "--set", "sft.eval_size=2",
              "--set", "eval.max_new_tokens=4", "--set", "threads=1", port=29539)
    assert "(2 processes, fsdp)" in (tmp_path / "sft" / "run.log").read_text()
    assert len(read_jsonl(tmp_path / "sft" / "metrics.jsonl")) == 2
    out = tmp_path / "run"
    sets = ["dist.strategy=fsdp", "rl.steps=4", "rl.prompts_per_rollout=2", "rl.group_size=4", "rl.minibatches=2",
            "rl.max_new_tokens=8", "rl.kl_coef=0.1", "rl.lr=3e-3", "rl.checkpoint_every=1", "diag.every=2",
            "diag.dtype=float64", "diag.curve_points=5", "diag.bootstrap=0", "diag.taylor_halvings=1", "eval.size=2",
            "eval.samples=1", "eval.max_new_tokens=6", "threads=1"]
    _torchrun("rl", "--config", "tiny_rl", "--init", str(tmp_path / "sft" / "checkpoint"), "--regime", "ce",
              "--out", str(out), *[a for kv in sets for a in ("--set", kv)], port=29541)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert "(2 processes, fsdp)" in (out / "run.log").read_text()
    assert (out / "final").is_dir() and (out / "eval.json").is_file()
    table = pd.read_parquet(recompute_run(out))
    assert list(table["step"]) == [1, 2, 4]
    for _, row in table.iterrows():
        online = read_online(out / "probes" / f"step_{int(row['step']):06d}")
        keys = [k for k, v in online.items() if isinstance(v, float) and _tolerance(k, True) and k in row]
        assert len(keys) > 50
        assert all(_close(_from_json(online[k]), float(row[k]), _tolerance(k, True)) for k in keys), row["step"]
    assert table["diag/grad/g_norm"].iloc[-1] > 0  # the KL term gives J a gradient once the policy moved


# ------------------------------------------------------------------ SFT

SFT = ["model.family=qwen2", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
       "model.num_heads=2", "model.num_kv_heads=1", "model.max_position_embeddings=128", "model.mtp_depths=1",
       "sft.steps=8", "sft.batch_size=4", "sft.warmup=1", "sft.eval_every=0", "sft.eval_size=2", "sft.grad_clip=0.5",
       "eval.max_new_tokens=4", "task.suites=[addition]", "threads=1"]


def _sft(tmp: Path, strategy: str, dist) -> dict:
    """Three SFT steps (the third from the checkpoint after the second, in a fresh run) and the weights."""
    from occ_theory.train.config import load_config
    from occ_theory.train.run import RunContext
    from occ_theory.train.sft import SFTRun

    cfg = load_config(None, [*SFT, f"dist.strategy={strategy}"])

    def run(name: str) -> SFTRun:
        ctx = replace(RunContext.create(cfg, "sft", out_dir=tmp / f"sft_{strategy}_{dist.world}_{name}"),
                      main=dist.main, run_dir=tmp / f"sft_{strategy}_{dist.world}_{name}")
        return SFTRun(cfg, ctx, dist)

    first = run("a")
    recs = [first.train_step() for _ in range(2)]
    path = first.save_checkpoint()
    recs.append(first.train_step())
    again = run("b")
    again.load_checkpoint(path)
    return {"recs": recs, "resumed": again.train_step(), "weights": first.strategy.model_state(first.model),
            "strategy": first.strategy.name}


def _sft_worker(rank: int, world: int, init: str, tmp: str) -> None:
    from occ_theory.train.dist import Dist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        with _float64():
            for strategy in ("ddp", "fsdp"):
                res = _sft(Path(tmp), strategy, Dist(rank, world))
                if rank == 0:
                    torch.save(res, Path(tmp) / f"sft_{strategy}.pt")
            tdist.barrier()
    finally:
        tdist.destroy_process_group()


def test_sft_under_fsdp_and_ddp_equals_one_process_and_resumes(tmp_path):
    """occ sft on two processes (each its rows of the same global batch, global token counts): the losses,
    accuracies, the clipped gradient norm and the weights of one process on the whole batch; a checkpoint
    written under fsdp resumes to the same step."""
    from occ_theory.train.dist import Dist

    with _float64():
        one = _sft(tmp_path, "ddp", Dist())
    mp.spawn(_sft_worker, args=(WORLD, str(tmp_path / "init_sft"), str(tmp_path)), nprocs=WORLD, join=True)
    for strategy in ("ddp", "fsdp"):
        two = torch.load(tmp_path / f"sft_{strategy}.pt", weights_only=False)
        assert two["strategy"] == strategy
        assert _compare(one["recs"], two["recs"], f"sft {strategy}", across_world=True) >= 3 * 8
        assert _compare(two["recs"][2:], [two["resumed"]], f"sft {strategy} resumed", across_world=False) >= 8
        _weights_agree(one["weights"], two["weights"], f"sft {strategy}")
    assert one["recs"][0]["sft/grad_norm"] > 0.5  # the clip acts
