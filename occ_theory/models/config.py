"""``ModelConfig``: the toolkit's own description of a trunk + MTP model (DESIGN.md, Models).

Two ways to get a trunk:

* fresh, from the architecture fields: ``family`` and every size field are then required
  (``ModelConfig.tiny()`` / ``ModelConfig.small()`` are ready-made presets);
* ``init_from=<local HF checkpoint directory or .gguf file>``: the trunk is loaded with
  ``AutoModelForCausalLM.from_pretrained(path, local_files_only=True)`` (``gguf_file=`` for GGUF).
  Size fields left at ``None`` are read from the checkpoint; size fields that are set must match
  it (``ValueError`` naming the field otherwise). ``tie_word_embeddings``, ``rms_norm_eps`` and ``rope_theta`` are
  always the checkpoint's own. The built model's ``.config`` is the resolved config.

MTP modules (``mtp_depths`` of them, initialised as ``mtp_init`` says) are put on top in both cases.
``occ_theory.models.load_pretrained`` is the one-call form of the second way, with the checkpoint's
own tokenizer.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

FAMILIES = ("qwen2", "llama", "qwen3")
MTP_INITS = ("fresh", "copy_last")
DEFAULT_MTP_INIT = "fresh"
"""The one default of ``mtp_init`` (``ModelConfig``, ``load_pretrained``, ``load_any``, the config's model section)."""
TINY = dict(family="qwen2", hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
            max_position_embeddings=128, mtp_depths=1)
"""The one tiny preset (``ModelConfig.tiny()``, the config's default model, ``configs/tiny.yaml``, ``occ quickstart``)."""

# Architecture fields compared against an ``init_from`` checkpoint (and by ``load_model(expect=...)``).
ARCH_FIELDS = (
    "family",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "max_position_embeddings",
    "vocab_size",
)
_REQUIRED_FRESH = ARCH_FIELDS[:-1]  # vocab_size may come from the tokenizer


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the trunk and its MTP modules. Sizes are ``None`` only with ``init_from``."""

    family: str | None = None
    """Trunk family: "qwen2" (Qwen2ForCausalLM), "llama" (LlamaForCausalLM) or "qwen3" (Qwen3ForCausalLM)."""
    hidden_size: int | None = None
    """Width H of the residual stream (trunk and MTP blocks)."""
    intermediate_size: int | None = None
    """Width of the MLP inside every decoder block."""
    num_layers: int | None = None
    """Number of trunk decoder blocks (each MTP depth adds one more block of its own)."""
    num_heads: int | None = None
    """Attention heads per block; must divide hidden_size, head size must be even (rotary)."""
    num_kv_heads: int | None = None
    """Key/value heads per block (grouped-query attention); must divide num_heads."""
    max_position_embeddings: int | None = None
    """Longest sequence (prompt + response) the model is meant to see."""
    tie_word_embeddings: bool = True
    """Share the token-embedding matrix with the output head (with init_from: the checkpoint's)."""
    mtp_depths: int = 1
    """Number D >= 0 of chained MTP modules; depth k predicts k+1 tokens ahead."""
    mtp_init: str = DEFAULT_MTP_INIT
    """How the MTP blocks start: "fresh" (default: the trunk's random initialisation) or "copy_last" (a copy of
    the trunk's last decoder block and final norm; the projection W_k is still fresh), which a pretrained trunk's
    configs set (smollm2)."""
    init_from: str | None = None
    """Local HF checkpoint directory or ``.gguf`` file for the trunk (None: a freshly initialised trunk)."""
    vocab_size: int | None = None
    """Vocabulary size; None: taken from the tokenizer (or the init_from checkpoint) when building."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm (with init_from: the checkpoint's)."""
    rope_theta: float = 10000.0
    """Rotary base frequency (with init_from: the checkpoint's)."""

    def __post_init__(self) -> None:
        if self.init_from is not None:
            if not isinstance(self.init_from, str | os.PathLike):
                raise ValueError(f"init_from must be a directory or .gguf file path, got {self.init_from!r}")
            object.__setattr__(self, "init_from", os.fspath(self.init_from))
        else:
            missing = [name for name in _REQUIRED_FRESH if getattr(self, name) is None]
            if missing:
                raise ValueError(
                    f"ModelConfig without init_from needs {', '.join(missing)} "
                    "(or use ModelConfig.tiny() / ModelConfig.small())"
                )
        if self.family is not None and self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        for name in ARCH_FIELDS[1:]:
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.hidden_size is not None and self.num_heads is not None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
                )
            if (self.hidden_size // self.num_heads) % 2:
                raise ValueError(
                    f"hidden_size / num_heads = {self.hidden_size // self.num_heads} must be even (rotary embeddings)"
                )
        if self.num_heads is not None and self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}")
        if isinstance(self.mtp_depths, bool) or not isinstance(self.mtp_depths, int) or self.mtp_depths < 0:
            raise ValueError(f"mtp_depths must be an integer >= 0, got {self.mtp_depths!r}")
        if self.mtp_init not in MTP_INITS:
            raise ValueError(f"mtp_init must be one of {MTP_INITS}, got {self.mtp_init!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"tie_word_embeddings must be a bool, got {self.tie_word_embeddings!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")

    @property
    def head_dim(self) -> int | None:
        """Size of one attention head, H / num_heads."""
        if self.hidden_size is None or self.num_heads is None:
            return None
        return self.hidden_size // self.num_heads

    @classmethod
    def tiny(cls, **overrides: Any) -> ModelConfig:
        """The tiny preset ``TINY``: about 1M parameters with the 100-token character vocabulary and 128
        positions; CPU runs in minutes."""
        return cls(**{**TINY, **overrides})

    @classmethod
    def small(cls, **overrides: Any) -> ModelConfig:
        """About 29M parameters: the small GPU size."""
        base = dict(family="qwen2", hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                    num_kv_heads=4, max_position_embeddings=2048)
        return cls(**{**base, **overrides})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Build from a plain mapping (YAML/JSON); unknown keys are a ``ValueError`` naming them."""
        if isinstance(data, ModelConfig):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(f"a model config must be a ModelConfig or a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def mismatches(actual: ModelConfig, expected: ModelConfig | Mapping[str, Any]) -> list[str]:
    """``"field: actual X, expected Y"`` for every field ``expected`` sets that ``actual`` differs in.

    A ``ModelConfig`` ``expected`` sets its architecture fields that are not ``None`` plus
    ``mtp_depths``; a mapping sets exactly its keys (any ModelConfig field but ``init_from``).
    """
    if isinstance(expected, ModelConfig):
        wanted = {name: getattr(expected, name) for name in (*ARCH_FIELDS, "mtp_depths")}
        wanted = {k: v for k, v in wanted.items() if v is not None}
    else:
        known = {f.name for f in fields(ModelConfig)} - {"init_from"}
        unknown = sorted(set(expected) - known)
        if unknown:
            raise ValueError(f"cannot check unknown field(s) {', '.join(unknown)}")
        wanted = dict(expected)
    return [f"{k}: checkpoint has {getattr(actual, k)!r}, expected {v!r}"
            for k, v in wanted.items() if getattr(actual, k) != v]
