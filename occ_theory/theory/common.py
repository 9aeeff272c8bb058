"""What the decomposition and the step forms share: the reduction over processes, argument checks, the Fisher
curvature of a log-prob change."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .params import check_alike

NAN = float("nan")
Reduce = Callable[[dict[str, Tensor]], dict[str, Tensor]]
"""Sums a dict of tensors over processes (``None``: one process). Data-parallel J and M are sums of
per-process terms (each normalised by the global token count), so their gradients, HVPs and values
are sums too."""


def check_lr(lr: float) -> float:
    lr = float(lr)
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite positive step size, got {lr}")
    return lr


def check_precond(params: Mapping[str, Tensor], precond: Mapping[str, Tensor] | None) -> None:
    """A preconditioner is a dict alike ``params`` of finite, non-negative diagonal entries."""
    if precond is None:
        return
    check_alike(params, precond, "precond")
    for k, p in precond.items():
        if not torch.all(torch.isfinite(p)) or torch.any(p < 0):
            raise ValueError(f"precond[{k!r}] must be finite and non-negative")


def fisher_curvature(dlogp: Tensor, mask: Tensor, reduce: Reduce | None = None) -> float:
    """Q_F = −Σ m·δ² / Σ m over valid positions; NaN when the mask is empty."""
    if dlogp.shape != mask.shape:
        raise ValueError(f"dlogp has shape {tuple(dlogp.shape)}, mask has {tuple(mask.shape)}")
    m = mask.to(torch.float64)
    d = torch.where(m > 0, dlogp.to(torch.float64), 0.0)
    sums = {"num": (m * d * d).sum(), "den": m.sum()}
    if reduce is not None:
        sums = reduce(sums)
    total = float(sums["den"])
    return NAN if total == 0.0 else -float(sums["num"]) / total
