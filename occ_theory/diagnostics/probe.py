"""One probe: every decomposition quantity at one optimizer step, online or from a saved bundle.

``run_probe`` takes the model *before* the step, the minibatch of the step, the coefficient the run applied and
the optimizer's state (``OptimizerSnapshot``), builds one ``ProbeContext`` (``context.py``: the data, the
reductions over processes, g and u, computed once) and runs each quantity of ``quantities.QUANTITIES`` the
settings want (docs/theory.md sections 2, 4, 5): the log-prob proxies; the four affine geometries' step forms
with C, X, Q of the fixed-P ones; the per-module split of g and u; ``adam_real``, the real, clipped step's own
second-order model; the fisher proxy; the measured model curve; the real step's curve, its real optimum and the
split of its curvature; a rule's realised update; the Taylor residual. Each quantity's seconds are its line in the
cost profile (``Probe.cost``; the trainer logs them as ``perf/probe/<name>_s``).

The online trainer and ``occ probe`` both call ``run_probe`` on the same inputs, so their numbers agree; a bundle
(``diagnostics/bundle.py``) holds those inputs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from ..rl.batch import ObjectiveSpec, RLBatch
from ..rl.coef import Coefficient
from ..theory.precond import adam_preconditioner
from .context import ProbeContext, Reductions, summed_grad
from .context import row_chunks as _row_chunks
from .quantities import (
    GEOMETRIES,
    PAPER_KEYS,
    QUANTITIES,
    STEP_KEYS,
    geometry_directions,
    geometry_names,
    quantity_names,
)
from .settings import ProbeSettings

__all__ = ["GEOMETRIES", "PAPER_KEYS", "STEP_KEYS", "OptimizerSnapshot", "Probe", "ProbeSettings",
           "geometry_directions", "geometry_names", "row_chunks", "run_probe", "shared_params", "summed_grad"]

NAN = float("nan")


@dataclass
class OptimizerSnapshot:
    """What the diagnostics need of an Adam/AdamW optimizer, keyed by shared-parameter name, and the
    recorder's bias-corrected momentum buffers of g and u (``adam_stationary``; None when not tracked)."""

    kind: str  # "adamw" | "adam" | "sgd"
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    state: dict[str, dict[str, Tensor]]  # name -> {"step", "exp_avg", "exp_avg_sq"}
    grad_clip: float = 0.0
    momentum: dict[str, dict[str, Tensor]] | None = None  # {"m_g": {name: m̂_g}, "m_u": {name: m̂_u}}
    clip_scope: str = "global"  # what the clip's norm spans (theory.step.CLIP_SCOPES); bundles before it: global

    @classmethod
    def capture(cls, optimizer: torch.optim.Optimizer, named: dict[str, nn.Parameter], grad_clip: float = 0.0,
                momentum: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None,
                copy: bool = True, clip_scope: str = "global") -> OptimizerSnapshot:
        """The optimizer's state now. ``copy=False`` holds the optimizer's own state tensors and the given
        momentum buffers instead of copies (four θ_S-sized tensors fewer): only for a snapshot that is done
        with before the optimizer next steps (the trainer's probe and bundle)."""
        group = optimizer.param_groups[0]
        kind = {"AdamW": "adamw", "Adam": "adam"}.get(type(optimizer).__name__, "sgd")
        keep = (lambda v: v.detach().clone()) if copy else (lambda v: v.detach())
        state = {}
        for name, p in named.items():
            st = optimizer.state.get(p, {})
            if "exp_avg_sq" in st:
                state[name] = {k: (keep(v) if isinstance(v, Tensor) else torch.tensor(v)) for k, v in st.items()}
        mom = None if momentum is None else {"m_g": {k: keep(v) for k, v in momentum[0].items()},
                                             "m_u": {k: keep(v) for k, v in momentum[1].items()}}
        return cls(kind, float(group["lr"]), tuple(group.get("betas", (0.9, 0.999))), float(group.get("eps", 1e-8)),
                   float(group.get("weight_decay", 0.0)), state, grad_clip, mom, clip_scope)

    def preconditioner(self, params: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """Adam's diagonal ``1/(sqrt(v̂)+ε)`` per shared parameter; None when any state is missing."""
        if self.kind == "sgd":
            return None
        return adam_preconditioner(self.state, params, self.betas[1], self.eps)

    def to_dict(self) -> dict[str, Any]:  # shallow: asdict would deep-copy every state tensor
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OptimizerSnapshot:
        d = dict(d)
        d["betas"] = tuple(d["betas"])
        return cls(**d)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def shared_params(model: nn.Module) -> dict[str, Tensor]:
    names = set(model.shared_param_names())
    return {k: p.detach() for k, p in model.named_parameters() if k in names}


@dataclass
class Probe:
    """One probe's flat ``record`` (scalars, and lists for curves) and the directions it measured
    on θ_S: ``g = ∇J`` and ``u = ∇M`` (None when the regime has no MTP loss)."""

    record: dict[str, Any]
    g: dict[str, Tensor] | None = None
    u: dict[str, Tensor] | None = None
    cost: dict[str, float] = field(default_factory=dict)
    """Seconds per quantity and per shared intermediate (``ProbeContext.cost``): the probe's cost profile."""


def run_probe(model: nn.Module, batch: RLBatch, spec: ObjectiveSpec, coef: Coefficient, optim: OptimizerSnapshot,
              settings: ProbeSettings, heldout: RLBatch | None = None, dist: Any = None,
              realised: tuple[float, float] | None = None, quantities: tuple[str, ...] | None = None) -> Probe:
    """Every diagnostic of one step: each quantity of ``QUANTITIES`` the settings want, in order, on one
    ``ProbeContext`` (``quantities``: only those named, and what they read). Leaves ``model`` unchanged.

    ``coef`` is the coefficient the run applied (``rl/coef.py``): its value is the λ used, its
    ``mtp_coef`` scales the log-prob proxies. ``dist`` (an ``occ_theory.train.dist.Dist``) makes
    every quantity the one of the global batch when ``batch`` is this process's shard: every
    process must call it at the same step. ``realised = (a, b)``: a rule replaced the update on θ_S by
    a·g + b·u (``rl/coef.py: shared_update``); the real step of that update is set against detach's
    (``diag/realised/…``). ``Probe.cost`` holds each quantity's seconds (the trainer logs ``perf/probe/<name>_s``)."""
    unknown = set(quantities or ()) - set(quantity_names())
    if unknown:
        raise ValueError(f"unknown probe quantities {sorted(unknown)}; choose from {list(quantity_names())}")
    dtype = _dtype(settings.dtype)
    work = model if next(model.parameters()).dtype == dtype else copy.deepcopy(model).to(dtype)
    was_training = work.training
    work.eval()
    try:
        ctx = ProbeContext(work, batch, spec, coef, optim, settings, dtype, Reductions.of(dist), heldout, realised)
        out: dict[str, Any] = {"diag/lr": optim.lr, "diag/dtype": settings.dtype,
                               "diag/hvp_method": settings.hvp_method}
        for q in QUANTITIES:
            if quantities is not None and q.name not in quantities:
                continue
            if q.needs_mtp and spec.mtp_kind is None:
                out["diag/skipped"] = "regime has no MTP loss"
                continue
            if q.wanted(ctx):
                with ctx.timed(q.name):
                    out |= q.compute(ctx)
        d = ctx.cache.get("directions")
        return Probe(out, None if d is None else d.g, None if d is None else d.u, dict(ctx.cost))
    finally:
        work.train(was_training)


def row_chunks(batch: RLBatch, rows: int) -> list[RLBatch]:  # kept here for callers of the old module
    return _row_chunks(batch, rows)
