"""Aligned log-probabilities of the main head [logp] and of the MTP modules [mtp_logp] (docs/theory.md §1).

Convention: entry ``t`` of every (B, T) tensor scores token ``t`` of ``input_ids``.

* main: ``logp[:, t] = log π(y_t | y_<t)`` from the main head's logits at position ``t-1``;
* MTP depth k: ``mtp_logp[:, t]`` from the depth-k module at position ``t-k-1``, i.e. from the
  trunk state at ``t-k-1`` and the embeddings of tokens ``t-k .. t-1``; it never sees token ``t``
  or anything later. Depth 1: trunk state at ``t-2``, embedding of token ``t-1``.

Positions with no prediction are NaN: ``t = 0`` for the main head, ``t < k+1`` for depth k. NaN
survives multiplication by a zero mask (``0·NaN = NaN``), so reduce with
``torch.where(mask.bool(), logp, 0)``, never ``mask * logp``; the NaN entries are constants, so no
gradient flows through them. Positions whose token (or whose inputs) are padding hold finite
values that mean nothing; mask them too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .mtp import check_grad_cut

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / temperature)[..., index]`` without materialising the log-softmax.

    ``logits`` (..., V), ``index`` (...) long; returns (...) in ``logits.dtype`` promoted to at
    least float32. Computed as ``gather(x, index) - logsumexp(x)``; half-precision logits are
    upcast one row of the leading dimension at a time, so at most one (T, V) float32 copy exists.
    """
    if logits.shape[:-1] != index.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and index {tuple(index.shape)} do not align")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    if logits.dtype in _LOW_PRECISION and logits.dim() > 1:
        return torch.stack([_gather_minus_lse(row.to(out_dtype), idx, temperature) for row, idx in zip(logits, index)])
    return _gather_minus_lse(logits.to(out_dtype), index, temperature)


def _gather_minus_lse(x: Tensor, index: Tensor, temperature: float) -> Tensor:
    if temperature != 1.0:
        x = x / temperature
    picked = x.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(x, dim=-1)


def _nan_pad(scores: Tensor, shift: int, seq: int) -> Tensor:
    """Place ``scores`` (B, T-shift) at columns ``shift .. T-1`` of a NaN-filled (B, T)."""
    pad = scores.new_full((scores.shape[0], min(shift, seq)), float("nan"))
    return torch.cat([pad, scores], dim=1)


def align_logprobs(
    logits: Tensor, mtp_logits: Sequence[Tensor], input_ids: Tensor, temperature: float = 1.0
) -> tuple[Tensor, list[Tensor]]:
    """``(logp, [mtp_logp per depth])`` from the outputs of ``OCCModel.forward``, each (B, T).

    ``logits`` (B, T, V): position i predicts token i+1; ``mtp_logits[k-1]`` (B, T-k, V): position
    i predicts token i+k+1. Entry t of every output scores token t (NaN where nothing predicts it).
    """
    seq = input_ids.shape[1]
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}")
    logp = _nan_pad(selective_log_softmax(logits[:, :-1], input_ids[:, 1:], temperature), 1, seq)  # (B, T)
    mtp = []
    for k, lg in enumerate(mtp_logits, start=1):
        if lg.shape[1] != max(seq - k, 0):
            raise ValueError(f"depth-{k} MTP logits have length {lg.shape[1]}, expected T - {k} = {seq - k}")
        n = max(seq - k - 1, 0)  # depth-k positions 0 .. T-k-2 score tokens k+1 .. T-1
        mtp.append(_nan_pad(selective_log_softmax(lg[:, :n], input_ids[:, k + 1:], temperature), k + 1, seq))
    return logp, mtp


def aligned_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    temperature: float = 1.0,
    grad_cut: str = "full",
    with_mtp: bool = True,
) -> tuple[Tensor, Tensor | list[Tensor] | None]:
    """``(logp, mtp_logp)``, both (B, T), aligned so that entry ``t`` scores token ``t``.

    ``mtp_logp`` is one tensor when the model has one MTP depth, a list (depth 1 first) for D > 1,
    and ``None`` for D = 0 or ``with_mtp=False``. Logits are divided by ``temperature`` before the
    softmax. See the module docstring for the NaN convention.
    """
    check_grad_cut(grad_cut)
    logits, mtp_logits = model(input_ids, attention_mask=attention_mask, grad_cut=grad_cut, with_mtp=with_mtp)
    logp, mtp = align_logprobs(logits, mtp_logits, input_ids, temperature)
    if not mtp:
        return logp, None
    return logp, mtp[0] if len(mtp) == 1 else mtp
