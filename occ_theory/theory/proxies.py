"""Online estimates of the optimal MTP coefficient (docs/theory.md section 4), from log-probabilities.

Every proxy takes (B, T) tensors and returns the coefficient that multiplies the MTP objective,
as a float. None needs an extra backward pass. Each is the ratio of two sums, exposed by a
``*_terms`` function returning ``(num, den)`` as float64 tensors, so a multi-process run can
all-reduce the sums and get exactly the single-process value of the global batch
(``from_terms``).

Degenerate input (an empty mask, a zero denominator) gives 0.0: the detach-equivalent
coefficient, never NaN.

* ``reference``: the public implementation, reproduced exactly: per MTP depth,
  ``λ = c·mean_all[(q − l_old)·(l − l_old) / ((q − l_old)² + 1e-8)]``, ``c = base_coef / num_depths``,
  the mean over every position of the response block, padding included (no mask). It needs
  finite values everywhere: fill padding with finite numbers (zeros give a zero ratio there).
* ``least_squares``: ``λ = c·Σ m·(q − l_old)·(l − l_old) / (Σ m·(q − l_old)² + ε)``.
* ``fisher``: ``λ = Σ m·A·δ / (η·Σ m·δ²)`` with ``δ = ∇l·Pu`` the change of the main log-probs along
  the MTP step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

REFERENCE_EPS = 1e-8
PROXIES = ("reference", "least_squares", "fisher")


def _f64(name: str, t: Tensor, shape: torch.Size | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape (B, T), got {tuple(t.shape)}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t.detach().to(torch.float64)


def _coef(base_coef: float, num_depths: int) -> float:
    if num_depths < 1:
        raise ValueError(f"num_depths must be >= 1, got {num_depths}")
    if not math.isfinite(base_coef):
        raise ValueError(f"base_coef must be finite, got {base_coef}")
    return float(base_coef) / num_depths


def _masked(t: Tensor, m: Tensor) -> Tensor:
    """Zero where the mask is zero, so NaN/inf at padding never reaches a sum."""
    return torch.where(m > 0, t, torch.zeros_like(t))


def from_terms(num: Tensor | float, den: Tensor | float, scale: float = 1.0, eps: float = 0.0) -> float:
    """``scale · num / (den + eps)``, or 0.0 when the denominator vanishes."""
    den = float(den) + eps
    return 0.0 if den == 0.0 else scale * float(num) / den


def reference_terms(logp: Tensor, old_logp: Tensor, mtp_logp: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_all per-token ratio, number of positions)."""
    lp = _f64("logp", logp)
    old = _f64("old_logp", old_logp, lp.shape)
    q = _f64("mtp_logp", mtp_logp, lp.shape)
    if not (torch.isfinite(lp).all() and torch.isfinite(old).all() and torch.isfinite(q).all()):
        raise ValueError("reference proxy averages over every position: logp, old_logp and mtp_logp must be "
                         "finite everywhere (fill padding with finite values)")
    dq = q - old
    ratio = dq * (lp - old) / (dq * dq + REFERENCE_EPS)
    return ratio.sum(), torch.tensor(float(ratio.numel()), dtype=torch.float64)


def reference(logp: Tensor, old_logp: Tensor, mtp_logp: Tensor, base_coef: float, num_depths: int = 1) -> float:
    """The public implementation's coefficient for one MTP depth (unmasked mean of ratios)."""
    return from_terms(*reference_terms(logp, old_logp, mtp_logp), scale=_coef(base_coef, num_depths))


def least_squares_terms(logp: Tensor, old_logp: Tensor, mtp_logp: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ m·(q − l_old)·(l − l_old), Σ m·(q − l_old)²) over valid tokens."""
    lp = _f64("logp", logp)
    old = _f64("old_logp", old_logp, lp.shape)
    m = _f64("mask", mask, lp.shape)
    dq = _masked(_f64("mtp_logp", mtp_logp, lp.shape) - old, m)
    dl = _masked(lp - old, m)
    return (m * dq * dl).sum(), (m * dq * dq).sum()


def least_squares(logp: Tensor, old_logp: Tensor, mtp_logp: Tensor, mask: Tensor, base_coef: float,
                  num_depths: int = 1, eps: float = REFERENCE_EPS) -> float:
    """Masked ratio of sums: ``c·Σ m·(q − l_old)·(l − l_old) / (Σ m·(q − l_old)² + ε)``."""
    return from_terms(*least_squares_terms(logp, old_logp, mtp_logp, mask), scale=_coef(base_coef, num_depths),
                      eps=eps)


def fisher_terms(advantages: Tensor, dlogp: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ m·A·δ, Σ m·δ²); ``advantages`` is (B,) or (B, T)."""
    d = _f64("dlogp", dlogp)
    m = _f64("mask", mask, d.shape)
    a = advantages.detach().to(torch.float64)
    if a.dim() == 1:
        a = a[:, None]
    if a.shape not in (d.shape, (d.shape[0], 1)):
        raise ValueError(f"advantages must have shape (B,) or (B, T) with B={d.shape[0]}, got {tuple(advantages.shape)}")
    d = _masked(d, m)
    return (m * _masked(a.expand_as(d), m) * d).sum(), (m * d * d).sum()


def fisher(advantages: Tensor, dlogp: Tensor, mask: Tensor, lr: float) -> float:
    """Trust-region coefficient ``Σ m·A·δ / (η·Σ m·δ²)``."""
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be finite and positive, got {lr}")
    return from_terms(*fisher_terms(advantages, dlogp, mask), scale=1.0 / lr)
