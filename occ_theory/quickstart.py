"""``occ quickstart``: the whole pipeline at tiny scale, under 8 minutes on an idle 2-core CPU.

SFT with MTP → held-out evaluation of the SFT checkpoint (the baseline every gain is measured from) →
RL in each regime (float64 probes at the first, a middle and the last step, with the real optimizer step; each run
evaluates itself) → ``occ probe``: one run's probes recomputed offline from their bundles (the same numbers), the
others' online values collected → ``occ cost`` (one step of each regime timed round-robin on one minibatch:
claim 6) → ``occ figures`` (every figure, F1–F10, and the claim table). The settings are the tiny configuration
with shorter schedules; every stage prints progress.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .train.config import REGIMES, load_config

SFT_SETTINGS = [  # the model is the tiny preset (ModelConfig.tiny(), the config's default)
    "name=quickstart", "task.weights=[2,1,1,1,1]", "sft.steps=500", "sft.warmup=30", "sft.eval_every=0",
    "sft.eval_size=32", "eval.size=32", "eval.samples=2",
]
RL_SETTINGS = [
    "name=quickstart", "rl.steps=40", "rl.prompts_per_rollout=8", "rl.group_size=8", "rl.minibatches=4",
    "rl.max_new_tokens=40", "rl.lr=1e-5", "rl.mtp_coef=0.1", "diag.every=20", "diag.curve_points=7",
    "diag.curve_real_step=true", "diag.optimum_per_decade=3", "diag.bootstrap=50", "diag.dtype=float64",
    "diag.taylor_halvings=3", "eval.size=32", "eval.samples=2",
]
COST_ROUNDS = 12
"""``occ cost``'s rounds in the quickstart: enough for claim 6's interval (a median over ≥ 6 rounds)."""


def _stage(i: int, n: int, msg: str, t0: float) -> None:
    print(f"[quickstart {i}/{n} +{time.perf_counter() - t0:.0f}s] {msg}", file=sys.stderr, flush=True)


def quickstart(out: Path, figures: Path | None, regimes: list[str], seed: int = 0) -> Path:
    from analysis.load import step_cost_path
    from analysis.report import write_report

    from .bench.cost import write_step_cost
    from .diagnostics.offline import recompute_run
    from .train.rl import run_rl
    from .train.run import evaluate_checkpoint
    from .train.sft import run_sft

    bad = [r for r in regimes if r not in REGIMES]
    if bad:
        raise ValueError(f"unknown regime(s) {bad}; choose from {list(REGIMES)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} already exists and is not empty: pass another --out")
    figures = Path(figures) if figures is not None else out / "figures"
    t0 = time.perf_counter()
    n = 2 + 2 * len(regimes) + 2
    _stage(1, n, "SFT with MTP (tiny model)", t0)
    sft_cfg = load_config(None, [*SFT_SETTINGS, f"seed={seed}"])
    ckpt = run_sft(sft_cfg, out_dir=out / "sft")
    evaluate_checkpoint(ckpt, sft_cfg)  # the same eval settings as the RL runs'
    runs = []
    for i, regime in enumerate(regimes):
        _stage(2 + i, n, f"RL regime {regime}", t0)
        cfg = load_config(None, [*RL_SETTINGS, f"seed={seed}", f"rl.regime={regime}", f"rl.init={ckpt}"])
        runs.append(run_rl(cfg, out_dir=out / f"rl_{regime}"))
    probed = [run for run in runs if (run / "probes").is_dir()]
    for i, run in enumerate(probed):
        offline = i == len(probed) - 1  # one run recomputed from its bundles, the others' online values collected
        _stage(2 + len(regimes) + i, n, f"occ probe {run.name}" + ("" if offline else " --online"), t0)
        recompute_run(run, online=not offline)
    if len(runs) > 1:
        _stage(n - 2, n, "occ cost: one step of each regime, interleaved on one minibatch", t0)
        write_step_cost(runs, step_cost_path(runs), rounds=COST_ROUNDS)  # where occ figures finds it
    else:
        _stage(n - 2, n, "occ cost skipped: it compares two regimes or more", t0)
    _stage(n - 1, n, f"figures -> {figures}", t0)
    summary = write_report(runs, figures)
    _stage(n, n, f"done in {time.perf_counter() - t0:.0f}s: {summary}", t0)
    return summary
