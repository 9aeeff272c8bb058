"""``exact_float64(model)``: curvature-grade numerics for float64 transformers models.

transformers computes RMSNorm and the eager attention softmax in float32 whatever the model's
dtype: right for bf16/fp16 (an upcast), but for a float64 model it is a downcast, so second
derivatives come out only ~1e-7 accurate (on a tiny OCCModel, forward-over-reverse and double
backward HVPs differ by ~5e-8 relative instead of ~1e-16). Inside ``exact_float64(model)``:

* attention runs as eager (math) attention, registered under the name ``"occ_exact_eager"``
  through transformers' public ``AttentionInterface`` / ``AttentionMaskInterface``, with the softmax
  in ``promote(dtype, float32)``: float64 stays float64, lower precisions match transformers;
* every RMSNorm of the model normalises in ``promote(dtype, float32)`` too.

It is a superset of ``occ_theory.theory.eager_attention`` (use it in its place, or innermost).
Nothing changes for float32 and lower precisions except that attention is eager.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import eager_mask

EXACT_EAGER = "occ_exact_eager"


def _exact_eager_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
    scaling: float | None = None, dropout: float = 0.0, **kwargs: object,
) -> tuple[Tensor, Tensor]:
    """transformers' eager attention with the softmax in ``promote(dtype, float32)``."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)  # (B, heads, K, d)
    value = value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale  # (B, heads, Q, K)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights  # (B, Q, heads, d)


AttentionInterface.register(EXACT_EAGER, _exact_eager_attention)
AttentionMaskInterface.register(EXACT_EAGER, eager_mask)


def _exact_rms_norm(self: nn.Module, hidden_states: Tensor) -> Tensor:
    dtype = torch.promote_types(hidden_states.dtype, torch.float32)
    x = hidden_states.to(dtype)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * x.to(hidden_states.dtype)


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")


@contextmanager
def exact_float64(*modules: nn.Module) -> Iterator[None]:
    """Eager attention and RMSNorm without float32 rounding for float64 models, inside the block; like
    ``eager_attention`` it refuses active dropout (``model.eval()`` first)."""
    from ..theory.hvp import check_dropout

    check_dropout(*modules)
    configs, norms, seen = [], [], set()
    for module in modules:
        for sub in module.modules():
            cfg = getattr(sub, "config", None)
            if cfg is not None and id(cfg) not in seen and hasattr(cfg, "_attn_implementation"):
                seen.add(id(cfg))
                configs.append((cfg, cfg._attn_implementation))
            if _is_rms_norm(sub) and "forward" not in sub.__dict__:
                norms.append(sub)
    try:
        for cfg, _ in configs:
            cfg._attn_implementation = EXACT_EAGER
        for norm in norms:
            norm.forward = types.MethodType(_exact_rms_norm, norm)
        yield
    finally:
        for norm in norms:
            del norm.forward
        for cfg, impl in reversed(configs):
            cfg._attn_implementation = impl
