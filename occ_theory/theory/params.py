"""Arithmetic on parameter dicts (``dict[str, Tensor]``), the currency of ``occ_theory.theory``.

A parameter dict maps names to tensors; two dicts are *alike* when they have the same keys and
each pair of tensors the same shape. Every function here validates that and raises a
``ValueError`` naming the offending key, so a mismatched preconditioner or direction fails
loudly instead of broadcasting silently.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

Params = dict[str, Tensor]


def check_alike(a: Mapping[str, Tensor], b: Mapping[str, Tensor], what: str = "v") -> None:
    """Raise ``ValueError`` unless ``b`` has exactly the keys of ``a`` with the same shapes."""
    if not isinstance(b, Mapping):
        raise ValueError(f"{what} must be a dict of tensors, got {type(b).__name__}")
    missing = [k for k in a if k not in b]
    extra = [k for k in b if k not in a]
    if missing or extra:
        raise ValueError(f"{what} keys differ from params: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, t in a.items():
        if not isinstance(b[k], Tensor):
            raise ValueError(f"{what}[{k!r}] is {type(b[k]).__name__}, not a tensor")
        if b[k].shape != t.shape:
            raise ValueError(f"{what}[{k!r}] has shape {tuple(b[k].shape)}, params has {tuple(t.shape)}")


def check_params(params: Mapping[str, Tensor]) -> None:
    """Raise ``ValueError`` unless ``params`` is a non-empty dict of floating-point tensors."""
    if not isinstance(params, Mapping) or not params:
        raise ValueError("params must be a non-empty dict of tensors")
    for k, t in params.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"params[{k!r}] must be a floating-point tensor")


def detached(params: Mapping[str, Tensor]) -> Params:
    return {k: t.detach() for k, t in params.items()}


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """Σ_k ⟨a_k, b_k⟩ as a 0-d tensor, accumulated in float64 (C, X, Q are small differences)."""
    total = None
    for k, t in a.items():
        term = torch.sum(t * b[k], dtype=torch.float64 if t.dtype != torch.float64 else None)
        total = term if total is None else total + term
    return total


def sq_norm(a: Mapping[str, Tensor]) -> Tensor:
    return dot(a, a)


def axpy(alpha: float, x: Mapping[str, Tensor], y: Mapping[str, Tensor]) -> Params:
    """``y + alpha * x``, key by key."""
    return {k: y[k] + alpha * x[k] for k in y}


def mul(a: Mapping[str, Tensor], b: Mapping[str, Tensor] | None) -> Params:
    """Elementwise product; ``b=None`` is the identity (no preconditioner)."""
    if b is None:
        return dict(a)
    return {k: t * b[k] for k, t in a.items()}


def is_zero(a: Mapping[str, Tensor]) -> bool:
    return all(not torch.any(t != 0) for t in a.values())


def flatten(a: Mapping[str, Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in a.values()])


def unflatten(vec: Tensor, like: Mapping[str, Tensor]) -> Params:
    out, i = {}, 0
    for k, t in like.items():
        n = t.numel()
        out[k] = vec[i : i + n].view_as(t)
        i += n
    if i != vec.numel():
        raise ValueError(f"vector has {vec.numel()} entries, params have {i}")
    return out
