"""Where the time goes when a benchmark misses its target: phase timers and ``torch.profiler`` op tables.

``phase_times`` wraps named functions (``"module:attr"`` or ``"module:Class.method"``) with
timers for the duration of a few calls and restores them; times are inclusive and per call of the
profiled callable, so nested phases overlap their parents. ``top_ops`` runs ``torch.profiler``
and returns the operators with the most self CPU time, per call.
"""

from __future__ import annotations

import importlib
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any


def _resolve(target: str) -> tuple[Any, str]:
    module, _, path = target.partition(":")
    owner: Any = importlib.import_module(module)
    *parents, attr = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    return owner, attr


class PhaseTimer:
    """Inclusive time and call count of each target while active (``with PhaseTimer(targets) as t``)."""

    def __init__(self, targets: dict[str, str]) -> None:
        self.targets = targets
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self._saved: list[tuple[Any, str, Any]] = []
        self._start = 0.0
        self.wall = 0.0

    def __enter__(self) -> PhaseTimer:
        for label, target in self.targets.items():
            try:
                owner, attr = _resolve(target)
                original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
            except (AttributeError, KeyError, ImportError):  # the code moved on: that phase is not timed
                continue
            self._saved.append((owner, attr, original))
            wrapped = original.__func__ if isinstance(original, classmethod | staticmethod) else original
            timed = self._timed(wrapped, label)
            setattr(owner, attr, type(original)(timed) if isinstance(original, classmethod | staticmethod) else timed)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._start
        for owner, attr, original in reversed(self._saved):
            setattr(owner, attr, original)
        self._saved.clear()

    def _timed(self, func: Callable[..., Any], label: str) -> Callable[..., Any]:
        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return func(*a, **k)
            finally:
                self.totals[label] += time.perf_counter() - t0
                self.counts[label] += 1

        return timed

    def per_call(self, calls: int) -> dict[str, dict[str, float]]:
        """Milliseconds and calls of each target per call of the profiled work, and its whole time."""
        out = {label: {"ms": 1e3 * self.totals[label] / calls, "calls": self.counts[label] / calls}
               for label in self.targets}
        out["(whole call)"] = {"ms": 1e3 * self.wall / calls, "calls": 1.0}
        return out


def phase_times(fn: Callable[[], Any], targets: dict[str, str], calls: int = 3) -> dict[str, dict[str, float]]:
    """Per call of ``fn``: milliseconds spent inside each target and how many times it ran."""
    with PhaseTimer(targets) as timer:
        for _ in range(calls):
            fn()
    return timer.per_call(calls)


def top_ops(fn: Callable[[], Any], calls: int = 3, n: int = 6) -> list[dict[str, Any]]:
    """The ``n`` operators with the most self CPU time per call of ``fn`` (name, ms, calls)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3 / calls, "calls": e.count / calls} for e in events]


def describe_phases(phases: dict[str, dict[str, float]]) -> str:
    return "; ".join(f"{k} {v['ms']:.0f} ms" + (f" ({v['calls']:g}×)" if v["calls"] != 1 else "")
                     for k, v in phases.items())


def describe_ops(ops: list[dict[str, Any]]) -> str:
    return ", ".join(f"{o['op']} {o['self_ms']:.1f} ms/{o['calls']:g} calls" for o in ops)
