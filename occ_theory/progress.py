"""``Progress``: the one-line display of long work (training, probes, evaluation), below every layer."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


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
