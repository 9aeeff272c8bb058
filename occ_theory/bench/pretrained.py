"""``pretrained``: the probe's costs on a real pretrained model, SmolLM2-135M-Instruct by default.

The model is the directory ``occ models fetch smollm2`` writes (or ``--pretrained-dir DIR``: any model
``occ rl --model`` takes); without it the benchmark is skipped with the command that fetches it. One
synthetic minibatch (``ROWS`` rows of ``RESPONSE`` random response tokens, ``fixtures.synthetic_minibatch``)
and the ``smollm2`` config (its probe memory settings included), two measurements:

* one HVP of J (rev-rev, the trainer's method) against one gradient of J, interleaved: the HVP's cost in
  gradients (``hvp`` measures the same on a few hundred thousand parameters);
* one ``ce`` step plain and one with every diagnostic of ``step``'s instrumented step (``DIAG_EVERY_STEP``:
  four geometries, β_F, identity 3, an 8-point curve): a plain trainer's rounds (after two warm-up steps),
  then, the plain one freed, an instrumented trainer's from the same model (after one warm-up step: Adam state
  for the ``adam`` geometry); instrumented/plain. One trainer in memory at a time.

At most ``MAX_ROUNDS`` timed rounds (one with ``--quick``): an instrumented step takes minutes on a CPU.
"""

from __future__ import annotations

import gc
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

from .common import BenchResult, interleave, paired_ratio
from .fixtures import DIAG_EVERY_STEP, DIAG_OFF, synthetic_minibatch

ROWS, RESPONSE = 4, 32
MAX_ROUNDS = 3


def default_dir() -> Path:
    """Where ``occ models fetch smollm2`` puts the model."""
    from ..models.fetch import SOURCES, cache_root

    return cache_root() / SOURCES["smollm2"].cache_name


def bench_pretrained(repeats: int, threads: int, quick: bool = False, path: str | None = None) -> BenchResult:
    res = BenchResult("pretrained")
    model_dir = Path(path) if path else default_dir()
    if not model_dir.exists():
        res.skipped = (f"no model at {model_dir}: run `occ models fetch smollm2` (about 100 MB, once), or name a "
                       "model directory with --pretrained-dir DIR")
        return res
    rounds = 1 if quick else max(1, min(repeats, MAX_ROUNDS))
    with tempfile.TemporaryDirectory() as tmp:
        plain = _trainer(model_dir, Path(tmp) / "plain", threads, *DIAG_OFF)
        mb = synthetic_minibatch(plain, ROWS, RESPONSE)
        n = sum(p.numel() for p in plain.model.parameters())
        shape = {"model": model_dir.name, "params": n, "vocab": plain.model.trunk.config.vocab_size, "rows": mb.size,
                 "tokens": int(mb.response_mask.sum())}
        res.rows.append(shape | _hvp_row(plain, mb, rounds))

        def step(tr: Any):
            return lambda: tr.train_step(mb, first_after_rollout=False)

        # one trainer at a time: two 135M trainers (weights, Adam state) and a probe passed 15 GB
        plain_s = interleave({"plain": step(plain)}, rounds=rounds, warmup=2, memory=False,
                             progress="pretrained/plain")["plain"]
        del plain
        gc.collect()
        instrumented = _trainer(model_dir, Path(tmp) / "diag", threads, *DIAG_EVERY_STEP)
        # one warm-up step gives Adam the state the adam geometry needs (an instrumented step takes minutes)
        s = {"plain": plain_s} | interleave({"instrumented": step(instrumented)}, rounds=rounds, warmup=1,
                                            memory=False, progress="pretrained/instrumented")
        med, lo, hi = paired_ratio(s["instrumented"].times, s["plain"].times)
        res.rows.append(shape | {"contender": "instrumented ce step", "vs": "plain ce step",
                                 "median_ms": 1e3 * s["instrumented"].median_s, "base_ms": 1e3 * s["plain"].median_s,
                                 "ratio": med, "ratio_min": lo, "ratio_max": hi, "rounds": rounds})
        recs = [v for v in s["instrumented"].values if isinstance(v, dict)]
        if not all(math.isfinite(r.get("diag/adam/curv", math.nan)) for r in recs):
            res.notes.append("WARNING: the Adam-geometry decomposition did not run on every timed instrumented step")
        if recs:
            diag_s = statistics.median(r["perf/diag_s"] for r in recs)
            res.notes.append(f"instrumented step: median {diag_s:.1f} s of it in the diagnostics (perf/diag_s)")
        diag = instrumented.cfg.diag
        res.notes.append(f"probe settings of the instrumented step: row_chunk {diag.row_chunk}, jvp_batch "
                         f"{diag.jvp_batch}, dtype {diag.dtype}, {diag.hvp_method}; the step ratio = median over "
                         "rounds of (instrumented / plain), the plain trainer's rounds first (one trainer in memory "
                         "at a time)")
    return res


def _trainer(model_dir: Path, run_dir: Path, threads: int, *overrides: str) -> Any:
    from ..train.config import load_config
    from ..train.rl import RLTrainer
    from ..train.run import RunContext

    cfg = load_config("smollm2", [f"rl.init={model_dir}", "rl.regime=ce", "rl.steps=1000000", f"threads={threads}",
                                  *overrides])
    return RLTrainer(cfg, RunContext.create(cfg, "ce", out_dir=run_dir))


def _hvp_row(tr: Any, mb: Any, rounds: int) -> dict[str, Any]:
    """One rev-rev HVP of J along a random direction against one gradient of J, interleaved."""
    import torch

    from ..diagnostics.probe import shared_params
    from ..rl.batch import compute_objectives
    from ..theory import eager_attention, grad, hvp

    params = shared_params(tr.model)
    g = torch.Generator().manual_seed(0)
    v = {k: torch.randn(p.shape, generator=g) for k, p in params.items()}

    def J(p):
        return compute_objectives(tr.model, mb, tr.spec, params=p, with_mtp=False).rl_objective

    was_training = tr.model.training
    tr.model.eval()
    try:
        with eager_attention(tr.model):
            s = interleave({"grad": lambda: grad(J, params), "rev-rev": lambda: hvp(J, params, v, "rev-rev")},
                           rounds=rounds, warmup=1, memory=False, progress="pretrained/hvp")
    finally:
        tr.model.train(was_training)
    med, lo, hi = paired_ratio(s["rev-rev"].times, s["grad"].times)
    return {"contender": "rev-rev HVP of J", "vs": "gradient of J", "median_ms": 1e3 * s["rev-rev"].median_s,
            "base_ms": 1e3 * s["grad"].median_s, "ratio": med, "ratio_min": lo, "ratio_max": hi, "rounds": rounds}
