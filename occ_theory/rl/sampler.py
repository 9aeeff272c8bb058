"""Batched, KV-cached sampling from the trunk: the rollout generator of the RL loop.

One prefill over the left-padded prompts, then one single-token forward per step through the
trunk's base model with a ``transformers`` ``DynamicCache``; the output head is applied to the last
position only. Positions follow ``position_ids_from_mask`` (``cumsum(mask) - 1``), the rule
``OCCModel.forward`` uses, so ``aligned_logprobs`` on the returned sequences reproduces
``Rollout.logprobs``.

Sampling: ``log_softmax(logits / temperature)`` over the full vocabulary is the policy whose
log-probs are recorded; top-p only restricts which tokens can be drawn (nucleus = the smallest
set of most likely tokens whose mass reaches ``top_p``). Tokens are drawn by inverse-CDF sampling
with one uniform per row from the passed ``generator`` only (drawn on the generator's device).
A row stops at its first ``eos_id``; the batch stops when every row has stopped.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from ..models.mtp import causal_mask, position_ids_from_mask


@dataclass
class Rollout:
    """A generated batch. Columns ``[0, prompt_len)`` hold the left-padded prompts."""

    input_ids: Tensor  # (B, P+T) prompt + response + right padding (pad_id)
    attention_mask: Tensor  # (B, P+T) long, 1 on real prompt and response tokens
    response_mask: Tensor  # (B, P+T) long, 1 on generated tokens (EOS included)
    logprobs: Tensor  # (B, P+T) float32, sampling-policy log-prob of each generated token, 0 elsewhere
    prompt_len: int  # P, the padded prompt length
    response_lengths: Tensor  # (B,) long, generated tokens per row (EOS included)

    @property
    def responses(self) -> list[list[int]]:
        """The generated token ids of each row (EOS included)."""
        rows = self.input_ids[:, self.prompt_len:].tolist()
        return [row[:n] for row, n in zip(rows, self.response_lengths.tolist())]


def _cache_kwarg(base: nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); use whichever forward takes."""
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _new_cache(config: object) -> DynamicCache:
    try:
        return DynamicCache(config=config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def _check_args(prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, top_p: float) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _nucleus(probs: Tensor, top_p: float) -> tuple[Tensor, Tensor | None]:
    """Probabilities restricted to the nucleus (sorted, descending) and the sort order.

    The nucleus is the smallest set of most likely tokens whose mass reaches ``top_p``; with
    ``top_p = 1`` nothing is restricted or sorted (order ``None``).
    """
    if top_p >= 1.0:
        return probs, None
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    keep = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < top_p  # mass strictly before each token
    return sorted_p * keep, order


def sample_next(
    logits: Tensor, temperature: float, top_p: float, greedy: bool, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """``(tokens, logprobs)``, both (B,), from last-position logits (B, V).

    Inverse-CDF sampling: one uniform per row from ``generator``, located in the cumulative
    (nucleus) mass with ``searchsorted``; the index is capped at the last token with positive
    mass so that rounding at the top of the CDF can never pick an excluded token.
    """
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
    if greedy:
        tokens = logits.argmax(dim=-1)
    else:
        mass, order = _nucleus(logp.exp(), top_p)  # (B, V)
        cdf = torch.cumsum(mass.double(), dim=-1)
        u = torch.rand((mass.shape[0], 1), generator=generator, device=generator.device, dtype=torch.float64)
        idx = torch.searchsorted(cdf, u.to(cdf.device) * cdf[:, -1:], right=True)  # (B, 1)
        last = mass.shape[-1] - 1 - (mass > 0).flip(-1).to(torch.uint8).argmax(-1, keepdim=True)
        idx = torch.minimum(idx, last)
        tokens = (idx if order is None else order.gather(-1, idx)).squeeze(-1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    *,
    eos_id: int | None,
    pad_id: int,
    generator: torch.Generator | None,
    greedy: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> Rollout:
    """Sample up to ``max_new_tokens`` tokens after each prompt (``model``: an ``OCCModel`` or a trunk).

    ``generator`` is the only source of randomness (it may be ``None`` only when ``greedy``).
    ``eos_id=None`` never stops early (every row gets ``max_new_tokens`` tokens).
    ``autocast_dtype`` (e.g. ``torch.bfloat16`` on CUDA) runs the forwards under autocast; the
    sampling and the recorded log-probs are float32 either way.
    """
    _check_args(prompts, max_new_tokens, temperature, top_p)
    if generator is None and not greedy:
        raise ValueError("generator is None: sampling needs a torch.Generator (pass greedy=True for argmax decoding)")
    trunk = getattr(model, "trunk", model)
    base, head = trunk.base_model, trunk.get_output_embeddings()
    device = head.weight.device
    batch, plen = len(prompts), max(len(p) for p in prompts)
    width = plen + max_new_tokens

    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        ids[i, plen - len(p):plen] = torch.as_tensor(p, dtype=torch.long)
        mask[i, plen - len(p):plen] = 1
    ids, mask = ids.to(device), mask.to(device)
    logprobs = torch.zeros((batch, width), dtype=torch.float32, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    next_pos = mask[:, :plen].sum(-1, keepdim=True)  # (B, 1) position of the first response token

    cache = _new_cache(trunk.config)
    cache_kw = _cache_kwarg(base)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    check_every = 1 if device.type == "cpu" else 8  # each check is a host sync on accelerators
    with torch.inference_mode(), amp:
        pos = position_ids_from_mask(mask[:, :plen])
        prefill_mask = causal_mask(trunk, mask[:, :plen], pos, (batch, plen))  # the mask OCCModel.forward uses
        hidden = base(input_ids=ids[:, :plen], attention_mask=prefill_mask, position_ids=pos, use_cache=True,
                      **{cache_kw: cache}).last_hidden_state[:, -1]  # (B, H)
        steps = 0
        for t in range(max_new_tokens):
            col = plen + t
            tokens, lp = sample_next(head(hidden), temperature, top_p, greedy, generator)
            alive = ~done
            ids[:, col] = torch.where(alive, tokens, pad_id)
            mask[:, col] = alive
            logprobs[:, col] = torch.where(alive, lp, 0.0)
            if eos_id is not None:
                done = done | (tokens == eos_id)
            steps = t + 1
            if t + 1 == max_new_tokens or ((t + 1) % check_every == 0 and bool(done.all())):
                break
            hidden = base(input_ids=ids[:, col:col + 1], attention_mask=mask[:, :col + 1],
                          position_ids=next_pos + t, use_cache=True, **{cache_kw: cache}).last_hidden_state[:, -1]

    response_mask = torch.zeros_like(mask)
    response_mask[:, plen:] = mask[:, plen:]
    lengths = response_mask.sum(-1)
    end = plen + min(steps, int(lengths.max()))  # drop trailing all-pad columns
    return Rollout(
        input_ids=ids[:, :end], attention_mask=mask[:, :end], response_mask=response_mask[:, :end],
        logprobs=logprobs[:, :end], prompt_len=plen, response_lengths=lengths,
    )
