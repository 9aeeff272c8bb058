"""Errors the ``occ`` command reports as one line (no traceback) with a non-zero exit status."""


class RunStopped(RuntimeError):
    """A run stopped on purpose (e.g. too many non-finite steps) after saving a checkpoint."""
