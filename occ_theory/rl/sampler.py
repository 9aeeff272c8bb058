"""Batched, KV-cached sampling from the trunk: the rollout generator of the RL loop.

One prefill over the left-padded prompts, then one single-token step per generated token; the
output head is applied to the last position only. Two decoders with the same methods
(``prefill()``, ``step(col)``, both returning last-position logits) run the forward passes:

* ``StaticCacheDecoder`` (Qwen2 and Llama trunks, SmolLM2 included): the trunk's layers run by
  hand on their own weights over a KV cache preallocated for prompt + response. A step does none
  of the per-step work of the ``transformers`` forward (mask building, re-concatenating a growing
  ``DynamicCache``, module and output-object overhead), and fewer, larger kernels: q/k/v and
  gate/up are one matmul each, with the RMSNorm weights and the attention scale folded in, RoPE
  is one complex multiplication by a cos/sin table of every column made once by the trunk's
  rotary module, and attention is two batched matmuls over the cache. The prefill skips padding.
* ``TransformersDecoder`` (any other trunk): the trunk's base model with a ``DynamicCache``. It is
  the reference the fast decoder is tested against, step by step. ``StaticCacheDecoder.supports``
  sends every family it does not reproduce here (Qwen3's q/k norms, Mistral, Gemma, ...), and
  Qwen2/Llama variants it does not either (sliding window, a rotary table that depends on the
  sequence length, a replaced layer or projection, attention other than sdpa/eager).

The hand-written decoder earns its place on CPU: ``occ bench rollout`` (one thread, the trainer's
batches of 64 and 8 rows, 40 new tokens) measures it at 1.6–1.8x and 1.9–2.1x the tokens/s of the
fastest ``transformers`` ``generate`` configuration (dynamic cache, static cache, static cache with
the decode step compiled); kept while that stays ≥ 1.5x.

Both give the same policy up to float rounding (~1e-6 in float32). Positions follow
``position_ids_from_mask`` (``cumsum(mask) - 1``), the rule ``OCCModel.forward`` uses, so
``aligned_logprobs`` on the returned sequences reproduces ``Rollout.logprobs``.

Sampling: ``log_softmax(logits / temperature)`` over the full vocabulary is the policy whose
log-probs are recorded; top-p only restricts which tokens can be drawn (nucleus = the smallest
set of most likely tokens whose mass reaches ``top_p``). Tokens are drawn by inverse-CDF sampling
with one uniform per row from the passed ``generator`` only (drawn on the generator's device).
A row stops at its first ``eos_id``; the batch stops when every row has stopped.
"""

from __future__ import annotations

import inspect
import math
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


class NonFiniteLogitsError(ValueError):
    """The model's logits were NaN or infinite while generating: its weights have diverged."""


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
    (nucleus) mass with ``searchsorted``; the located value is kept strictly below the total mass,
    so that rounding at the top of the CDF can never pick an excluded (zero-mass) token.
    """
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    logp = torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
    if greedy:
        tokens = logits.argmax(dim=-1, keepdim=True)
    else:
        mass, order = _nucleus(logp.exp(), top_p)  # (B, V)
        cdf = torch.cumsum(mass, dim=-1, dtype=torch.float64)
        u = torch.rand((mass.shape[0], 1), generator=generator, device=generator.device, dtype=torch.float64)
        total = cdf[:, -1:]
        # first index whose cdf exceeds u * total: a token of positive mass, as u * total < total
        at = torch.minimum(u.to(cdf.device) * total, torch.nextafter(total, torch.zeros_like(total)))
        tokens = torch.searchsorted(cdf, at, right=True).clamp_(max=mass.shape[-1] - 1)  # (B, 1); NaN mass: past the end
        if order is not None:
            tokens = order.gather(-1, tokens)
    return tokens.squeeze(-1), logp.gather(-1, tokens).squeeze(-1)


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
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # rotary tables that depend on the position only


def _fused_weight(*linears: nn.Linear, dtype: torch.dtype, in_scale: Tensor | None = None,
                  out_scale: Tensor | None = None, out_order: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``(W, b)`` with ``x @ W + b == (linears of x * in_scale, concatenated)[out_order] * out_scale``.

    ``W`` is (in, out) contiguous: a plain row-major matmul, ~2x faster than ``F.linear``'s
    transposed weight for the few-row matmuls of a decode step on CPU.
    """
    weight = torch.cat([lin.weight for lin in linears]) if len(linears) > 1 else linears[0].weight  # (out, in)
    bias = None
    if any(lin.bias is not None for lin in linears):
        bias = torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                          for lin in linears])
    if out_order is not None:
        weight, bias = weight[out_order], bias[out_order] if bias is not None else None
    if out_scale is not None:
        weight, bias = weight * out_scale[:, None], bias * out_scale if bias is not None else None
    if in_scale is not None:
        weight = weight * in_scale
    return weight.t().to(dtype, memory_format=torch.contiguous_format), bias.to(dtype) if bias is not None else None


def _affine(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight + bias`` for rows ``x`` (N, in)."""
    return torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)


def _split_norm(norm: nn.Module) -> tuple[Callable[[Tensor], Tensor], Tensor | None]:
    """``(normalise, weight)`` with ``norm(x) == normalise(x) * weight``, the weight to fold into
    the next matmul; for any norm but an unpatched family RMSNorm, ``(norm, None)``.

    RMSNorm ``x / sqrt(mean(x²) + eps) * w`` is computed (in float32, like the module) as
    ``x / hypot(‖x‖, sqrt(H·eps))`` with ``sqrt(H)`` moved into the weight: three kernels
    instead of seven, equal to ~1e-7 relative.
    """
    family_norm = type(norm).__name__ in {f"{p}RMSNorm" for p in _FAMILIES.values()}
    weight = getattr(norm, "weight", None)
    if not family_norm or "forward" in norm.__dict__ or not isinstance(weight, Tensor) or weight.dim() != 1:
        return norm, None
    hidden = weight.shape[0]
    floor = torch.tensor(math.sqrt(hidden * float(norm.variance_epsilon)), dtype=torch.float32, device=weight.device)

    def normalise(x: Tensor) -> Tensor:
        x32 = x if x.dtype == torch.float32 else x.float()
        out = x32 / torch.hypot(torch.linalg.vector_norm(x32, dim=-1, keepdim=True), floor)
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    return normalise, weight * math.sqrt(hidden)


def _pair_halves(heads: int, d: int, device: torch.device) -> Tensor:
    """Output order putting dims ``i`` and ``i + d/2`` of every head side by side: the rotate-half
    RoPE of HF on this layout is a complex multiplication of consecutive pairs."""
    within = torch.arange(d, device=device).view(2, d // 2).t().reshape(-1)  # 0, d/2, 1, d/2+1, ...
    return (torch.arange(heads, device=device)[:, None] * d + within).reshape(-1)


def _softmax(scores: Tensor) -> Tensor:
    """Softmax over the last dim. torch's CPU kernel is ~4x slower on rows shorter than 16 (one
    AVX-512 register) than max-shifted ``exp`` over the whole tensor, so short rows take that."""
    if scores.shape[-1] >= 16:
        return torch.softmax(scores, dim=-1)
    e = (scores - scores.amax(dim=-1, keepdim=True)).exp_()
    return e.div_(e.sum(dim=-1, keepdim=True))


@dataclass(frozen=True)
class _Packed:
    """The real tokens of a left-padded (B, n) prefill, which the row-wise parts run on alone."""

    rows: Tensor  # (N,) their indices in the row-major (B*n) layout
    cache_rows: Tensor  # (N,) their indices in the column-major (n*B) layout of the cache
    last: Tensor  # (B,) the position among them of each row's last column (real: padding is on the left)

    @staticmethod
    def of(real: Tensor) -> _Packed | None:
        """From the (B, n) bool mask of real tokens; ``None`` when there is no padding to skip."""
        if bool(real.all()):
            return None
        b, n = real.shape
        rows = real.reshape(-1).nonzero().squeeze(1)
        return _Packed(rows, (rows % n) * b + rows // n, real.sum(1).cumsum(0) - 1)


class _Block:
    """One decoder layer's weights, read once per rollout, and its slice of the KV cache.

    ``__call__`` runs the layer over ``n`` new tokens per row, at columns ``[start, start + n)``,
    on rows ``x`` (B*n, H): the row-wise parts are plain 2-D matmuls, attention is per batch row.
    Folded into the matmul weights: the RMSNorm weights, the attention scale (into the query
    projection; RoPE is linear, so it commutes) and a per-head reordering of the query and key
    dims that makes RoPE one complex multiplication (dot products do not see the order).
    The cache is token-major, (P+T, B, kv heads, d): a step writes one contiguous block, and the
    batched matmuls read each (row, head) as a strided matrix. The ``g`` query heads sharing a kv
    head attend as ``g * m`` query rows of that head (no kv copy).
    """

    def __init__(self, layer: nn.Module, batch: int, width: int, dtype: torch.dtype, x_dtype: torch.dtype) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.d = d = attn.head_dim
        self.n_q, self.n_kv = attn.q_proj.out_features // d, attn.k_proj.out_features // d
        n_qk = self.n_q + self.n_kv
        self.norm1, w1 = _split_norm(layer.input_layernorm)
        self.norm2, w2 = _split_norm(layer.post_attention_layernorm)
        device = attn.q_proj.weight.device
        order = torch.cat([_pair_halves(n_qk, d, device), torch.arange(n_qk * d, (n_qk + self.n_kv) * d, device=device)])
        scale = torch.ones(order.shape[0], dtype=attn.q_proj.weight.dtype, device=device)
        scale[:self.n_q * d] = attn.scaling
        self.w_qkv, self.b_qkv = _fused_weight(attn.q_proj, attn.k_proj, attn.v_proj, dtype=dtype, in_scale=w1,
                                               out_scale=scale, out_order=order)
        self.w_o, self.b_o = _fused_weight(attn.o_proj, dtype=dtype)
        self.w_gu, self.b_gu = _fused_weight(mlp.gate_proj, mlp.up_proj, dtype=dtype, in_scale=w2)
        self.w_down, self.b_down = _fused_weight(mlp.down_proj, dtype=dtype)
        self.inter = mlp.gate_proj.out_features
        self.act = F.silu if type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation") else mlp.act_fn  # skip Module.__call__
        # x + a @ W as one addmm, unless autocast would run it (and so the residual stream) in low precision
        self.fuse_residual = dtype == x_dtype
        self.rope_dtype = torch.promote_types(x_dtype, torch.float32)  # HF's cos/sin: at least float32
        self.low_precision = dtype in (torch.float16, torch.bfloat16)  # softmax in float32 then
        # every column is written (prefill or step) before any query reads it
        self.keys = torch.empty((width, batch, self.n_kv, d), dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        # the per-(row, kv head) matrices for the batched matmuls, as strided views of the cache
        self.keys_t = self.keys.view(width, -1, d).permute(1, 2, 0)  # (B*kv, d, P+T)
        # the keys as complex pairs, when RoPE runs in the cache's dtype: a step rotates into it
        self.keys_c = torch.view_as_complex(self.keys.unflatten(-1, (-1, 2))) if dtype == self.rope_dtype else None
        self.values_t = self.values.view(width, -1, d).transpose(0, 1)  # (B*kv, P+T, d)

    def _residual(self, x: Tensor, a: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.fuse_residual and bias is None:
            return torch.addmm(x, a, weight)
        return x + _affine(a, weight, bias)

    def _attention(self, q: Tensor, m: int, end: int, key_bias: Tensor) -> Tensor:
        """``q`` (B*m, q heads, d) of the last ``m`` of ``end`` cached columns -> (B*m, q heads * d)."""
        b, kv, d = q.shape[0] // m, self.n_kv, self.d
        if m == 1:
            q = q.reshape(b * kv, -1, d)  # (B*kv, g, d)
        else:
            q = q.view(b, m, kv, -1, d).permute(0, 2, 3, 1, 4).reshape(b * kv, -1, d)  # (B*kv, g*m, d)
        scores = torch.baddbmm(key_bias, q, self.keys_t[..., :end])  # (B*kv, g*m, end)
        probs = _softmax(scores.float()).to(scores.dtype) if self.low_precision else _softmax(scores)
        out = torch.bmm(probs, self.values_t[:, :end])  # (B*kv, g*m, d)
        if m == 1:
            return out.view(b, -1)
        return out.view(b, kv, -1, m, d).permute(0, 3, 1, 2, 4).reshape(b * m, -1)

    def _cache(self, start: int, n: int, keys: Tensor, values: Tensor, packed: _Packed | None) -> None:
        """Write ``keys``/``values`` (B*n, or N packed, kv heads, d) of columns ``[start, start + n)``."""
        if n == 1:
            self.keys[start].copy_(keys)
            self.values[start].copy_(values)
        elif packed is not None:  # padding columns keep the zeros the prefill put there
            dtype = self.keys.dtype
            self.keys[start:start + n].view(-1, self.n_kv, self.d).index_copy_(0, packed.cache_rows, keys.to(dtype))
            self.values[start:start + n].view(-1, self.n_kv, self.d).index_copy_(0, packed.cache_rows, values.to(dtype))
        else:
            b, d = keys.shape[0] // n, self.d
            self.keys[start:start + n] = keys.view(b, n, -1, d).transpose(0, 1)  # (n, B, kv, d)
            self.values[start:start + n] = values.view(b, n, -1, d).transpose(0, 1)

    def __call__(self, x: Tensor, start: int, n: int, rotary: Tensor, key_bias: Tensor, last_only: bool,
                 packed: _Packed | None = None) -> Tensor:
        """The layer's output rows for ``n`` new columns, or for the last one only (``last_only``).

        ``x`` (B*n, H), or (N, H) with ``packed`` (the real tokens only); ``rotary`` (rows, 1, d/2)
        complex, ``cos + i sin`` of each row's position; ``key_bias`` additive over the ``start + n``
        keys, 0 where a query may attend, -inf elsewhere: (B*kv, g*m, start+n) in the query-row order
        of the attention, or (B*kv, 1, start+n) when m = 1, m = 1 if ``last_only`` else n. Keys and
        values of all n new columns are cached.
        """
        b, n_qk, d = self.keys.shape[1], self.n_q + self.n_kv, self.d
        qkv = _affine(self.norm1(x), self.w_qkv, self.b_qkv).view(-1, n_qk + self.n_kv, d)  # (B*n, heads, d)
        if n == 1 and self.keys_c is not None:  # a step: rotate the keys straight into the cache
            pairs = torch.view_as_complex(qkv.unflatten(-1, (-1, 2)))  # (B, heads, d/2)
            torch.mul(pairs[:, self.n_q:n_qk], rotary, out=self.keys_c[start])
            self.values[start].copy_(qkv[:, n_qk:])
            q, m = torch.view_as_real(pairs[:, :self.n_q] * rotary).flatten(-2), 1  # (B, q heads, d)
        else:
            pairs = qkv[:, :n_qk].unflatten(-1, (-1, 2))  # (B*n, q+kv heads, d/2, 2)
            if pairs.dtype != self.rope_dtype:  # autocast: rotate in float32, as HF does
                pairs = pairs.to(self.rope_dtype)
            qk = torch.view_as_real(torch.view_as_complex(pairs) * rotary).flatten(-2)  # rotary embedding
            self._cache(start, n, qk[:, self.n_q:], qkv[:, n_qk:], packed)
            q, m = qk[:, :self.n_q], n
        if q.dtype != self.keys.dtype:  # rotated in float32 for a half-precision cache
            q = q.to(self.keys.dtype)
        if last_only and n > 1:
            if packed is not None:
                q, x = q[packed.last], x[packed.last]
            else:
                q, x = q.view(b, n, self.n_q, d)[:, -1], x.view(b, n, -1)[:, -1]
            m = 1
        if packed is not None and m > 1:  # padding queries as zeros, their outputs dropped
            q = q.new_zeros((b * n, *q.shape[1:])).index_copy_(0, packed.rows, q)
            attended = self._attention(q, m, start + n, key_bias)[packed.rows]
        else:
            attended = self._attention(q, m, start + n, key_bias)
        x = self._residual(x, attended, self.w_o, self.b_o)
        gate, up = _affine(self.norm2(x), self.w_gu, self.b_gu).chunk(2, dim=-1)
        return self._residual(x, self.act(gate) * up, self.w_down, self.b_down)


class StaticCacheDecoder:
    """The fast decoder: the trunk's layers run by hand over a KV cache preallocated for P+T columns.

    ``ids`` and ``mask`` (B, P+T) are the sampler's buffers: ``step(col)`` reads column ``col``.
    Cos/sin of every column come once from the trunk's rotary module, at the positions the
    reference uses. The query of column ``c`` attends to the cached keys ``[0, c]`` whose ``mask``
    is 1, and to itself (which keeps padding queries of the prompt from a fully masked row).
    Matmul weights are cast to ``autocast_dtype`` once (what autocast would do at every call);
    norms, RoPE, softmax and the residual stream stay in at least float32, as under autocast.
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
        if getattr(getattr(base, "rotary_emb", None), "rope_type", None) not in _STATIC_ROPE:
            return False  # no rotary module, or one whose table depends on the sequence length
        if type(base).__name__ != f"{prefix}Model" or not isinstance(trunk.get_output_embeddings(), nn.Linear):
            return False
        shapes = set()
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
            shapes.add((attn.head_dim, attn.q_proj.out_features, attn.k_proj.out_features))
        return len(shapes) == 1  # one attention shape: the decode mask is shared by the layers

    def __init__(self, trunk: nn.Module, ids: Tensor, mask: Tensor, prompt_len: int,
                 autocast_dtype: torch.dtype | None = None) -> None:
        base = trunk.base_model
        self.ids, self.mask, self.plen = ids, mask, prompt_len
        self.embed, self.head = base.embed_tokens.weight, trunk.get_output_embeddings()
        self.norm, self.norm_weight = _split_norm(base.norm)
        x_dtype = self.embed.dtype
        dtype = autocast_dtype or x_dtype
        batch, width = ids.shape
        self.blocks = [_Block(layer, batch, width, dtype, x_dtype) for layer in base.layers]
        prompt_pos = position_ids_from_mask(mask[:, :prompt_len])  # (B, P)
        response_pos = mask[:, :prompt_len].sum(-1, keepdim=True) + torch.arange(width - prompt_len, device=ids.device)
        probe = torch.empty(0, dtype=x_dtype, device=ids.device)
        cos, sin = base.rotary_emb(probe, torch.cat([prompt_pos, response_pos], dim=1))  # (B, P+T, d)
        half = cos.shape[-1] // 2
        if not (torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(sin[..., :half], sin[..., half:])):
            raise ValueError("the trunk's rotary table does not repeat its frequencies (rotate-half RoPE expected)")
        rope_dtype = torch.promote_types(cos.dtype, torch.float32)
        self.rotary = torch.complex(cos[..., :half].to(rope_dtype), sin[..., :half].to(rope_dtype)).unsqueeze(2)
        # additive key mask of the decode steps, one row per (row, kv head): 0 on real tokens,
        # -inf on padding (set per column by ``step``)
        self.kv_heads, self.groups = self.blocks[0].n_kv, self.blocks[0].n_q // self.blocks[0].n_kv
        self.step_bias = torch.zeros((batch, self.kv_heads, width), dtype=dtype, device=ids.device)
        self.step_bias[..., :prompt_len].masked_fill_(mask[:, None, :prompt_len] == 0, float("-inf"))
        self.step_rows = self.step_bias.view(-1, 1, width)  # (B*kv, 1, P+T)

    def _rows(self, bias: Tensor) -> Tensor:
        """A (B, m, keys) additive mask in the attention's (B*kv, g*m, keys) query-row order."""
        b, m, keys = bias.shape
        return bias[:, None, None].expand(b, self.kv_heads, self.groups, m, keys).reshape(-1, self.groups * m, keys)

    def _run(self, start: int, n: int, key_bias: Tensor, last_bias: Tensor, packed: _Packed | None = None) -> Tensor:
        """Logits after the last of ``n`` new columns per row (``key_bias``, ``last_bias``: see ``_Block``)."""
        if n == 1:
            x, rotary = F.embedding(self.ids[:, start], self.embed), self.rotary[:, start]  # (B, H), (B, 1, d/2)
        else:
            ids, rotary = self.ids[:, start:start + n].reshape(-1), self.rotary[:, start:start + n].flatten(0, 1)
            if packed is not None:
                ids, rotary = ids[packed.rows], rotary[packed.rows]
            x = F.embedding(ids, self.embed)  # (B*n or N, H)
        for block in self.blocks[:-1]:
            x = block(x, start, n, rotary, key_bias, last_only=False, packed=packed)
        x = self.blocks[-1](x, start, n, rotary, last_bias, last_only=True, packed=packed)  # only the last query
        x = self.norm(x)
        return F.linear(x if self.norm_weight is None else x * self.norm_weight, self.head.weight, self.head.bias)

    def prefill(self) -> Tensor:
        p = self.plen
        real = self.mask[:, :p].bool()  # (B, P)
        causal = torch.ones((p, p), dtype=torch.bool, device=real.device).tril()
        keep = (real[:, None] & causal) | torch.eye(p, dtype=torch.bool, device=real.device)  # (B, P queries, P keys)
        bias = torch.zeros(keep.shape, dtype=self.step_bias.dtype, device=keep.device).masked_fill_(~keep, float("-inf"))
        packed = _Packed.of(real)
        if packed is not None:
            for block in self.blocks:
                block.keys[:p].zero_()
                block.values[:p].zero_()
        return self._run(0, p, self._rows(bias), self._rows(bias[:, -1:]), packed)

    def step(self, col: int) -> Tensor:
        self.step_bias[..., col].masked_fill_((self.mask[:, col] == 0).unsqueeze(-1), float("-inf"))
        bias = self.step_rows[..., :col + 1]  # (B*kv, 1, col+1)
        return self._run(col, 1, bias, bias)


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
    prompt_width: int | None = None,
) -> Rollout:
    """Sample up to ``max_new_tokens`` tokens after each prompt (``model``: an ``OCCModel`` or a trunk).

    ``generator`` is the only source of randomness (it may be ``None`` only when ``greedy``).
    ``eos_id=None`` never stops early (every row gets ``max_new_tokens`` tokens).
    ``autocast_dtype`` (e.g. ``torch.bfloat16`` on CUDA) runs the forwards under autocast; the
    sampling and the recorded log-probs are float32 either way.
    The response block always has ``max_new_tokens`` columns (right-padded, as verl pads responses
    to the configured length): the public OCC proxy averages over that block, padding included, so
    its width must not depend on the longest response of a batch. ``prompt_width`` left-pads every
    prompt to at least that many columns, so rollouts of several processes concatenate
    column-aligned; without it the prompt block is as wide as the longest prompt. Non-finite logits
    (diverged weights) raise ``NonFiniteLogitsError``.
    """
    _check_args(prompts, max_new_tokens, temperature, top_p)
    if generator is None and not greedy:
        raise ValueError("generator is None: sampling needs a torch.Generator (pass greedy=True for argmax decoding)")
    trunk = getattr(model, "trunk", model)
    device = trunk.get_output_embeddings().weight.device
    batch, plen = len(prompts), max(len(p) for p in prompts)
    if prompt_width is not None:
        if prompt_width < plen:
            raise ValueError(f"prompt_width={prompt_width} is shorter than the longest prompt ({plen} tokens)")
        plen = prompt_width
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
        for t in range(max_new_tokens):
            col = plen + t
            tokens, lp = sample_next(logits, temperature, top_p, greedy, generator)
            ids[:, col] = tokens.masked_fill_(done, pad_id)
            mask[:, col] = ~done
            logprobs[:, col] = lp.masked_fill_(done, 0.0)
            if eos_id is not None:
                done |= tokens == eos_id
            if t + 1 == max_new_tokens or ((t + 1) % check_every == 0 and bool(done.all())):
                break
            logits = decoder.step(col)

    if not bool(torch.isfinite(logprobs).all()):  # one check per rollout: NaN / inf logits give NaN log-probs
        raise NonFiniteLogitsError("the model's logits are not finite (NaN or inf) while generating: its weights "
                                   "have diverged (e.g. a learning rate too high without gradient clipping)")
    response_mask = torch.zeros_like(mask)
    response_mask[:, plen:] = mask[:, plen:]
    lengths = response_mask.sum(-1)
    return Rollout(
        input_ids=ids, attention_mask=mask, response_mask=response_mask, logprobs=logprobs, prompt_len=plen,
        response_lengths=lengths,
    )
