"""Data parallelism with ``torch.distributed`` (gloo on CPU, NCCL on CUDA), launched by ``torchrun``.

Each process samples its share of the rollout prompts and normalises J and M by the *global*
token counts, so its loss is one term of the global objective. Gradients are then summed over
processes (``all_reduce``), which gives every process the gradient of the global batch: the
same number one process would get on the concatenated batch. Every decomposition quantity and
every OCC coefficient is built from such sums. Only rank 0 writes files.

Gradients are summed explicitly rather than through ``DistributedDataParallel``: the recorder and
the curvature computations differentiate the unwrapped module functionally, and need sums of
per-process terms, not DDP's mean.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


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


def init_from_env(device: torch.device) -> Dist:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Dist(dist.get_rank(), dist.get_world_size(), str(device))
