"""The calibration sweep of the tiny testbed (``scripts/calibrate.sh``): does RL learn, and at which learning rate?

Each run of the sweep is an ``occ rl`` run of the baseline regime at one ``rl.lr``, from one SFT checkpoint
whose ``eval.json`` (``occ eval``, the same eval settings) is the starting point. Per run: the sampled
held-out gain (mean@k) over the SFT checkpoint on the RL suites (the target: ≥ 0.10) and on the other
suites (forgetting), greedy beside it, and the training reward early and late. The chosen point is the
run with the largest RL-suite gain among those that forget less than ``FORGET_LIMIT``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .load import Run
from .style import new_figure, save

TARGET_GAIN = 0.10
"""Issue 16's target: sampled held-out accuracy on the RL suites rises by at least this over SFT."""
FORGET_LIMIT = 0.05
"""A run forgets when its mean sampled accuracy on the suites it did not train on drops by more than this."""
EDGE = 0.2
"""Early and late training reward: the mean over the first and last this share of the steps."""


def _acc(ev: dict[str, Any] | None, suites: list[str], key: str) -> float:
    vals = [ev["suites"][s][key] for s in suites if ev and s in ev.get("suites", {}) and key in ev["suites"][s]]
    return float(np.mean(vals)) if vals else float("nan")


def summarize(runs: list[Run]) -> dict[str, Any]:
    """One row per run (sorted by lr) and the chosen point; every number from the runs' files."""
    rows = []
    for r in runs:
        rl_suites = list(r.config.get("task", {}).get("suites", []))
        ev, sft = r.eval, r.sft_eval
        other = sorted(set(ev.get("suites", {}) if ev else ()) - set(rl_suites))
        reward = pd.to_numeric(r.metrics.get("reward/mean"), errors="coerce").dropna().to_numpy()
        k = max(1, int(len(reward) * EDGE))
        row = {"run": r.name, "lr": float(r.rl.get("lr", float("nan"))), "warmup_steps": r.rl.get("warmup_steps", 0),
               "steps": int(r.metrics["step"].max()) if len(r.metrics) else 0, "rl_suites": rl_suites,
               "reward_early": float(reward[:k].mean()) if len(reward) else float("nan"),
               "reward_late": float(reward[-k:].mean()) if len(reward) else float("nan")}
        for name, suites in (("rl", rl_suites), ("other", other)):
            for key, label in (("mean_at_k", "sampled"), ("greedy_acc", "greedy")):
                after, before = _acc(ev, suites, key), _acc(sft, suites, key)
                row |= {f"{name}_{label}": after, f"{name}_{label}_sft": before, f"{name}_{label}_gain": after - before}
        rows.append(row)
    rows.sort(key=lambda x: x["lr"])
    ok = [x for x in rows if np.isfinite(x["rl_sampled_gain"])
          and not x["other_sampled_gain"] < -FORGET_LIMIT]  # NaN forgetting (no other suite) does not disqualify
    chosen = max(ok, key=lambda x: x["rl_sampled_gain"]) if ok else None
    return {"runs": rows, "chosen": None if chosen is None else chosen["run"],
            "chosen_lr": None if chosen is None else chosen["lr"],
            "target_gain": TARGET_GAIN, "forget_limit": FORGET_LIMIT,
            "target_met": bool(chosen is not None and chosen["rl_sampled_gain"] >= TARGET_GAIN)}


def plot(runs: list[Run], summary: dict[str, Any], out: Path) -> Path:
    """Left: training reward over steps per lr (rolling mean). Right: sampled held-out gain over SFT against
    lr, on the RL suites and on the others, with the target and the chosen point."""
    fig = new_figure(11, 4)
    ax1, ax2 = fig.subplots(1, 2)
    by_name = {r.name: r for r in runs}
    for row in summary["runs"]:
        m = by_name[row["run"]].metrics
        reward = pd.to_numeric(m["reward/mean"], errors="coerce")
        width = max(1, len(reward) // 15)
        ax1.plot(m["step"], reward.rolling(width, min_periods=1).mean(), label=f"lr {row['lr']:g}",
                 lw=2.5 if row["run"] == summary["chosen"] else 1.2)
    ax1.set(xlabel="optimizer step", ylabel="training reward (rolling mean)", title="Training reward")
    ax1.legend(fontsize=8)
    lrs = [x["lr"] for x in summary["runs"]]
    for key, label, style in (("rl_sampled_gain", "RL suites, mean@k", "o-"),
                              ("rl_greedy_gain", "RL suites, greedy", "o:"),
                              ("other_sampled_gain", "other suites, mean@k", "s--")):
        ax2.plot(lrs, [x[key] for x in summary["runs"]], style, label=label)
    ax2.axhline(summary["target_gain"], color="0.4", lw=0.8, ls="--", label=f"target +{summary['target_gain']:g}")
    ax2.axhline(0, color="black", lw=0.6)
    if summary["chosen"] is not None:
        best = next(x for x in summary["runs"] if x["run"] == summary["chosen"])
        ax2.plot([best["lr"]], [best["rl_sampled_gain"]], "*", ms=16, color="crimson", label="chosen")
    ax2.set(xscale="log", xlabel="RL learning rate", ylabel="held-out accuracy − SFT checkpoint's",
            title="Held-out gain over SFT")
    ax2.legend(fontsize=8)
    return save(fig, out)


def main(argv: list[str] | None = None) -> int:
    """``python -m analysis.calibration RUN_DIR... --out DIR``: calibration.png and calibration.json."""
    import argparse
    import json

    from occ_theory.atomic import atomic_write_text
    from occ_theory.jsonl import json_safe

    from .load import load_runs

    p = argparse.ArgumentParser(prog="python -m analysis.calibration", description=main.__doc__)
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    runs = [r for r in load_runs(args.run_dirs) if r.is_rl and r.eval is not None]
    if not runs:
        raise SystemExit("no finished RL run (with eval.json) among the given directories")
    summary = summarize(runs)
    png = plot(runs, summary, args.out / "calibration.png")
    atomic_write_text(args.out / "calibration.json", json.dumps(json_safe(summary), indent=1, allow_nan=False))
    for row in summary["runs"]:
        print(f"lr {row['lr']:<8g} reward {row['reward_early']:.3f} -> {row['reward_late']:.3f}   RL suites mean@k "
              f"{row['rl_sampled_sft']:.3f} -> {row['rl_sampled']:.3f} ({row['rl_sampled_gain']:+.3f})   other "
              f"{row['other_sampled_gain']:+.3f}")
    print(f"chosen: {summary['chosen']} (target +{TARGET_GAIN:g} met: {summary['target_met']}) -> {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
