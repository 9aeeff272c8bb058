"""The one log writer: ``metrics.jsonl`` (one flushed JSON object per optimizer step) + TensorBoard.

Keys are flat and namespaced by ``/`` (``rl/…``, ``mtp/…``, ``reward/…``, ``lambda/…``,
``diag/…``, ``perf/…``) and every record has ``step``. Non-finite floats are written as ``null``
so that every line stays valid JSON. ``Progress`` draws the one-line display.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO


def _clean(v: Any) -> Any:
    if isinstance(v, bool) or v is None or isinstance(v, str | int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if hasattr(v, "item"):  # numpy / torch scalars
        return _clean(v.item())
    return str(v)


class MetricsWriter:
    """Append records to ``run_dir/metrics.jsonl`` (flushed and fsynced per line) and to ``run_dir/tb``."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
            except ImportError:  # tensorboard missing: jsonl is the record of truth
                self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        if "step" not in record:
            raise ValueError("every metrics record needs a 'step'")
        clean = {k: _clean(v) for k, v in record.items()}
        self._file.write(json.dumps(clean, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            step = int(record["step"])
            for k, v in clean.items():
                if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Progress:
    """A single status line, rewritten in place on a terminal (a plain line every few seconds otherwise)."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, every_s: float = 5.0):
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = self._last = time.perf_counter()
        self.every_s = every_s

    def update(self, done: int, **fields: Any) -> None:
        now = time.perf_counter()
        if not self.tty and now - self._last < self.every_s and done < self.total:
            return
        self._last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        parts = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        line = f"[{self.label}] {done}/{self.total} {parts} ({rate:.2f}/s, eta {eta:.0f}s)"
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            if done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
