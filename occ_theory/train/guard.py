"""Stopping a run cleanly: skip-and-stop on non-finite steps, and SIGINT / SIGTERM at a step boundary.

``StepGuard``: a step whose loss or gradient is not finite is skipped and counted; ``max_bad`` in a
row raise ``BadStepsError``. ``params_finite`` tells whether weights are still finite (a step with
finite gradients can still overflow them). ``StopSignals`` turns the first SIGINT or SIGTERM into
a flag the training loop checks after each optimizer step (it then saves and stops), and says so at
once on stderr; a second signal stops at once (``Aborted``), saving nothing.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterable
from types import FrameType

import torch

from ..errors import Aborted, BadStepsError


class StepGuard:
    """Counts non-finite steps; ``key`` names the config key of the limit in the error."""

    def __init__(self, max_bad: int, key: str):
        self.max_bad, self.key = max_bad, key
        self.in_row = 0
        self.total = 0

    def check(self, finite: bool, step: int) -> bool:
        """Record one step; returns ``finite``; raises ``BadStepsError`` at ``max_bad`` bad steps in a row."""
        if finite:
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        if self.in_row >= self.max_bad:
            raise BadStepsError(f"{self.in_row} consecutive steps had a non-finite loss or gradient "
                                f"({self.key} = {self.max_bad}); stopped at step {step}")
        return False


def params_finite(params: Iterable[torch.Tensor]) -> bool:
    """Whether every parameter is finite (one host sync)."""
    flags = [torch.isfinite(p.detach()).all() for p in params]
    return bool(torch.stack(flags).all()) if flags else True


class StopSignals:
    """Within ``with``: the first SIGINT / SIGTERM sets ``received`` (its name) and prints at once where the run
    will stop (``step()``: the step after which the loop checks the flag) and that a second signal aborts without
    saving; a second raises ``Aborted`` at once. Outside the main thread it installs nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, step: Callable[[], int] | None = None, stream=None) -> None:
        self.received: str | None = None
        self.step = step
        self.stream = stream
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            raise Aborted(name)
        self.received = name
        where = f"after step {self.step()}" if self.step is not None else "at the end of this step"
        again = "Ctrl-C again" if signum == signal.SIGINT else "a second signal"
        print(f"\n{name}: stopping {where} and saving a checkpoint; {again} aborts without saving",
              file=self.stream or sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
