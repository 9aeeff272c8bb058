"""The RL objective J and the MTP objective M (docs/theory.md section 1), both to maximise.

Pure functions over (B, T) log-prob tensors and a response mask; positions where the mask is 0
are ignored even when they hold NaN (e.g. MTP positions with no prediction).

* ``clipped_surrogate``: DAPO token-mean clipped surrogate
  ``Σ m·min(ρ·A, clip(ρ, 1−ε_lo, 1+ε_hi)·A) / Σ m`` with ``ρ = exp(l − l_old)``.
* ``mtp_objective``: ``ce`` is ``Σ m·q / Σ m``; ``policy`` is the clipped surrogate with
  ``ρ_mtp = exp(q − l_old)`` (the ratio against the main head's rollout log-prob, as the public
  code does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _valid(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask > 0, x, torch.zeros_like(x))


def token_mean(x: Tensor, mask: Tensor, denom: float | None = None) -> Tensor:
    """Σ m·x / Σ m over valid tokens; 0 (with a gradient path) when the mask is empty.

    ``denom`` replaces Σ m by a given count: the global token count in data parallelism, where each
    process contributes Σ_local m·x / Σ_global m and the sum over processes is the global mean.
    """
    m = mask.to(x.dtype)
    total = m.sum().clamp_min(1.0) if denom is None else max(float(denom), 1.0)
    return (_valid(x, m) * m).sum() / total


@dataclass
class Surrogate:
    objective: Tensor  # 0-d, differentiable
    per_token: Tensor  # (B, T) min(ρ·A, clip(ρ)·A), zero at invalid positions
    clip_frac: float  # share of valid tokens whose clipped term is the active one
    ratio_mean: float


def clipped_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, eps_lo: float = 0.2,
                      eps_hi: float = 0.28, denom: float | None = None) -> Surrogate:
    """DAPO token-mean clipped surrogate. ``advantages`` is (B,) or (B, T)."""
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    log_ratio = _valid(logp - old_logp, mask)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_lo, 1 + eps_hi) * adv
    m = mask.to(ratio.dtype)
    per_token = _valid(torch.minimum(unclipped, clipped), m)
    with torch.no_grad():
        n = m.sum().clamp_min(1.0)
        clip_frac = float(((clipped < unclipped).to(m.dtype) * m).sum() / n)
        ratio_mean = float((ratio * m).sum() / n)
    return Surrogate(token_mean(per_token, m, denom), per_token, clip_frac, ratio_mean)


def mtp_objective(kind: str, mtp_logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                  eps_lo: float = 0.2, eps_hi: float = 0.28, denom: float | None = None) -> Tensor:
    """M for one MTP depth: ``kind`` is 'ce' (imitate every sampled token) or 'policy'."""
    if kind == "ce":
        return token_mean(mtp_logp, mask, denom)
    if kind == "policy":
        return clipped_surrogate(mtp_logp, old_logp, advantages, mask, eps_lo, eps_hi, denom).objective
    raise ValueError(f"unknown MTP objective {kind!r}; choose 'ce' or 'policy'")


def entropy_from_logits(logits: Tensor, mask: Tensor) -> float:
    """Token-mean entropy of the main head over valid positions; ``logits[:, t]`` scores token t+1."""
    with torch.no_grad():
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        ent = -(logp.exp() * logp).sum(-1)  # (B, T-1)
        return float(token_mean(ent, mask[:, 1:]))


def k3_terms(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(π‖π_ref): exp(r) − r − 1 with r = ref − logp (0 at invalid positions)."""
    r = _valid(ref_logp - logp, mask)
    return _valid(torch.exp(r) - r - 1, mask)

