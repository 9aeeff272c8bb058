"""What every benchmark shares: interleaved timing, peak memory, machine load, result tables.

Timing: the contenders of one measurement are called round-robin in the same process (the
starting contender rotates every round), so drift of a shared, loaded machine hits them alike;
per contender the median and the spread ``(max − min) / median`` are reported, and ratios are
medians of per-round ratios (the two calls of a round ran back to back).

Memory: every benchmark runs in its own process (``occ_theory.bench.__main__``), so the
process's peak RSS (``VmHWM``) is its own. Per contender, one extra untimed call after the timed
rounds measures the peak RSS during that call: free heap memory is returned to the OS first
(``malloc_trim``), the kernel's high-water mark is reset (``/proc/self/clear_refs``), and
``VmHWM − VmRSS(before)`` is the memory the call needed on top of what was live. On CUDA
``torch.cuda.max_memory_allocated`` over the same call.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MB = 1024 * 1024


# ------------------------------------------------------------------ results


@dataclass
class BenchResult:
    """One benchmark's table (``rows``), remarks shown under it (``notes``) and its process's peak memory."""

    name: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # further tables, by title
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    error: str | None = None
    memory: dict[str, float | None] = field(default_factory=dict)
    load: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchResult:
        return cls(**d)


def target(ratio: float, op: str, value: float) -> dict[str, Any]:
    """The ratio with its target (``op`` is ``"<="`` or ``">="``) and whether it is met."""
    met = ratio <= value if op == "<=" else ratio >= value
    return {"ratio": ratio, "target": f"{op} {value:g}", "met": bool(met)}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(c for r in rows for c in r))

    def fmt(x: Any, col: str) -> str:
        if isinstance(x, bool):
            return ("yes" if x else "**NO**") if col == "met" else ("yes" if x else "no")
        if isinstance(x, float):
            return f"{x:.3g}"
        return "" if x is None else str(x)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c), c) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def render(result: BenchResult) -> str:
    """The benchmark's section of the report: table, memory, load, notes."""
    out = [f"## {result.name}", ""]
    if result.skipped:
        out += [f"skipped: {result.skipped}", ""]
    if result.error:
        out += [f"error: {result.error}", ""]
    if result.rows:
        out += [markdown_table(result.rows), ""]
    for title, rows in result.tables.items():
        out += [f"{title}:", "", markdown_table(rows), ""]
    mem = ", ".join(f"{k} {v:.0f}" for k, v in result.memory.items() if v is not None)
    load = ", ".join(f"{k} {v:.2f}" for k, v in result.load.items())
    out += [f"process: {result.wall_s:.0f} s wall" + (f"; {mem}" if mem else "") + (f"; load: {load}" if load else ""),
            ""]
    out += [f"* {n}" for n in result.notes]
    return "\n".join(out).rstrip() + "\n"


# ------------------------------------------------------------------ memory


def _proc_status() -> dict[str, float]:
    """VmHWM and VmRSS of this process in MB (empty off Linux)."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(rest.split()[0]) / 1024
    return out


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """The process's peak RSS across resets of the kernel's high-water mark, and per-call peaks."""

    def __init__(self) -> None:
        self.process_peak_mb = 0.0
        self.can_reset = os.access("/proc/self/clear_refs", os.W_OK)

    def _hwm(self) -> float:
        st = _proc_status()
        if "VmHWM" in st:
            return st["VmHWM"]
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux

    def reset(self) -> float | None:
        """Start a per-call measurement; returns the RSS (MB) it starts from, None when unsupported."""
        self.process_peak_mb = max(self.process_peak_mb, self._hwm())
        if not self.can_reset:
            return None
        _malloc_trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.can_reset = False
            return None
        return _proc_status().get("VmRSS")

    def peak(self) -> float:
        """The peak RSS (MB) since the last ``reset`` (since the start without one)."""
        hwm = self._hwm()
        self.process_peak_mb = max(self.process_peak_mb, hwm)
        return hwm

    def process(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {"peak_rss_mb": max(self.process_peak_mb, self._hwm())}
        torch = _torch_if_cuda()
        if torch is not None:
            out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / MB
        return out


PEAK = PeakMemory()


def _torch_if_cuda() -> Any:
    import torch

    return torch if torch.cuda.is_available() else None


# ------------------------------------------------------------------ timing


@dataclass
class Samples:
    """One contender's timed calls (seconds), what each returned, and the memory of its memory call."""

    times: list[float] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)
    peak_rss_mb: float | None = None
    rss_delta_mb: float | None = None
    cuda_peak_mb: float | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        med = self.median_s
        return (max(self.times) - min(self.times)) / med if med > 0 else 0.0

    def rates(self, count: Callable[[Any], float]) -> list[float]:
        """``count(value) / time`` per call (e.g. tokens per second)."""
        return [count(v) / t for v, t in zip(self.values, self.times)]

    def memory(self) -> dict[str, float | None]:
        out = {"peak_rss_mb": self.peak_rss_mb, "rss_delta_mb": self.rss_delta_mb}
        if self.cuda_peak_mb is not None:
            out["cuda_peak_mb"] = self.cuda_peak_mb
        return out


def _sync() -> None:
    torch = _torch_if_cuda()
    if torch is not None:
        torch.cuda.synchronize()


def measure_memory(fn: Callable[[], Any], into: Samples) -> Any:
    """Call ``fn`` once (untimed) and record its peak RSS, the RSS it added, and its CUDA peak."""
    torch = _torch_if_cuda()
    if torch is not None:
        torch.cuda.reset_peak_memory_stats()
    before = PEAK.reset()
    value = fn()
    _sync()
    peak = PEAK.peak()
    into.peak_rss_mb = peak if before is not None else None
    into.rss_delta_mb = peak - before if before is not None else None
    if torch is not None:
        into.cuda_peak_mb = torch.cuda.max_memory_allocated() / MB
    return value


def interleave(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1, memory: bool = True,
               progress: str = "") -> dict[str, Samples]:
    """Call every contender ``warmup`` times, then ``rounds`` timed rounds (one call of each per
    round, the starting contender rotating), then (``memory``) one untimed memory call each."""
    from ..progress import Progress

    keys = list(fns)
    out = {k: Samples() for k in keys}
    bar = Progress(progress, rounds) if progress else None  # one status line, not one line per round
    for _ in range(warmup):
        for k in keys:
            fns[k]()
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            _sync()
            t0 = time.perf_counter()
            value = fns[k]()
            _sync()
            out[k].times.append(time.perf_counter() - t0)
            out[k].values.append(value)
        if bar is not None:
            bar.update(r + 1)
    if memory:
        for k in keys:
            measure_memory(fns[k], out[k])
    return out


def paired_ratio(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median, min and max over rounds of ``num[i] / den[i]``."""
    ratios = [a / b for a, b in zip(num, den)]
    return statistics.median(ratios), min(ratios), max(ratios)


def log_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x (the exponent of a power law)."""
    import numpy as np

    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


# ------------------------------------------------------------------ machine


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine(threads: int) -> dict[str, Any]:
    """CPU model, cores, library versions, torch threads, CUDA device, load average now."""
    import torch

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "cores_usable": affinity, "threads": threads,
        "python": platform.python_version(), "torch": torch.__version__, "transformers": _version("transformers"),
        "trl": _version("trl"), "numpy": _version("numpy"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
    }


class LoadMeter:
    """How busy the machine was with other work while a benchmark ran: CPU-seconds per second spent
    by every other process (``/proc/stat`` busy time minus this process's own) and steal time. Nothing is reported
    over less than ``MIN_WALL_S`` (a skipped benchmark: a few ticks over a few milliseconds read as 19 cores), and
    no figure exceeds the cores there are."""

    MIN_WALL_S = 1.0

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float, float] | None:
        try:
            fields_ = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        idle = fields_[3] + (fields_[4] if len(fields_) > 4 else 0.0)
        steal = fields_[7] if len(fields_) > 7 else 0.0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        busy = (sum(fields_[:8]) - idle - steal) / tick
        return time.perf_counter(), busy, steal / tick, usage.ru_utime + usage.ru_stime

    def report(self) -> dict[str, float]:
        end = self._read()
        if self.start is None or end is None:
            return {}
        wall = end[0] - self.start[0]
        if wall < self.MIN_WALL_S:  # /proc/stat counts in clock ticks (10 ms): a shorter interval is noise
            return {}
        cores = float(os.cpu_count() or 1)
        own = min((end[3] - self.start[3]) / wall, cores)
        others = min(max((end[1] - self.start[1]) / wall - own, 0.0), cores)
        return {"own_cores": own, "other_cores": others, "steal_cores": min((end[2] - self.start[2]) / wall, cores)}
