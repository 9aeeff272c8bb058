"""``StepDiagnostics``: everything the trainer measures beyond the step itself, in one object.

It owns the schedule, the probe settings, the gradient recorder, the optimizer snapshot, the
held-out batch and the probe bundles (Cockpit's pattern: a measurement that spans an update caches
what it needs and runs at one point of the step). The trainer calls it twice per step:

* ``mtp_grad`` before the backward pass, when something needs u = ∇M on θ_S from the live graph
  (the momentum buffers of ``adam_stationary``, or a coefficient rule such as ``fisher``);
* ``measure`` after the backward pass (gradients summed over processes) and before the clip and
  the optimizer step: the model and the optimizer state are still those before the step. On a
  scheduled step it runs the probe, checks identity 3 against the received gradient and saves the
  probe bundle. With ``diag.defer_degenerate`` a scheduled step whose minibatch has no nonzero
  advantage is put off to the next step whose minibatch has one (``diag/deferred_from`` says which).

How the processes hold the model is the strategy's business (``train/dist.py``): the probe, identity 3 and the
bundle read a full view of the model, its θ_S and the optimizer's state (the live objects under ddp, a gathered
plain copy under fsdp) and the received gradient in full. With ``diag.bundle_only`` a scheduled step writes the
bundle (gathered on rank 0 alone) and skips the online probe.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..rl.batch import ObjectiveSpec, RLBatch
from ..rl.coef import Coefficient, SharedUpdate
from .bundle import save_bundle
from .probe import OptimizerSnapshot, ProbeSettings, run_probe
from .recorder import GradientRecorder
from .schedule import Schedule


class StepDiagnostics:
    def __init__(self, model: nn.Module, shared: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, diag: Any,
                 *, total_steps: int, seed: int, grad_clip: float, bundle_dir: Path | None, enabled: bool, dist: Any,
                 heldout: Callable[[int], RLBatch] | None = None, clip_scope: str = "global", strategy: Any = None):
        """``shared``: the model's θ_S by name (the trainer's dict); ``strategy``: how the processes hold the model
        (``train/dist.py``; default: every process the whole model)."""
        from ..train.dist import Replicated

        self.model, self.shared, self.optimizer, self.dist = model, shared, optimizer, dist
        self.strategy = strategy if strategy is not None else Replicated(dist)
        self.bundle_only = diag.probes and diag.bundle_only
        self.schedule = Schedule(total_steps, diag.every, diag.at, diag.log_spaced, diag.first) if enabled else None
        self.defer_degenerate = diag.defer_degenerate
        self.deferred: int | None = None  # the scheduled step a degenerate minibatch put off (defer_degenerate)
        self.settings = ProbeSettings.from_diag(diag, seed)
        self.seed, self.grad_clip, self.clip_scope = seed, grad_clip, clip_scope
        self.bundle_dir = bundle_dir if diag.probes else None
        self.heldout = heldout if diag.curve_heldout else None
        beta1 = optimizer.param_groups[0].get("betas", (0.9, 0.999))[0]
        self.recorder = GradientRecorder(model, beta1, track_momentum=enabled and diag.stationary
                                         and bool(self.schedule.steps))

    def due(self, step: int) -> bool:
        return self.schedule is not None and step in self.schedule

    @property
    def needs_mtp_grad(self) -> bool:
        return self.recorder.track_momentum

    def mtp_grad(self, mtp_objective: Tensor | None) -> dict[str, Tensor]:
        """u = ∇M on θ_S from the live graph, summed over processes (the strategy's way: ``Replicated.mtp_grad``,
        ``Sharded.mtp_grad``)."""
        return self.strategy.mtp_grad(mtp_objective, self.recorder)

    def received(self) -> dict[str, Tensor]:
        """The gradient the optimizer received on θ_S, in full (a collective under fsdp)."""
        return self.strategy.full_grads(dict(zip(self.recorder.names, self.recorder.params)))

    def measure(self, step: int, batch: RLBatch, spec: ObjectiveSpec, coef: Coefficient,
                u: dict[str, Tensor] | None, realised: SharedUpdate | None = None, *, first_after_rollout: bool,
                minibatch_index: int | None = None) -> dict[str, Any]:
        """The step's diagnostics record (empty on unscheduled steps). ``realised``: the update a rule put on θ_S
        in place of g + λu (``rl/coef.py: shared_update``), whose weights identity 3 and the probe then use."""
        weights = (1.0, coef.value) if realised is None else (realised.weight_g, realised.weight_u)
        if u is not None and self.recorder.track_momentum:
            self.recorder.observe(u, *weights, grads=self.received())
        if not self.due(step) and self.deferred is None:
            return {}
        dist = self.dist
        if self.defer_degenerate and spec.kl_coef == 0 and not self.has_signal(batch):
            self.deferred = self.deferred or step
            return {}
        deferred_from, self.deferred = self.deferred, None
        heldout = self.heldout(step) if self.heldout is not None else None
        settings = self.settings.replace(seed=self.seed * 1_000_003 + step)  # each probe its own bootstrap
        realised_weights = None if realised is None else weights
        where = {"first_after_rollout": first_after_rollout, "minibatch_index": minibatch_index}
        if deferred_from is not None:
            where["diag/deferred_from"] = deferred_from
        rec, online = {}, None
        # the probe and the bundle read the model, θ_S and the optimizer's state in full (a gathered copy under fsdp;
        # with bundle_only on rank 0 alone, in host memory)
        with self.strategy.full_view(self.model, self.optimizer, self.shared, main_only=self.bundle_only) as view:
            snap = None
            if view is not None:  # no copies: the optimizer steps after this returns, and momentum() is the
                # recorder's fresh bias-corrected copy
                snap = OptimizerSnapshot.capture(view.optimizer, view.shared, self.grad_clip, self.recorder.momentum(),
                                                 copy=False, clip_scope=self.clip_scope)
            if self.bundle_only:
                rec["diag/bundle_only"] = True
            else:
                probe = run_probe(view.model, batch, spec, coef, snap, settings, heldout, dist, realised_weights)
                rec |= {k: v for k, v in probe.record.items() if not isinstance(v, list)}
                rec |= {f"perf/probe/{name}_s": s for name, s in probe.cost.items()}
                if probe.g is not None:
                    rec |= self.recorder.check(probe.g, probe.u, *weights, grads=self.received())
                online = probe.record | where
            if self.bundle_dir is not None:  # the global minibatch: `occ probe` recomputes it in one process
                whole = RLBatch.from_tensors(dist.gather_cat(batch.tensors()))
                held = None if heldout is None else RLBatch.from_tensors(dist.gather_cat(heldout.tensors()))
                if dist.main:
                    save_bundle(self.bundle_dir / f"step_{step:06d}", step=step, model=view.model, batch=whole,
                                spec=spec, coef=coef, optim=snap, settings=settings, heldout=held,
                                realised=realised_weights, online=online, extra=where | {"world": dist.world})
        return rec | where

    def has_signal(self, batch: RLBatch) -> bool:
        """Whether any row of the (global) minibatch has a nonzero advantage."""
        nonzero = (batch.advantages != 0).sum().to(torch.float64)
        return float(self.dist.sum({"n": nonzero})["n"]) > 0

    def state_dict(self) -> dict[str, Any]:
        return {"recorder": self.recorder.state_dict(), "deferred": self.deferred}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.recorder.load_state_dict(sd["recorder"])
        self.deferred = sd.get("deferred")  # checkpoints before defer_degenerate have none
