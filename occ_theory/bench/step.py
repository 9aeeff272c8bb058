"""``step``: wall time of one RL optimizer step (``RLTrainer.train_step``) per regime.

One tiny checkpoint (``ModelConfig.tiny()``), one fixed minibatch (the first of a real rollout
of 8 prompts × 8 samples, l_old nudged and advantages random so that every regime does real work),
one trainer per contender loaded from the same checkpoint. Two interleaved groups:

* ``detach`` and ``occ`` with each proxy (``reference``, ``least_squares``, ``fisher``): the ratio
  occ/detach is the paper's "negligible cost" claim (target ≤ 1.03);
* ``policy`` plain and ``policy`` with the diagnostics forced on every step (gradient recorder,
  decomposition in SGD and Adam geometry, an 8-point λ-curve; no bootstrap, Taylor halvings or
  probe bundles): target ≤ 8.

Two warm-up steps first, so Adam has state and the Adam-geometry decomposition runs. Every call
is a real step: each trainer's model moves on, all by the same number of steps.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

from .common import BenchResult, Samples, interleave, paired_ratio, target
from .fixtures import DIAG_EVERY_STEP, checkpoint, rollout_minibatch, trainer
from .profiling import describe_ops, describe_phases, phase_times, top_ops

OCC_PROXIES = ("reference", "least_squares", "fisher")
OCC_TARGET = 1.03
DIAG_TARGET = 8.0


def bench_step(repeats: int, threads: int, quick: bool = False) -> BenchResult:
    res = BenchResult("step")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ckpt = checkpoint(d / "ckpt")
        cheap = {"detach": trainer(ckpt, d / "detach", "detach", threads=threads)}
        for proxy in OCC_PROXIES:
            cheap[f"occ/{proxy}"] = trainer(ckpt, d / f"occ-{proxy}", "occ", f"rl.proxy={proxy}", threads=threads)
        diag = {"policy": trainer(ckpt, d / "policy", "policy", threads=threads),
                "policy+diagnostics": trainer(ckpt, d / "policy-diag", "policy", *DIAG_EVERY_STEP, threads=threads)}
        mb = rollout_minibatch(cheap["detach"])

        def step(tr: Any):
            return lambda: tr.train_step(mb, first_after_rollout=False)

        # the cheap steps are ~10x shorter: more rounds for the 3% question
        a = interleave({k: step(t) for k, t in cheap.items()}, rounds=5 * repeats, warmup=2, progress="step/occ")
        b = interleave({k: step(t) for k, t in diag.items()}, rounds=repeats, warmup=2, progress="step/diag")
        rows = [_row(k, s, a["detach"] if k != "detach" else None, "detach", OCC_TARGET) for k, s in a.items()]
        rows += [_row(k, s, b["policy"] if k != "policy" else None, "policy", DIAG_TARGET) for k, s in b.items()]
        res.rows = rows
        res.notes += _notes(mb, b["policy+diagnostics"])
        missed = {r["contender"]: r for r in rows if r["met"] is False}
        calls = 1 if quick else 3
        if "occ/fisher" in missed:
            res.notes.append(_explain_fisher(cheap["occ/fisher"], mb, missed["occ/fisher"], a["detach"], calls))
        for name in ("occ/reference", "occ/least_squares"):
            if name in missed:
                res.notes.append(_explain_ops(name, step(cheap[name]), step(cheap["detach"]), missed[name], calls))
        if "policy+diagnostics" in missed:
            res.notes.append(_explain_diagnostics(step(diag["policy+diagnostics"]), missed["policy+diagnostics"],
                                                  b["policy"], calls))
    return res


def _row(name: str, s: Samples, base: Samples | None, base_name: str, goal: float) -> dict[str, Any]:
    regime, _, proxy = name.partition("/")
    row: dict[str, Any] = {"contender": name, "regime": regime.split("+")[0], "proxy": proxy or None,
                           "diagnostics": "+diagnostics" in name, "median_ms": 1e3 * s.median_s,
                           "spread": s.spread, "calls": len(s.times), "rss_delta_mb": s.rss_delta_mb}
    row |= {"vs": None, "ratio": None, "ratio_min": None, "ratio_max": None, "target": None, "met": None}
    if base is not None:
        med, lo, hi = paired_ratio(s.times, base.times)
        row |= {"vs": base_name, **target(med, "<=", goal), "ratio_min": lo, "ratio_max": hi}
    return row


def _notes(mb: Any, diag: Samples) -> list[str]:
    recs = [v for v in diag.values if isinstance(v, dict)]
    diag_ms = statistics.median(1e3 * r["perf/diag_s"] for r in recs) if recs else math.nan
    adam = [r.get("diag/adam/curv", math.nan) for r in recs]
    tokens = int(mb.response_mask.sum())
    notes = [f"minibatch: {mb.size} rows × {mb.input_ids.shape[1]} columns, {tokens} response tokens; "
             f"ratio = median over rounds of (contender / baseline) timed back to back",
             f"instrumented step: median {diag_ms:.0f} ms of it in the diagnostics (perf/diag_s)"]
    if not all(math.isfinite(x) for x in adam):
        notes.append("WARNING: the Adam-geometry decomposition did not run on every timed instrumented step")
    return notes


# ------------------------------------------------------------------ profiles of missed targets

FISHER_PHASES = {
    "u = ∇M (torch.autograd.grad on the live graph)": "torch.autograd:grad",
    "fisher_coefficient": "occ_theory.train.rl:RLTrainer.fisher_coefficient",
    "of it the two forwards of the finite difference": "occ_theory.train.rl:forward_logprobs",
    "optimizer snapshot": "occ_theory.train.rl:OptimizerSnapshot.capture",
}
DIAG_PHASES = {
    "recorder.record (g, u on the live graph)": "occ_theory.diagnostics.recorder:GradientRecorder.record",
    "run_probe": "occ_theory.train.rl:run_probe",
    "of it u = grad(M) again, functionally": "occ_theory.diagnostics.probe:grad",
    "decompose (both geometries)": "occ_theory.diagnostics.probe:decompose_geometries",
    "of it grad_and_hvps (one graph, two HVPs)": "occ_theory.theory.decompose:grad_and_hvps",
    "of it the JVPs for Q_F": "occ_theory.theory.decompose:jvp",
    "curve": "occ_theory.diagnostics.probe:measure_curve",
    "recorder.check + breakdown": "occ_theory.diagnostics.recorder:GradientRecorder.breakdown",
}


def _forward_ms(tr: Any, mb: Any, calls: int) -> float:
    """A no-grad forward of the minibatch (log-probs, no MTP): the unit the extra work is counted in."""
    import time

    import torch

    from ..rl.batch import forward_logprobs

    times = []
    with torch.no_grad():
        for _ in range(calls + 1):
            t0 = time.perf_counter()
            forward_logprobs(tr.model, mb, tr.rc.temperature, "full", False)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[1:])


def _explain_fisher(tr: Any, mb: Any, row: dict[str, Any], detach: Samples, calls: int) -> str:
    phases = phase_times(lambda: tr.train_step(mb, first_after_rollout=False), FISHER_PHASES, calls)
    fwd = _forward_ms(tr, mb, calls)
    return (f"occ/fisher misses ({row['ratio']:.2f}× detach's {1e3 * detach.median_s:.0f} ms). Profile per step: "
            f"{describe_phases(phases)}; one no-grad forward of the minibatch: {fwd:.0f} ms. The fisher proxy "
            "needs, before λ is known, u = ∇M on the shared parameters (a second backward through the trunk) and "
            "δ = ∇l·Pu (a central finite difference: two forwards); detach's step has neither, so ≤ 1.03 cannot "
            "hold for this proxy by construction. The paper's OCC proxy is `reference`.")


def _explain_ops(name: str, fn: Any, base: Any, row: dict[str, Any], calls: int) -> str:
    ours, theirs = top_ops(fn, calls), top_ops(base, calls)
    return (f"{name} misses ({row['ratio']:.3f}×, rounds ranged {row['ratio_min']:.3f}–{row['ratio_max']:.3f}). "
            f"Top ops per step: {name}: {describe_ops(ours)}; detach: {describe_ops(theirs)}. The extra work of "
            "occ over detach is the MTP gradient reaching the trunk (head weight, embeddings, trunk state) and the "
            "log-prob proxies; a miss within the rounds' range is the machine's noise.")


def _explain_diagnostics(fn: Any, row: dict[str, Any], plain: Samples, calls: int) -> str:
    phases = phase_times(fn, DIAG_PHASES, calls)
    return (f"policy+diagnostics misses ({row['ratio']:.1f}× the plain step's {1e3 * plain.median_s:.0f} ms). "
            f"Profile per step (inclusive; 'of it' phases are inside the one above): {describe_phases(phases)}. "
            "The floor: two HVPs of J (one per geometry; rev-rev costs ~3 gradients each even on a shared "
            "graph), one JVP per geometry for Q_F, the recorder's two backwards, and the curve's 9 forwards.")
