"""``occ bench``: the toolkit's costs, measured side by side in one run (never in timed tests).

Each benchmark returns rows of a table; ``run`` prints them as markdown and writes JSON.
Timings are medians over repeats after warm-up, with the spread (max − min) / median; the calls
being compared are interleaved so that drift of the machine affects both alike.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

BENCHMARKS = ("hvp",)


def add_arguments(p) -> None:
    p.add_argument("names", nargs="*", default=[], metavar="NAME",
                   help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per measurement (median reported)")
    p.add_argument("--sizes", default="tiny,small", help="model sizes for hvp/scaling, comma-separated")


def timed_pair(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    """Median and spread (s) of each callable, calls interleaved round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    out = {}
    for k, xs in samples.items():
        med = statistics.median(xs)
        out[k] = {"median_s": med, "spread": (max(xs) - min(xs)) / med if med > 0 else 0.0}
    return out


HVP_SIZES = {
    # a few hundred thousand parameters: the size the target is stated for
    "tiny": {"hidden_size": 128, "intermediate_size": 384, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
             "batch": 16, "length": 48},
    "small": {"hidden_size": 512, "intermediate_size": 1536, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4,
              "batch": 8, "length": 64},
}


def bench_hvp(sizes: list[str], repeats: int) -> list[dict]:
    """One HVP of the clipped surrogate J over one gradient of J, both through ``functional_call``."""
    return [row for size in sizes for row in _hvp_rows(size, repeats)]


def _hvp_rows(size: str, repeats: int) -> list[dict]:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from .theory import eager_attention, grad, hvp

    spec = HVP_SIZES[size]
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=100, hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
                      num_hidden_layers=spec["num_layers"], num_attention_heads=spec["num_heads"],
                      num_key_value_heads=spec["num_kv_heads"], max_position_embeddings=512,
                      tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    b, t = spec["batch"], spec["length"]
    ids = torch.randint(0, 100, (b, t), generator=g)
    old = -4.6 + 0.05 * torch.randn(b, t - 1, generator=g)
    adv = torch.randn(b, 1, generator=g)
    params = {k: p.detach() for k, p in model.named_parameters()}
    v = {k: torch.randn(p.shape, generator=g) for k, p in params.items()}

    def objective(p):
        logits = torch.func.functional_call(model, p, (ids,)).logits[:, :-1]
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        ratio = torch.exp(lp - old)
        return torch.minimum(ratio * adv, ratio.clamp(0.8, 1.28) * adv).mean()

    with eager_attention(model):
        res = timed_pair({
            "grad": lambda: grad(objective, params),
            "fwd-rev": lambda: hvp(objective, params, v, "fwd-rev"),
            "rev-rev": lambda: hvp(objective, params, v, "rev-rev"),
        }, repeats)
    n = sum(p.numel() for p in params.values())
    return [{
        "bench": "hvp", "size": size, "params": n, "batch": b, "length": t, "method": method,
        "grad_ms": 1e3 * res["grad"]["median_s"], "hvp_ms": 1e3 * res[method]["median_s"],
        "ratio": res[method]["median_s"] / res["grad"]["median_s"], "spread": res[method]["spread"],
        "target": 3.0,
    } for method in ("fwd-rev", "rev-rev")]


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    fmt = lambda x: f"{x:.3g}" if isinstance(x, float) else str(x)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run(args) -> int:
    names = args.names or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    sizes = [s for s in args.sizes.split(",") if s]
    bad = [s for s in sizes if s not in HVP_SIZES]
    if bad:
        raise ValueError(f"unknown size(s) {bad}; choose from {list(HVP_SIZES)}")
    results = {"machine": machine(), "benchmarks": {}}
    for name in names:
        print(f"[bench] {name} ...", flush=True)
        rows = {"hvp": lambda: bench_hvp(sizes, args.repeats)}[name]()
        results["benchmarks"][name] = rows
        print(markdown_table(rows), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0
