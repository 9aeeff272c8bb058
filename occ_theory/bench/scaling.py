"""``scaling``: how the RL step's time and peak memory grow with width, depth, batch and response length.

Regime ``policy`` (the MTP loss in the graph), synthetic minibatches whose shapes are exact:
prompts of 6–14 random tokens, responses of exactly the given length (no early EOS), l_old nudged
and advantages random. Base point: ``ModelConfig.tiny()`` (H 128, 4 layers, 1 MTP depth),
16 rows, 40 response tokens; each axis moves one of these. The points of an axis are the
contenders of one interleaved measurement. Width and depth points also time the instrumented step
(``step``'s ``policy+diagnostics``) next to the plain one: its time against parameter count must
stay linear (log-log slope ≲ 1) — the diagnostics are a fixed number of gradient/HVP/forward
passes, each linear in the parameter count.

Slopes are least-squares fits of log(time) or log(memory) against log(the axis value), or against
log(parameter count) for width and depth together. Memory is the RSS the step adds on top of what
was live (``common.measure_memory``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ..models import ModelConfig
from .common import BenchResult, Samples, interleave, log_slope
from .fixtures import DIAG_EVERY_STEP, checkpoint, synthetic_minibatch, trainer

BASE = {"width": 128, "depth": 4, "batch": 16, "response": 40}
AXES = {"width": (64, 128, 256), "depth": (2, 4, 8), "batch": (8, 16, 32), "response": (20, 40, 80)}
LINEAR_TARGET = 1.15


def _model(width: int, depth: int) -> ModelConfig:
    return ModelConfig.tiny(hidden_size=width, intermediate_size=3 * width, num_layers=depth)


def bench_scaling(repeats: int, threads: int, quick: bool = False) -> BenchResult:
    res = BenchResult("scaling")
    axes = {k: v[:2] if quick else v for k, v in AXES.items()}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        models: dict[tuple[int, int], Path] = {}

        def ckpt(width: int, depth: int) -> Path:
            if (width, depth) not in models:
                models[width, depth] = checkpoint(d / f"ckpt-{width}-{depth}", _model(width, depth))
            return models[width, depth]

        # width and depth: plain and instrumented steps on every model, interleaved together
        shapes = sorted({(w, BASE["depth"]) for w in axes["width"]} | {(BASE["width"], n) for n in axes["depth"]})
        fns, params = {}, {}
        for w, n in shapes:
            plain = trainer(ckpt(w, n), d / f"plain-{w}-{n}", "policy", threads=threads)
            diag = trainer(ckpt(w, n), d / f"diag-{w}-{n}", "policy", *DIAG_EVERY_STEP, threads=threads)
            mb = synthetic_minibatch(plain, BASE["batch"], BASE["response"])
            fns[w, n, False] = _step(plain, mb)
            fns[w, n, True] = _step(diag, mb)
            params[w, n] = sum(p.numel() for p in plain.model.parameters())
        s = interleave(fns, rounds=max(2, repeats // 2), warmup=2, progress="scaling/params")
        for axis, i in (("width", 0), ("depth", 1)):
            for w, n in shapes:
                if (w, n)[1 - i] == (BASE["width"], BASE["depth"])[1 - i]:
                    rows.append(_row(axis, (w, n)[i], params[w, n], BASE["batch"], BASE["response"],
                                     s[w, n, False], s[w, n, True]))
        # batch and response length: plain steps on the base model
        base = ckpt(BASE["width"], BASE["depth"])
        for axis in ("batch", "response"):
            fns = {}
            for v in axes[axis]:
                tr = trainer(base, d / f"{axis}-{v}", "policy", threads=threads)
                b, t = (v, BASE["response"]) if axis == "batch" else (BASE["batch"], v)
                fns[v] = _step(tr, synthetic_minibatch(tr, b, t))
            s = interleave(fns, rounds=repeats, warmup=2, progress=f"scaling/{axis}")
            n_params = params.get((BASE["width"], BASE["depth"]))
            for v in axes[axis]:
                b, t = (v, BASE["response"]) if axis == "batch" else (BASE["batch"], v)
                rows.append(_row(axis, v, n_params, b, t, s[v], None))
    res.rows = rows
    res.tables["slopes"] = _slopes(rows)
    res.notes.append("slope = least-squares exponent of a power law (time ∝ x^slope); instrumented rows: "
                     f"target ≤ {LINEAR_TARGET} (no worse than linear in parameter count)")
    return res


def _step(tr: Any, mb: Any):
    return lambda: tr.train_step(mb, first_after_rollout=False)


def _row(axis: str, value: int, params: int | None, rows: int, response: int, plain: Samples,
         diag: Samples | None) -> dict[str, Any]:
    out = {"axis": axis, "value": value, "params": params, "rows": rows, "response_len": response,
           "step_ms": 1e3 * plain.median_s, "spread": plain.spread, "rss_delta_mb": plain.rss_delta_mb}
    if diag is not None:
        out |= {"instrumented_ms": 1e3 * diag.median_s, "instrumented_spread": diag.spread,
                "instrumented_rss_delta_mb": diag.rss_delta_mb, "instrumented_over_plain": diag.median_s / plain.median_s}
    return out


def _slopes(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for axis in AXES:
        pts = [r for r in rows if r["axis"] == axis]
        if len(pts) < 2:
            continue
        out.append(_fit(f"step time vs {axis}", [r["value"] for r in pts], [r["step_ms"] for r in pts]))
        if all("instrumented_ms" in r for r in pts):
            out.append(_fit(f"instrumented step time vs {axis}", [r["value"] for r in pts],
                            [r["instrumented_ms"] for r in pts]))
        mem = [r["rss_delta_mb"] for r in pts]
        if all(m is not None and m > 0 for m in mem):
            out.append(_fit(f"step memory vs {axis}", [r["value"] for r in pts], mem))
    by_params = sorted({r["params"]: r for r in rows if "instrumented_ms" in r}.values(), key=lambda r: r["params"])
    if len(by_params) >= 2:
        xs = [r["params"] for r in by_params]
        out.append(_fit("step time vs params", xs, [r["step_ms"] for r in by_params]))
        out.append(_fit("instrumented step time vs params", xs, [r["instrumented_ms"] for r in by_params],
                        LINEAR_TARGET))
        mem = [r["instrumented_rss_delta_mb"] for r in by_params]
        if all(m is not None and m > 0 for m in mem):
            out.append(_fit("instrumented step memory vs params", xs, mem))
    return out


def _fit(what: str, xs: list[float], ys: list[float], goal: float | None = None) -> dict[str, Any]:
    slope = log_slope(xs, ys)
    row: dict[str, Any] = {"fit": what, "points": len(xs), "x_range": f"{min(xs):g}–{max(xs):g}", "slope": slope,
                           "target": None, "met": None}
    if goal is not None:
        row |= {"target": f"<= {goal:g}", "met": slope <= goal}
    return row
