"""``occ bench``: the toolkit's costs, each measured side by side with what it is compared to.

    occ bench [NAME...] [--json PATH] [--repeats N] [--sizes tiny,small] [--threads N] [--quick]
              [--pretrained-dir DIR]

Benchmarks (``BENCHMARKS``; each module's docstring says exactly what it measures):

* ``hvp``: one HVP of J against one gradient of J (target ≤ 3);
* ``step``: one RL optimizer step, occ with each proxy against detach (≤ 1.03) and the fully
  instrumented step against the plain one (≤ 8);
* ``rollout``: tokens/s of our sampler (hand-written static-KV decoder) against ``transformers``
  ``generate`` with a dynamic cache, a static cache, and a static cache compiled (≥ 1.5 against the fastest);
* ``trainer``: tokens/s of one full RL step against TRL's ``GRPOTrainer`` (≥ 1.5; skipped
  without TRL);
* ``scaling``: step time and memory against width, depth, batch, response length; the
  instrumented step against parameter count (log-log slope ≤ 1.15);
* ``pretrained``: at 135M parameters (SmolLM2, ``occ models fetch smollm2``; ``--pretrained-dir``): one
  HVP of J in gradients, and the instrumented step against the plain one (skipped without the model).

Each benchmark runs in its own process (``python -m occ_theory.bench --one NAME``), so the peak
memory it reports is its own. Contenders are interleaved round-robin after warm-up; medians,
spreads and per-round ratios are reported (``common``). ``--json`` also writes a markdown report
next to the JSON (every table, the machine, how busy it was). Never run from timed tests.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .common import PEAK, BenchResult, LoadMeter, machine, markdown_table, render

BENCHMARKS = ("hvp", "step", "rollout", "trainer", "scaling", "pretrained")
DEFAULT = BENCHMARKS[:-1]
"""What a bare ``occ bench`` runs: ``pretrained`` (135M parameters, about 12 GB and 6 min) runs only when named."""
SIZES = ("tiny", "small")


@dataclass(frozen=True)
class Settings:
    names: tuple[str, ...]
    repeats: int
    sizes: tuple[str, ...]
    threads: int
    quick: bool
    timeout_s: float
    pretrained_dir: str | None = None

    def argv(self) -> list[str]:
        """The command-line flags that reproduce these settings in a child process."""
        return ["--repeats", str(self.repeats), "--sizes", ",".join(self.sizes), "--threads", str(self.threads),
                *(["--quick"] if self.quick else []),
                *(["--pretrained-dir", self.pretrained_dir] if self.pretrained_dir else [])]


def add_arguments(p) -> None:
    p.add_argument("names", nargs="*", default=[], metavar="NAME",
                   help=f"benchmarks to run (default: {', '.join(DEFAULT)}; also: pretrained)")
    p.add_argument("--json", type=Path, default=None,
                   help="write the results as JSON here, and a markdown report next to it (.md)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds per measurement, median reported (default 7; 2 with --quick)")
    p.add_argument("--sizes", default=None, help="model sizes for hvp, comma-separated (default tiny,small; "
                   "tiny with --quick)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads in every benchmark (default 1: stable timings on a shared machine)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and the smallest sizes (a smoke run)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per benchmark process")
    p.add_argument("--pretrained-dir", default=None, metavar="DIR",
                   help="the model of the pretrained benchmark (default: where `occ models fetch smollm2` puts it)")


def settings_from(args) -> Settings:
    """Validated settings (``ValueError`` naming the option) before any work."""
    names = tuple(args.names or DEFAULT)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 7)
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    sizes = tuple(s for s in (args.sizes or ("tiny" if args.quick else "tiny,small")).split(",") if s)
    bad = [s for s in sizes if s not in SIZES]
    if bad or not sizes:
        raise ValueError(f"--sizes: unknown size(s) {bad}; choose from {list(SIZES)}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    return Settings(names, repeats, sizes, args.threads, bool(args.quick), float(args.timeout),
                    getattr(args, "pretrained_dir", None))


# ------------------------------------------------------------------ one benchmark (child process)


def run_one(name: str, s: Settings) -> BenchResult:
    """Run benchmark ``name`` in this process; failures become the result's ``error``."""
    import torch

    from .hvp import bench_hvp
    from .pretrained import bench_pretrained
    from .rollout import bench_rollout
    from .scaling import bench_scaling
    from .step import bench_step
    from .trainer import bench_trainer

    torch.set_num_threads(s.threads)
    fns = {
        "hvp": lambda: bench_hvp(list(s.sizes), s.repeats),
        "step": lambda: bench_step(s.repeats, s.threads, s.quick),
        "rollout": lambda: bench_rollout(s.repeats, s.threads, s.quick),
        "trainer": lambda: bench_trainer(s.repeats, s.threads, s.quick),
        "scaling": lambda: bench_scaling(s.repeats, s.threads, s.quick),
        "pretrained": lambda: bench_pretrained(s.repeats, s.threads, s.quick, s.pretrained_dir),
    }
    load, t0 = LoadMeter(), time.perf_counter()
    try:
        res = fns[name]()
    except Exception as e:  # reported in the table, the other benchmarks still run
        traceback.print_exc()
        res = BenchResult(name, error=f"{type(e).__name__}: {e}")
    res.wall_s = time.perf_counter() - t0
    res.memory = PEAK.process()
    res.load = load.report()
    res.notes.append(f"torch threads {torch.get_num_threads()}")
    return res


# ------------------------------------------------------------------ orchestration (parent process)


def _child_env(s: Settings) -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the occ_theory package
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(s.threads)}
    return env


def run_in_subprocess(name: str, s: Settings) -> BenchResult:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "occ_theory.bench", "--one", name, "--result", str(out), *s.argv()]
        try:
            proc = subprocess.run(cmd, env=_child_env(s), timeout=s.timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return BenchResult(name, error=f"did not finish within --timeout {s.timeout_s:g} s")
        if proc.returncode != 0 or not out.is_file():
            return BenchResult(name, error=f"benchmark process exited with status {proc.returncode}")
        return BenchResult.from_dict(json.loads(out.read_text()))


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def report(mach: dict[str, Any], s: Settings, results: dict[str, BenchResult]) -> str:
    head = ["# occ bench", "", markdown_table([{"key": k, "value": v} for k, v in mach.items()]), "",
            f"settings: repeats {s.repeats}, sizes {','.join(s.sizes)}, threads {s.threads}"
            + (", quick" if s.quick else ""), ""]
    return "\n".join(head) + "\n".join(render(r) for r in results.values())


def write(path: Path, mach: dict[str, Any], s: Settings, results: dict[str, BenchResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": mach, "settings": asdict(s), "benchmarks": {k: r.to_dict() for k, r in results.items()}}
    path.write_text(json.dumps(_finite(doc), indent=2))
    path.with_suffix(".md").write_text(report(mach, s, results))


def run(args) -> int:
    s = settings_from(args)
    mach = machine(s.threads)
    print(f"[bench] {mach['cpu']}, {mach['cores_usable']} cores, load average {mach['loadavg_1_5_15']}", flush=True)
    results: dict[str, BenchResult] = {}
    for name in s.names:
        print(f"[bench] {name} ...", flush=True)
        results[name] = run_in_subprocess(name, s)
        print(render(results[name]), flush=True)
        if args.json:  # after every benchmark, so that finished ones survive an interruption
            write(args.json, mach, s, results)
    if args.json:
        print(f"[bench] written {args.json} and {args.json.with_suffix('.md')}")
    return 1 if any(r.error for r in results.values()) else 0
