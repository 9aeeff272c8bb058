"""The one log writer: ``metrics.jsonl`` (one flushed JSON object per optimizer step) + TensorBoard.

Keys are flat and namespaced by ``/`` (``rl/…``, ``mtp/…``, ``reward/…``, ``lambda/…``,
``diag/…``, ``perf/…``) and every record has ``step``. Non-finite floats are written as ``null``
so that every line stays valid JSON (``occ_theory.jsonl.json_safe``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..jsonl import json_safe
from ..progress import Progress

__all__ = ["MetricsWriter", "Progress"]


class MetricsWriter:
    """Append records to ``run_dir/metrics.jsonl`` (flushed and fsynced per line) and to ``run_dir/tb``;
    ``purge_step`` (a resumed run's first step) drops TensorBoard's events from that step on."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, purge_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=purge_step)
            except ImportError:  # tensorboard missing: jsonl is the record of truth
                self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        if "step" not in record:
            raise ValueError("every metrics record needs a 'step'")
        clean = json_safe(record)
        try:
            self._file.write(json.dumps(clean, allow_nan=False) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:  # a full disk: named after the file (a torn last line is dropped on reading)
            raise OSError(e.errno, e.strerror or str(e), str(self.path)) from e
        if self._tb is not None:
            step = int(record["step"])
            for k, v in clean.items():
                if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:  # only after a write failed (each record is flushed): that error is the one reported
            pass
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
