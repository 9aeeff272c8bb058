"""The calibration summary (analysis/calibration.py) on runs whose answer is known."""

import pandas as pd
import pytest

from analysis.calibration import FORGET_LIMIT, summarize
from analysis.load import Run


def _eval(rl: float, other: float) -> dict:
    suites = {"linear": rl, "countdown": rl, "addition": other, "signed": other}
    return {"suites": {s: {"mean_at_k": a, "greedy_acc": a + 0.05} for s, a in suites.items()}}


def _run(lr: float, rl: float, other: float, rewards=(0.3, 0.3, 0.5, 0.5, 0.5)) -> Run:
    metrics = pd.DataFrame({"step": range(1, len(rewards) + 1), "reward/mean": rewards})
    cfg = {"rl": {"lr": lr, "regime": "detach"}, "task": {"suites": ["linear", "countdown"]}}
    return Run(f"lr_{lr:g}", None, cfg, "detach", 0, metrics, eval=_eval(rl, other), sft_eval=_eval(0.2, 0.6))


def test_the_chosen_point_learns_most_without_forgetting():
    runs = [_run(1e-5, 0.25, 0.6), _run(1e-4, 0.32, 0.6 - FORGET_LIMIT / 2), _run(1e-3, 0.5, 0.3)]
    s = summarize(runs)
    assert [r["lr"] for r in s["runs"]] == [1e-5, 1e-4, 1e-3]
    assert s["chosen"] == "lr_0.0001"  # 1e-3 learns more but forgets the other suites
    assert s["runs"][1]["rl_sampled_gain"] == pytest.approx(0.12) and s["target_met"]
    assert s["runs"][1]["rl_greedy_gain"] == pytest.approx(0.12)
    assert s["runs"][0]["reward_early"] == pytest.approx(0.3) and s["runs"][0]["reward_late"] == pytest.approx(0.5)


def test_below_the_target_is_reported_as_missed():
    s = summarize([_run(3e-5, 0.25, 0.6)])
    assert s["chosen"] == "lr_3e-05" and not s["target_met"]
