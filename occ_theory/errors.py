"""Errors the ``occ`` command reports as one line (no traceback) with a non-zero exit status."""

from __future__ import annotations

import re


class RunStopped(RuntimeError):
    """A run stopped on purpose (e.g. too many non-finite steps) after saving a checkpoint."""


class BadStepsError(RunStopped):
    """Too many consecutive steps with a non-finite loss or gradient (``occ_theory.train.guard.StepGuard``)."""


class Interrupted(RunStopped):
    """SIGINT or SIGTERM stopped a run at a step boundary (after saving what lets it resume). ``signal`` is the
    signal's name (``SIGTERM``), given or read from the message, which names it; the command exits 128 + its
    number."""

    def __init__(self, message: str, signal: str | None = None):
        super().__init__(message)
        found = re.search(r"\bSIG[A-Z]+\b", message)
        self.signal = signal or (found.group(0) if found else None)


class Aborted(KeyboardInterrupt):
    """A second SIGINT or SIGTERM during a run: it stops at once, without saving (``signal`` names it)."""

    def __init__(self, signal: str):
        super().__init__(signal)
        self.signal = signal


class WriteFailed(OSError):
    """A run could not write a file (a full disk, a lost permission): the message says what was kept and how to
    resume. An ``OSError``, so the command reports it as bad input is (one line, exit status 2)."""


class Diverged(RunStopped):
    """The weights, or the logits they give, are no longer finite."""
