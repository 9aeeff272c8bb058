"""Adam's diagonal preconditioner ``P = 1/(sqrt(v̂)+ε)`` (docs/theory.md section 2, geometry ``adam``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor


def adam_preconditioner(state: Mapping[str, Mapping[str, Any]], params: Mapping[str, Tensor], beta2: float,
                        eps: float) -> dict[str, Tensor] | None:
    """``P = 1/(sqrt(v̂)+ε)`` with ``v̂ = v/(1 − β2^t)`` from Adam state keyed like ``params``; None when a
    parameter has no state yet (before the first step)."""
    if any(name not in state or "exp_avg_sq" not in state[name] for name in params):
        return None
    out = {}
    for name, p in params.items():
        st = state[name]
        v_hat = st["exp_avg_sq"].to(p.dtype) / (1 - beta2 ** float(st["step"]))
        out[name] = 1.0 / (v_hat.sqrt() + eps)
    return out
