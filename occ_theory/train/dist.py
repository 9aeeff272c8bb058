"""Data parallelism with ``torch.distributed`` (gloo on CPU, NCCL on CUDA), launched by ``torchrun``.

Each process samples its share of the rollout prompts and normalises J and M by the *global*
token counts, so its loss is one term of the global objective. Gradients are then summed over
processes (``all_reduce``), which gives every process the gradient of the global batch: the
same number one process would get on the concatenated batch. Every decomposition quantity and
every OCC coefficient is built from such sums. Only rank 0 writes files.

How the processes hold the model is the strategy (``dist.strategy``): ``Replicated`` (ddp, and one
process) here, every process with the whole model; ``train/fsdp.py: Sharded`` (fsdp), the model
sharded with FSDP2. The trainers see one interface: wrap the model, reduce and clip the gradients,
read and write them in full, hand a plain full view of the model and the optimizer's state to the
computations that differentiate it functionally (``FullView``), and save and load the full state.

Gradients are summed explicitly rather than through ``DistributedDataParallel``: the recorder and
the curvature computations differentiate the unwrapped module functionally, and need sums of
per-process terms, not DDP's mean.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device_name: str = "cpu"

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_name)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def sum(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sum each tensor over processes (one flat all-reduce; the identity for one process)."""
        if not self.active or not tensors:
            return tensors
        keys = list(tensors)
        flat = torch.cat([tensors[k].detach().reshape(-1).to(self.device, torch.float64) for k in keys])
        dist.all_reduce(flat)
        out, i = {}, 0
        for k in keys:
            t = tensors[k]
            out[k] = flat[i: i + t.numel()].view(t.shape).to(t.device, t.dtype)
            i += t.numel()
        return out

    def sum_terms(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """Like ``sum``, but keys ending in ``max_abs`` take the maximum over processes."""
        if not self.active:
            return terms
        maxed = {k: v for k, v in terms.items() if k.endswith("max_abs")}
        out = self.sum({k: v for k, v in terms.items() if k not in maxed})
        for k, v in maxed.items():
            t = v.detach().to(torch.float64).reshape(1).to(self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            out[k] = t.reshape(v.shape).to(v.dtype)
        return out

    def gather_cat(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Concatenate each tensor along dim 0 over processes, in rank order."""
        if not self.active:
            return tensors
        parts = self.gather({k: v.detach().cpu() for k, v in tensors.items()})
        return {k: torch.cat([p[k] for p in parts]).to(tensors[k].device) for k in tensors}

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Replace every ``.grad`` by its sum over processes."""
        if not self.active:
            return
        named = {str(i): p.grad if p.grad is not None else torch.zeros_like(p) for i, p in enumerate(params)}
        summed = self.sum(named)
        for i, p in enumerate(params):
            p.grad = summed[str(i)]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def max(self, value: int) -> int:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


@dataclass
class FullView:
    """The model with its full parameters as a plain module, its θ_S by name and an optimizer holding the state of
    θ_S in full: what the probe and the coefficient rules differentiate (the live objects under ddp)."""

    model: nn.Module
    shared: dict[str, Tensor]
    optimizer: torch.optim.Optimizer


def _total_norm(params: Iterable[nn.Parameter]) -> Tensor:
    """The 2-norm of the gradients of ``params`` (as ``clip_grad_norm_`` computes it; 0 without any)."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g).double() for g in grads]))


class Replicated:
    """The ddp strategy (and one process): every process holds the whole model and optimizer state; gradients are
    summed with ``Dist.sum_grads``; the full views are the live objects. It defines the strategies' interface
    (``fsdp.Sharded`` is the other): a method that gathers under fsdp is a collective, every process calls it."""

    name = "ddp"

    def __init__(self, dist: Dist):
        self.dist = dist

    def wrap(self, model: nn.Module, *, template: bool = True) -> nn.Module:
        """The model as the processes hold it (before anything takes its parameters)."""
        return model

    def reduce_grads(self, params: Iterable[nn.Parameter]) -> None:
        """After the backward pass: every ``.grad`` becomes (its share of) the sum over processes."""
        self.dist.sum_grads(list(params))

    def full_grads(self, named: dict[str, nn.Parameter]) -> dict[str, Tensor]:
        """Each parameter's gradient in full, by name (zeros where it has none)."""
        return {k: p.grad.detach() if p.grad is not None else torch.zeros_like(p) for k, p in named.items()}

    def set_grads(self, named: dict[str, nn.Parameter], grads: dict[str, Tensor]) -> None:
        """Replace each parameter's gradient by the full tensor given."""
        for k, p in named.items():
            p.grad = grads[k].to(p.dtype)

    def grad_norm(self, params: Iterable[nn.Parameter]) -> Tensor:
        """The global 2-norm of the gradients."""
        return _total_norm(params)

    def clip(self, params: list[nn.Parameter], max_norm: float) -> Tensor:
        """``clip_grad_norm_``: the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def all_finite(self, params: Iterable[nn.Parameter]) -> bool:
        """Whether every parameter is finite (every process gets the same answer)."""
        from .guard import params_finite

        return params_finite(params)

    def mtp_grad(self, objective: Tensor | None, recorder: Any) -> dict[str, Tensor]:
        """u = ∇M on θ_S from the live graph (``GradientRecorder.mtp_grad``), summed over processes."""
        return recorder.mtp_grad(objective, self.dist.sum if self.dist.active else None)

    @contextlib.contextmanager
    def full_model(self, model: nn.Module, *, main_only: bool = False) -> Iterator[nn.Module | None]:
        """A plain module with the full parameters (``main_only``: on rank 0, the others get None)."""
        yield model if self.dist.main or not main_only else None

    @contextlib.contextmanager
    def full_view(self, model: nn.Module, optimizer: torch.optim.Optimizer, shared: dict[str, nn.Parameter], *,
                  main_only: bool = False) -> Iterator[FullView | None]:
        """The model, θ_S (``shared``: the trainer's dict) and the optimizer's state on it in full (``FullView``)."""
        yield FullView(model, shared, optimizer) if self.dist.main or not main_only else None

    def model_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The full ``state_dict`` (the checkpoint's; under fsdp on rank 0 alone)."""
        return model.state_dict()

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's full ``state_dict`` (the checkpoint's; under fsdp on rank 0 alone)."""
        return optimizer.state_dict()

    def load_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict[str, Tensor],
                   optim_sd: dict[str, Any]) -> None:
        """Load the full states ``model_state`` and ``optimizer_state`` gave."""
        model.load_state_dict(model_sd)
        optimizer.load_state_dict(optim_sd)


def make_strategy(name: str, dist: Dist) -> Any:
    """The strategy ``dist.strategy`` names: ``Replicated`` for ddp, and for one process without a process group
    (nothing to shard); ``fsdp.Sharded`` for fsdp under torchrun."""
    if name == "fsdp" and torch.distributed.is_initialized():
        from .fsdp import Sharded

        return Sharded(dist)
    return Replicated(dist)


def init_from_env(device: torch.device, strategy: str = "ddp") -> Dist:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1; with ``strategy`` fsdp also a group of one,
    so that FSDP2 runs as it would on more), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (strategy == "fsdp" and "WORLD_SIZE" in os.environ):
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Dist(dist.get_rank(), dist.get_world_size(), str(device))


def leave() -> None:
    """Leave the process group at the end of a run (after a barrier: without it gloo's teardown can abort a
    process)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
