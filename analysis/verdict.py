"""What a claim returns, and the judging rules every claim shares (docs/theory.md section 6).

* The unit of replication is the run: a claim needs ``MIN_RUNS`` runs in each arm it reads, and
  every interval pooling probes is a run-level cluster bootstrap (``stats.cluster_bootstrap``).
* A share of probes (e.g. "the curve is concave") is judged by ``judge_share``: supported when the
  point share is at least ``SHARE_HIGH`` and its run-clustered 95% interval lies above
  ``SHARE_LOW``; not supported when the point is below ``SHARE_LOW`` and the interval below
  ``SHARE_HIGH``; inconclusive otherwise.
* A NaN never counts as support: it is left out of a share's numerator, and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .stats import share_interval

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive at this scale"
NO_LEARNING = "inconclusive: no learning"
"""The baseline's held-out gain over the SFT checkpoint is within its seed-to-seed spread."""
NOT_MEASURED = "inconclusive: not measured"
"""The claim's inputs are absent (an arm not run, a setting off): the detail says which; not a matter of scale."""
VERDICTS = (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, NO_LEARNING, NOT_MEASURED)

MIN_RUNS = 3
"""Fewer runs (seeds) than this in an arm a claim reads: inconclusive."""
MIN_POINTS = 5
"""Fewer points than this behind a correlation or share: inconclusive."""
SHARE_HIGH, SHARE_LOW = 0.8, 0.5
"""``judge_share``: supported at share ≥ 0.8 with the interval's lower end ≥ 0.5; not supported at share
< 0.5 with the interval's upper end < 0.8."""


@dataclass(frozen=True)
class Verdict:
    id: str
    """Short claim id (``1a``, ``4``): the key in ``summary.json`` and the README."""
    claim: str
    verdict: str
    numbers: dict[str, Any] = field(default_factory=dict)
    detail: str = ""


def inconclusive(claim_id: str, claim: str, why: str, verdict: str = INCONCLUSIVE, **numbers: Any) -> Verdict:
    return Verdict(claim_id, claim, verdict, numbers, why)


def not_measured(claim_id: str, claim: str, why: str, **numbers: Any) -> Verdict:
    return Verdict(claim_id, claim, NOT_MEASURED, numbers, why)


def too_few_runs(runs: pd.Series | Sequence, what: str) -> str | None:
    """The reason a claim is inconclusive when ``runs`` names fewer than ``MIN_RUNS`` distinct runs, else None."""
    n = int(pd.Series(list(runs)).nunique())
    return f"only {n} run(s) with {what}; at least {MIN_RUNS} runs are needed" if n < MIN_RUNS else None


def judge_share(flags: Sequence[bool], runs: Sequence, name: str) -> tuple[str, dict[str, Any]]:
    """The verdict of "most probes have property ``name``" (see the module docstring) and its numbers
    ``<name>_share``, ``<name>_share_lo``, ``<name>_share_hi``, ``<name>_points``."""
    flags = np.asarray(flags, bool)
    s = share_interval(flags, runs)
    nums = {f"{name}_points": len(flags)} | {f"{name}_{k}": v for k, v in s.items()}
    if len(flags) < MIN_POINTS or too_few_runs(runs, name):
        return INCONCLUSIVE, nums
    if s["share"] >= SHARE_HIGH and s["share_lo"] >= SHARE_LOW:
        return SUPPORTED, nums
    if s["share"] < SHARE_LOW and s["share_hi"] < SHARE_HIGH:
        return NOT_SUPPORTED, nums
    return INCONCLUSIVE, nums


def combine(verdicts: Sequence[str]) -> str:
    """All parts supported: supported; any part not supported: not supported; else inconclusive."""
    if verdicts and all(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    return NOT_SUPPORTED if NOT_SUPPORTED in verdicts else INCONCLUSIVE
