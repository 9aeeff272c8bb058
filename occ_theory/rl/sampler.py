"""Batched, KV-cached sampling from the trunk: the rollout generator of the RL loop.

One prefill over the left-padded prompts, then one single-token step per generated token; the
output head is applied to the last position only. Two decoders do the forward passes:

* ``StaticCacheDecoder`` (Qwen2 and Llama trunks with SDPA or eager attention): a KV cache
  preallocated for prompt + response, and steps that call the trunk's own submodules directly
  (norms, projections, rotary table, MLP activation) around ``scaled_dot_product_attention``,
  skipping the per-step work of the ``transformers`` forward (mask building, a growing
  ``DynamicCache``, output objects). The q/k/v and gate/up projections run as one matmul each.
* ``TransformersDecoder`` (any other trunk): the trunk's base model with a ``DynamicCache``.

Both give the same policy up to float rounding. Positions follow ``position_ids_from_mask``
(``cumsum(mask) - 1``), the rule ``OCCModel.forward`` uses, so ``aligned_logprobs`` on the
returned sequences reproduces ``Rollout.logprobs``.

Sampling: ``log_softmax(logits / temperature)`` over the full vocabulary is the policy whose
log-probs are recorded; top-p only restricts which tokens can be drawn (nucleus = the smallest
set of most likely tokens whose mass reaches ``top_p``). Tokens are drawn by inverse-CDF sampling
with one uniform per row from the passed ``generator`` only (drawn on the generator's device).
A row stops at its first ``eos_id``; the batch stops when every row has stopped.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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


def _check_args(prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, top_p: float) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


# -- sampling -----------------------------------------------------------------------------------


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
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
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


# -- decoders: prefill() -> last-position logits (B, V); step(col) -> logits after token col ----


class TransformersDecoder:
    """The reference decoder: the trunk's ``transformers`` forward with a ``DynamicCache``.

    ``ids`` and ``mask`` (B, P+T) are the sampler's buffers, read at every call: ``step(col)``
    feeds token ``col`` with the attention mask up to it.
    """

    def __init__(self, trunk: nn.Module, ids: Tensor, mask: Tensor, prompt_len: int) -> None:
        self.trunk, self.ids, self.mask, self.plen = trunk, ids, mask, prompt_len
        self.base, self.head = trunk.base_model, trunk.get_output_embeddings()
        try:
            self.cache = DynamicCache(config=trunk.config)
        except TypeError:  # older transformers: no config argument
            self.cache = DynamicCache()
        # transformers renamed ``past_key_values`` to ``cache`` (5.2x); use whichever forward takes
        self.cache_kw = "cache" if "cache" in inspect.signature(self.base.forward).parameters else "past_key_values"
        self.next_pos = mask[:, :prompt_len].sum(-1, keepdim=True)  # (B, 1) position of the first response token

    def _last_logits(self, **inputs: Tensor | None) -> Tensor:
        out = self.base(**inputs, use_cache=True, **{self.cache_kw: self.cache})
        return self.head(out.last_hidden_state[:, -1])  # (B, V)

    def prefill(self) -> Tensor:
        ids, mask = self.ids[:, :self.plen], self.mask[:, :self.plen]
        pos = position_ids_from_mask(mask)
        prefill_mask = causal_mask(self.trunk, mask, pos, tuple(ids.shape))  # the mask OCCModel.forward uses
        return self._last_logits(input_ids=ids, attention_mask=prefill_mask, position_ids=pos)

    def step(self, col: int) -> Tensor:
        return self._last_logits(input_ids=self.ids[:, col:col + 1], attention_mask=self.mask[:, :col + 1],
                                 position_ids=self.next_pos + (col - self.plen))


_FAMILIES = {"qwen2": "Qwen2", "llama": "Llama"}  # model_type -> class-name prefix of its modules


def _fused_linear(*linears: nn.Linear, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """One (weight, bias) computing every ``linear`` at once, outputs concatenated in order."""
    weight = torch.cat([lin.weight for lin in linears]).to(dtype)
    if all(lin.bias is None for lin in linears):
        return weight, None
    bias = [lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features) for lin in linears]
    return weight, torch.cat(bias).to(dtype)


def _rms_norm(norm: nn.Module) -> Callable[[Tensor], Tensor]:
    """The family RMSNorm as one ``F.rms_norm`` call (bitwise the module's own math: normalise
    in float32, cast back, scale), or the module itself if it is anything else or patched."""
    family_norm = type(norm).__name__ in {f"{p}RMSNorm" for p in _FAMILIES.values()}
    if not family_norm or "forward" in norm.__dict__ or not isinstance(getattr(norm, "weight", None), Tensor):
        return norm
    weight, eps = norm.weight, float(norm.variance_epsilon)
    shape = tuple(weight.shape)

    def rms_norm(x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            return F.rms_norm(x, shape, weight, eps)
        return weight * F.rms_norm(x.float(), shape, None, eps).to(x.dtype)

    return rms_norm


def _swap_halves(x: Tensor) -> Tensor:
    """``[x2, x1]`` for ``x = [x1, x2]`` along the last dim; ``rotate_half(x) = _swap_halves(x) * [-1, 1]``."""
    return x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)


class _Block:
    """One decoder layer's weights, read once per rollout; ``__call__`` runs the layer over
    ``n`` new tokens at columns ``[start, start + n)`` with the KV cache of this layer."""

    def __init__(self, layer: nn.Module, batch: int, width: int, dtype: torch.dtype, cache_dtype: torch.dtype) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.d = attn.head_dim
        self.n_q, self.n_kv = attn.q_proj.out_features // self.d, attn.k_proj.out_features // self.d
        self.scale = float(attn.scaling)
        self.norm1, self.norm2 = _rms_norm(layer.input_layernorm), _rms_norm(layer.post_attention_layernorm)
        self.w_qkv, self.b_qkv = _fused_linear(attn.q_proj, attn.k_proj, attn.v_proj, dtype=dtype)
        self.w_o, self.b_o = attn.o_proj.weight.to(dtype), _to(attn.o_proj.bias, dtype)
        self.w_gu, self.b_gu = _fused_linear(mlp.gate_proj, mlp.up_proj, dtype=dtype)
        self.w_down, self.b_down = mlp.down_proj.weight.to(dtype), _to(mlp.down_proj.bias, dtype)
        self.act = mlp.act_fn
        device = self.w_qkv.device
        self.k = torch.zeros((batch, self.n_kv, width, self.d), dtype=cache_dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def __call__(self, x: Tensor, start: int, cos: Tensor, sin: Tensor, keep: Tensor) -> Tensor:
        """``x`` (B, n, H); ``cos``/``sin`` (B, n, 1, d), ``sin`` with the rotate-half sign folded
        in; ``keep`` (B, 1, n, start + n) bool, the keys each query may attend to."""
        b, n, _ = x.shape
        end, n_qk = start + n, self.n_q + self.n_kv
        qkv = F.linear(self.norm1(x), self.w_qkv, self.b_qkv).unflatten(-1, (-1, self.d))  # (B, n, q+2kv heads, d)
        qk = qkv[:, :, :n_qk]
        qk = torch.addcmul(qk * cos, _swap_halves(qk), sin)  # rotary embedding of q and k at once
        self.k[:, :, start:end] = qk[:, :, self.n_q:].transpose(1, 2)
        self.v[:, :, start:end] = qkv[:, :, n_qk:].transpose(1, 2)
        keys, values = self.k[:, :, :end], self.v[:, :, :end]  # (B, kv heads, start+n, d)
        if n == 1:  # the query heads sharing a kv head become that head's query rows: no kv copy
            q = qk[:, 0, :self.n_q].reshape(b, self.n_kv, -1, self.d).to(keys.dtype)  # (B, kv heads, groups, d)
        else:
            q = qk[:, :, :self.n_q].transpose(1, 2).to(keys.dtype)  # (B, q heads, n, d)
            groups = self.n_q // self.n_kv
            keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=keep, scale=self.scale)
        out = out.reshape(b, self.n_q * self.d) if n == 1 else out.transpose(1, 2).reshape(b, n, self.n_q * self.d)
        x = x + F.linear(out.view(b, n, -1), self.w_o, self.b_o)
        gate, up = F.linear(self.norm2(x), self.w_gu, self.b_gu).chunk(2, dim=-1)
        return x + F.linear(self.act(gate) * up, self.w_down, self.b_down)


def _to(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


class StaticCacheDecoder:
    """The fast decoder: the trunk's layers run by hand over a KV cache preallocated for P+T columns.

    Cos/sin of every column are computed once by the trunk's rotary module, at the positions the
    reference uses. The attention of column ``c`` sees the cached keys ``[0, c]`` whose ``mask``
    is 1, and itself (which keeps padding queries of the prompt from a fully masked row).
    Matmul weights are cast to ``autocast_dtype`` once (what autocast would do at every call).
    """

    @staticmethod
    def supports(trunk: nn.Module) -> bool:
        """Whether ``trunk`` is a Qwen2/Llama causal LM whose layers this decoder reproduces."""
        prefix = _FAMILIES.get(getattr(trunk.config, "model_type", None))
        base = trunk.base_model
        if prefix is None or getattr(trunk.config, "_attn_implementation", None) not in ("sdpa", "eager"):
            return False
        if any(t != "full_attention" for t in (getattr(trunk.config, "layer_types", None) or [])):
            return False
        if type(base).__name__ != f"{prefix}Model" or not isinstance(trunk.get_output_embeddings(), nn.Linear):
            return False
        for layer in base.layers:
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            expected = ((layer, "DecoderLayer"), (attn, "Attention"), (mlp, "MLP"))
            if any(type(m).__name__ != f"{prefix}{name}" for m, name in expected):
                return False
            linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            if any(type(lin) is not nn.Linear for lin in linears) or getattr(attn, "sliding_window", None):
                return False
            if attn.training and getattr(attn, "attention_dropout", 0.0):
                return False
        return True

    def __init__(self, trunk: nn.Module, ids: Tensor, mask: Tensor, prompt_len: int,
                 autocast_dtype: torch.dtype | None = None) -> None:
        base = trunk.base_model
        self.ids, self.mask, self.plen = ids, mask, prompt_len
        self.embed, self.norm, self.head = base.embed_tokens, _rms_norm(base.norm), trunk.get_output_embeddings()
        param_dtype = self.embed.weight.dtype
        dtype = autocast_dtype or param_dtype
        batch, width = ids.shape
        self.blocks = [_Block(layer, batch, width, dtype, dtype) for layer in base.layers]
        prompt_pos = position_ids_from_mask(mask[:, :prompt_len])  # (B, P)
        response_pos = mask[:, :prompt_len].sum(-1, keepdim=True) + torch.arange(width - prompt_len, device=ids.device)
        probe = torch.empty(0, dtype=param_dtype, device=ids.device)
        cos, sin = base.rotary_emb(probe, torch.cat([prompt_pos, response_pos], dim=1))  # (B, P+T, d)
        sign = torch.ones(sin.shape[-1], dtype=sin.dtype, device=sin.device)
        sign[: sin.shape[-1] // 2] = -1  # rotate_half(x) * sin == _swap_halves(x) * (sign * sin)
        self.cos, self.sin = cos.unsqueeze(2), (sin * sign).unsqueeze(2)  # (B, P+T, 1, d)

    def _run(self, x: Tensor, start: int, keep: Tensor) -> Tensor:
        end = start + x.shape[1]
        cos, sin = self.cos[:, start:end], self.sin[:, start:end]
        for block in self.blocks:
            x = block(x, start, cos, sin, keep)
        return self.head(self.norm(x[:, -1]))  # (B, V)

    def prefill(self) -> Tensor:
        p = self.plen
        valid = self.mask[:, None, :p].bool()  # (B, 1, P) keys
        causal = torch.ones((p, p), dtype=torch.bool, device=valid.device).tril()
        keep = (valid & causal) | torch.eye(p, dtype=torch.bool, device=valid.device)  # (B, P, P)
        return self._run(self.embed(self.ids[:, :p]), 0, keep.unsqueeze(1))

    def step(self, col: int) -> Tensor:
        keep = self.mask[:, None, None, :col + 1].bool()  # (B, 1, 1, col+1)
        return self._run(self.embed(self.ids[:, col:col + 1]), col, keep)


# -- the rollout --------------------------------------------------------------------------------


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
    device = trunk.get_output_embeddings().weight.device
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

    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    check_every = 1 if device.type == "cpu" else 8  # each check is a host sync on accelerators
    with torch.inference_mode(), amp:
        if StaticCacheDecoder.supports(trunk):
            decoder = StaticCacheDecoder(trunk, ids, mask, plen, autocast_dtype)
        else:
            decoder = TransformersDecoder(trunk, ids, mask, plen)
        logits = decoder.prefill()
        steps = 0
        for t in range(max_new_tokens):
            col = plen + t
            tokens, lp = sample_next(logits, temperature, top_p, greedy, generator)
            ids[:, col] = tokens.masked_fill_(done, pad_id)
            mask[:, col] = ~done
            logprobs[:, col] = lp.masked_fill_(done, 0.0)
            if eos_id is not None:
                done |= tokens == eos_id
            steps = t + 1
            if t + 1 == max_new_tokens or ((t + 1) % check_every == 0 and bool(done.all())):
                break
            logits = decoder.step(col)

    response_mask = torch.zeros_like(mask)
    response_mask[:, plen:] = mask[:, plen:]
    lengths = response_mask.sum(-1)
    end = plen + min(steps, int(lengths.max()))  # drop trailing all-pad columns
    return Rollout(
        input_ids=ids[:, :end], attention_mask=mask[:, :end], response_mask=response_mask[:, :end],
        logprobs=logprobs[:, :end], prompt_len=plen, response_lengths=lengths,
    )
