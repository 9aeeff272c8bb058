"""Errors the ``occ`` command reports as one line (no traceback) with a non-zero exit status."""


class RunStopped(RuntimeError):
    """A run stopped on purpose (e.g. too many non-finite steps) after saving a checkpoint."""


class BadStepsError(RunStopped):
    """Too many consecutive steps with a non-finite loss or gradient (``occ_theory.train.guard.StepGuard``)."""


class Interrupted(RunStopped):
    """SIGINT or SIGTERM stopped a run at a step boundary (after saving what lets it resume)."""


class Diverged(RunStopped):
    """The weights, or the logits they give, are no longer finite."""
