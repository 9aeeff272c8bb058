"""A rollout (mini)batch and the objectives computed from it, the same code online and offline.

``compute_objectives`` is the single forward pass the trainer differentiates, and also what the
diagnostics differentiate as a function of the shared parameters (``params`` substituted with
``torch.func.functional_call``), so the J and M the theory measures are the ones the optimizer
sees.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from ..names import REGIME_TABLE
from .objectives import Surrogate, clipped_surrogate, k3_terms, mtp_objective, token_mean


@dataclass
class RLBatch:
    """Left-padded prompt + response rows. All tensors share the leading dimension B."""

    input_ids: Tensor  # (B, L) long
    attention_mask: Tensor  # (B, L) long, 1 on prompt and response tokens
    response_mask: Tensor  # (B, L) float, 1 on generated tokens (EOS included)
    advantages: Tensor  # (B,) float
    old_logp: Tensor  # (B, L) float32, the sampling policy's log-probs (0 outside responses)
    ref_logp: Tensor | None = None  # (B, L) reference-policy log-probs when a KL penalty is on

    def __post_init__(self) -> None:
        b, L = self.input_ids.shape
        for f in ("attention_mask", "response_mask", "old_logp", "ref_logp"):
            t = getattr(self, f)
            if t is not None and t.shape != (b, L):
                raise ValueError(f"RLBatch.{f} has shape {tuple(t.shape)}, input_ids has {(b, L)}")
        if self.advantages.shape != (b,):
            raise ValueError(f"RLBatch.advantages has shape {tuple(self.advantages.shape)}, expected {(b,)}")

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def prompt_len(self) -> int:
        """The first column holding a response token (the response block starts there)."""
        cols = torch.nonzero(self.response_mask.sum(0) > 0)
        return int(cols[0]) if cols.numel() else self.response_mask.shape[1]

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_tensors(cls, d: dict[str, Tensor]) -> RLBatch:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown RLBatch tensors {sorted(unknown)}")
        return cls(**d)

    def select(self, idx: Tensor | slice) -> RLBatch:
        return RLBatch(**{k: v[idx] for k, v in self.tensors().items()})

    def to(self, device: torch.device | str) -> RLBatch:
        return RLBatch(**{k: v.to(device) for k, v in self.tensors().items()})

    def split(self, n: int, generator: torch.Generator | None = None) -> list[RLBatch]:
        """``n`` equal minibatches (rows shuffled with ``generator`` when given)."""
        if self.size % n:
            raise ValueError(f"cannot split {self.size} rows into {n} equal minibatches")
        order = torch.randperm(self.size, generator=generator) if generator is not None else torch.arange(self.size)
        return [self.select(order[i::n].sort().values) for i in range(n)]


@dataclass(frozen=True)
class ObjectiveSpec:
    """Which J and M a regime trains, and how the MTP path is cut (docs/theory.md section 1)."""

    mtp_kind: str | None  # 'ce' | 'policy' | None (no MTP loss: regime off)
    grad_cut: str = "full"  # how the MTP path is cut from θ_S: 'full' | 'detach' | 'detach_encoder'
    eps_lo: float = 0.2
    eps_hi: float = 0.28
    temperature: float = 1.0
    kl_coef: float = 0.0

    @classmethod
    def for_regime(cls, regime: str, eps_lo: float = 0.2, eps_hi: float = 0.28, temperature: float = 1.0,
                   kl_coef: float = 0.0, detach_mtp_loss: str = "ce") -> ObjectiveSpec:
        spec = REGIME_TABLE[regime]  # the regime table (occ_theory/names.py)
        kind = detach_mtp_loss if spec.mtp_loss == "config" else spec.mtp_loss
        cut = spec.grad_cut
        return cls(kind, cut, eps_lo, eps_hi, temperature, kl_coef)


@dataclass
class Objectives:
    rl_objective: Tensor  # J [rl_objective]: the clipped surrogate − kl_coef·KL (the penalty is part of J), 0-d
    mtp: Tensor | None  # M averaged over depths, 0-d (None without MTP)
    mtp_depths: list[Tensor]  # M_k per depth
    logp: Tensor  # (B, L) main log-probs (NaN at t = 0)
    mtp_logp: list[Tensor]  # per depth (B, L)
    logits: Tensor | None  # (B, L, V) main logits
    surrogate: Surrogate
    kl: Tensor | None
    seq_rl: Tensor  # (B,) each sequence's summed surrogate terms (J's numerator, for the bootstrap)


def forward_logprobs(model: nn.Module, batch: RLBatch, temperature: float, grad_cut: str, with_mtp: bool,
                     params: dict[str, Tensor] | None = None) -> tuple[Tensor, list[Tensor], Tensor]:
    """``(logp, [mtp_logp per depth], logits)``, aligned as in ``occ_theory.models.aligned_logprobs``."""
    from ..models import align_logprobs

    args = (batch.input_ids,)
    kwargs = {"attention_mask": batch.attention_mask, "grad_cut": grad_cut, "with_mtp": with_mtp}
    if params is None:
        logits, mtp_logits = model(*args, **kwargs)
    else:
        logits, mtp_logits = torch.func.functional_call(model, params, args, kwargs)
    logp, mtp = align_logprobs(logits, mtp_logits, batch.input_ids, temperature)
    return logp, mtp, logits


def mtp_mask(mask: Tensor, depth: int, attention_mask: Tensor) -> Tensor:
    """Response positions that have a depth-``depth`` MTP prediction from real tokens: position t uses the
    trunk state at t − depth − 1, so it needs t ≥ first + depth + 1 with ``first`` the row's first real
    (non-padding) column. Rows are left-padded, so the bound is per row, not an absolute column."""
    cols = torch.arange(mask.shape[1], device=mask.device)
    first = attention_mask.long().argmax(1)  # (B,) the first column with attention_mask = 1
    return mask * (cols[None, :] >= first[:, None] + depth + 1).to(mask.dtype)


@dataclass(frozen=True)
class Norms:
    """Token counts that normalise J (``rl``) and each depth's M (``mtp``): the global counts in data
    parallelism (each process then holds a term of the global token mean), the local ones otherwise."""

    rl: float
    mtp: tuple[float, ...]

    @classmethod
    def of(cls, batch: RLBatch, depths: int, reduce=None) -> Norms:
        counts = {"rl": batch.response_mask.sum().double()}
        counts |= {f"mtp{k}": mtp_mask(batch.response_mask, k, batch.attention_mask).sum().double() for k in range(1, depths + 1)}
        if reduce is not None:
            counts = reduce(counts)
        return cls(float(counts["rl"]), tuple(float(counts[f"mtp{k}"]) for k in range(1, depths + 1)))


def compute_objectives(model: nn.Module, batch: RLBatch, spec: ObjectiveSpec,
                       params: dict[str, Tensor] | None = None, with_mtp: bool = True,
                       norms: Norms | None = None) -> Objectives:
    """J and M of ``batch`` at the model's parameters (or at ``params`` for the shared ones).

    ``norms`` gives the token counts J and M are normalised by (default: this batch's own).
    """
    use_mtp = with_mtp and spec.mtp_kind is not None
    logp, mtp_logp, logits = forward_logprobs(model, batch, spec.temperature, spec.grad_cut, use_mtp, params)
    mask = batch.response_mask
    rl_denom = None if norms is None else norms.rl
    surr = clipped_surrogate(logp, batch.old_logp, batch.advantages, mask, spec.eps_lo, spec.eps_hi, rl_denom)
    rl = surr.objective
    kl = None
    per_token = surr.per_token.detach()
    if spec.kl_coef > 0:
        if batch.ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp in the batch")
        kl_tok = k3_terms(logp, batch.ref_logp, mask)
        kl = token_mean(kl_tok, mask, rl_denom)
        rl = rl - spec.kl_coef * kl
        per_token = per_token - spec.kl_coef * kl_tok.detach()
    seq_rl = (per_token * mask).sum(1)  # each sequence's share of J's numerator (J = Σ seq_rl / Σ m)
    depths = [mtp_objective(spec.mtp_kind, q, batch.old_logp, batch.advantages, mtp_mask(mask, k, batch.attention_mask), spec.eps_lo,
                            spec.eps_hi, None if norms is None else norms.mtp[k - 1])
              for k, q in enumerate(mtp_logp, start=1)] if use_mtp else []
    mtp = torch.stack(depths).mean() if depths else None
    return Objectives(rl, mtp, depths, logp, mtp_logp, logits, surr, kl, seq_rl)

