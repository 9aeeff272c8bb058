"""``occ cost``: what one optimizer step of each arm of an experiment costs, timed the way a cost is compared.

Separate runs' step times (``perf/train_s``) differ by more than their arms: by how busy the machine was
while each ran, by the lengths of the responses each policy came to write, and (``diag.every`` > 0) by the
gradient recorder's per-step work, which differs between regimes. Here every arm's trainer
is built from its own run's ``config.yaml`` (the lowest seed's; diagnostics off), all from the same
starting checkpoint (``rl.init``), and each takes real steps on one and the same minibatch (the first
of a rollout of the first arm, with l_old nudged and random advantages, so that every arm's loss and
coefficient do real work), called round-robin with the starting arm rotating: load drift hits them
alike, and round ``i``'s calls ran back to back. The raw per-round times go to ``step_cost.json``
(``STEP_COST_FILE``); ``analysis.claims.occ_time_cost`` turns them into claim 6's ratios and intervals, and
``format_step_cost`` into a per-arm table (median step, and the median per-round ratio to the first arm). An
experiment of one arm is refused: there is nothing to compare its step with.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from analysis.load import STEP_COST_FILE, load_runs, resolve_init

from ..atomic import atomic_write_text
from .common import LoadMeter, interleave, machine
from .fixtures import DIAG_OFF, rollout_minibatch

__all__ = ["DEFAULT_ROUNDS", "MIN_ROUNDS", "STEP_COST_FILE", "arm_runs", "format_step_cost", "step_cost",
           "write_step_cost"]

DEFAULT_ROUNDS = 32
MIN_ROUNDS = 6
"""The fewest rounds whose median has a 95% interval (order statistics: 2·0.5⁶ < 0.05)."""
CHECKPOINT_FILE = "occ_model.json"


def arm_runs(run_dirs: list[Path]) -> tuple[dict[str, Path], Path]:
    """Arm → the run directory of its lowest seed, for the RL runs among ``run_dirs`` (runs and folders of
    runs), ``detach`` first when present; and the checkpoint they all started from (``ValueError`` naming the
    problem when they did not start from one, or it is not found)."""
    runs = sorted((r for r in load_runs(run_dirs) if r.is_rl), key=lambda r: (r.seed, r.name))
    if not runs:
        raise ValueError(f"no RL run among {[str(p) for p in run_dirs]}")
    inits = {r.name: resolve_init(r.path, r.rl.get("init"), CHECKPOINT_FILE) for r in runs}
    missing = [r for r in runs if inits[r.name] is None]
    if missing:
        raise ValueError(f"rl.init of {missing[0].path} ({missing[0].rl.get('init')!r} in its config.yaml) is not a "
                         f"checkpoint (no {CHECKPOINT_FILE}) from here or above the run")
    distinct = {str(i.resolve()) for i in inits.values()}
    if len(distinct) != 1:
        raise ValueError(f"the runs started from different checkpoints ({sorted(distinct)}); a cost comparison "
                         "needs one")
    arms: dict[str, Path] = {}
    for r in runs:
        arms.setdefault(r.arm, r.path)
    if len(arms) < 2:
        raise ValueError(f"occ cost compares the arms of an experiment, but these runs are all one arm "
                         f"({next(iter(arms))}): give the runs of two arms or more")
    return dict(sorted(arms.items(), key=lambda kv: kv[0] != "detach")), next(iter(inits.values()))


def step_cost(run_dirs: list[Path], rounds: int = DEFAULT_ROUNDS, threads: int = 1, warmup: int = 2) -> dict[str, Any]:
    """Time one optimizer step of every arm of ``run_dirs``, interleaved (module docstring); JSON-ready.
    ``rounds`` is rounded up to a multiple of the number of arms, so that each arm starts a round equally often."""
    from ..train.config import load_config
    from ..train.rl import RLTrainer
    from ..train.run import RunContext

    if rounds < MIN_ROUNDS:
        raise ValueError(f"rounds must be >= {MIN_ROUNDS} (fewer give the median no 95% interval), got {rounds}")
    arms, init = arm_runs(run_dirs)
    rounds = -(-rounds // len(arms)) * len(arms)
    t0, load = time.perf_counter(), LoadMeter()
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for i, (arm, run) in enumerate(arms.items()):
            cfg = load_config(run / "config.yaml", [f"rl.init={init}", "rl.steps=1000000", f"threads={threads}",
                                                    *DIAG_OFF])
            trainers[arm] = RLTrainer(cfg, RunContext.create(cfg, cfg.rl.regime, out_dir=Path(tmp) / str(i)))
        first = next(iter(trainers.values()))
        mb = rollout_minibatch(first)

        def step(tr: Any):
            return lambda: tr.train_step(mb, first_after_rollout=False)

        samples = interleave({a: step(t) for a, t in trainers.items()}, rounds=rounds, warmup=warmup, memory=False,
                             progress="cost")
    return {"rounds": rounds, "warmup": warmup, "threads": threads, "init": str(init),
            "minibatch": {"rows": int(mb.size), "columns": int(mb.input_ids.shape[1]),
                          "response_tokens": int(mb.response_mask.sum())},
            "arms": {a: {"run": str(arms[a]), "times_s": s.times} for a, s in samples.items()},
            "machine": machine(threads), "load": load.report(), "wall_s": time.perf_counter() - t0}


def write_step_cost(run_dirs: list[Path], out: Path, rounds: int = DEFAULT_ROUNDS, threads: int = 1
                    ) -> dict[str, Any]:
    """``step_cost`` written to ``out`` (atomically: an interrupted measurement leaves no file); returns it."""
    result = step_cost(run_dirs, rounds, threads)
    atomic_write_text(out, json.dumps(result, indent=1))
    return result


def format_step_cost(result: dict[str, Any]) -> str:
    """One row per arm: its median step, and the median over rounds of its step over the first arm's (``detach``
    when timed), with the rounds' range; claim 6's interval is ``occ figures``'s (``analysis.claims``)."""
    arms = result["arms"]
    base_name, base = next(iter(arms.items()))
    width = max(len(a) for a in arms) + 2
    lines = [f"{'arm':<{width}}{'median step':>14}{f'/ {base_name} (median, range)':>34}"]
    for arm, entry in arms.items():
        times = entry["times_s"]
        ratios = [t / b for t, b in zip(times, base["times_s"])]
        vs = (f"{statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f})" if arm != base_name else "1")
        lines.append(f"{arm:<{width}}{1e3 * statistics.median(times):>11.1f} ms{vs:>34}")
    mb = result["minibatch"]
    lines.append(f"{result['rounds']} interleaved rounds on one minibatch ({mb['rows']} rows, {mb['response_tokens']} "
                 f"response tokens), {result['threads']} thread(s), {result['wall_s']:.0f} s")
    return "\n".join(lines)
