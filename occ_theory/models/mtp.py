"""The trunk + MTP model: a ``transformers`` causal LM with D chained MTP modules on top.

Each MTP module follows the DeepSeek-V3 / MiMo design. Depth k at position i takes the previous
state ``h^{k-1}[i]`` (the trunk's last hidden state for k = 1, the previous depth's block output for
k > 1) and the embedding of token ``i+k`` (the trunk's embedding table), and computes

    x = W_k [RMSNorm(h^{k-1}[i]); RMSNorm(Emb(y[i+k]))]      (2H -> H, no bias)
    h^k[i] = Block_k(x)                                        (one decoder block of the trunk's family)
    logits^k[i] = Head(RMSNorm_k(h^k[i]))                      (own final norm, the trunk's output head)

so ``logits^k[i]`` predicts token ``i+k+1``. The block uses the trunk's rotary module, the trunk's
config object (so ``occ_theory.theory.eager_attention(model)`` switches it too) and the causal mask
of ``transformers.masking_utils.create_causal_mask``.

Gradient cuts (``grad_cut``), docs/theory.md section 1:

* ``"full"``: the MTP loss reaches every shared parameter it touches.
* ``"detach"``: the trunk state, the token embeddings and the output head weight enter the MTP
  path detached, so the MTP loss gives exactly zero gradient on every θ_S parameter.
* ``"detach_encoder"``: the trunk state and the embeddings are detached, the head is not, so
  the output head still gets MTP gradient. With tied embeddings the head *is* the embedding
  matrix, which then gets MTP gradient through its use as the head (only).

Shared parameters are always read through ``self.trunk`` at call time, never cached, so
``torch.func.functional_call`` substitutions take effect everywhere.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.masking_utils import create_causal_mask

from .config import ARCH_FIELDS, DEFAULT_MTP_INIT, FAMILIES, ModelConfig, mismatches

GRAD_CUTS = ("full", "detach", "detach_encoder")
_HF_CLASSES = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
               "qwen3": (Qwen3Config, Qwen3ForCausalLM)}


def check_grad_cut(grad_cut: str) -> str:
    if grad_cut not in GRAD_CUTS:
        raise ValueError(f"grad_cut must be one of {GRAD_CUTS}, got {grad_cut!r}")
    return grad_cut


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions of a (left- or right-) padded batch: ``cumsum(mask) - 1`` clamped at 0, (B, T) long.

    The first real token of every row is at position 0; pads before it are at 0 too, pads after the
    last real token repeat its position. The sampler uses the same rule.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, T), got shape {tuple(attention_mask.shape)}")
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def _first_output(out: Any) -> Tensor:
    """Decoder layers return a tensor in recent transformers, a tuple in older ones."""
    return out[0] if isinstance(out, tuple) else out


class MTPModule(nn.Module):
    """One MTP depth: two input RMSNorms, a 2H -> H projection, one decoder block, a final RMSNorm."""

    def __init__(self, hf_config: Any, layer_cls: type[nn.Module], norm_cls: type[nn.Module]) -> None:
        super().__init__()
        hidden, eps = hf_config.hidden_size, hf_config.rms_norm_eps
        self.hnorm = norm_cls(hidden, eps=eps)
        self.enorm = norm_cls(hidden, eps=eps)
        self.proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.block = layer_cls(hf_config, layer_idx=_full_attention_layer(hf_config))
        self.norm = norm_cls(hidden, eps=eps)

    def reset_parameters(self, std: float) -> None:
        """The trunk's initialisation: N(0, std²) linear weights, zero biases, unit norm scales."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, type(self.norm)):
                nn.init.ones_(module.weight)

    def copy_last(self, base: nn.Module) -> None:
        """``mtp_init="copy_last"``: the block and the final norm become copies of the trunk's last
        decoder block and final norm (``base`` is ``trunk.base_model``); the projection stays as it is."""
        self.block.load_state_dict(base.layers[-1].state_dict())
        self.norm.load_state_dict(base.norm.state_dict())


def _full_attention_layer(hf_config: Any) -> int:
    """A layer index whose type is full attention (the MTP block never uses a KV cache)."""
    types = getattr(hf_config, "layer_types", None) or []
    return next((i for i, t in enumerate(types) if t == "full_attention"), 0)


class OCCModel(nn.Module):
    """``.trunk`` (a transformers causal LM) + ``.mtp`` (``nn.ModuleList`` of D ``MTPModule``)."""

    def __init__(self, trunk: nn.Module, config: ModelConfig) -> None:
        super().__init__()
        self.trunk = trunk
        self.config = config
        base = trunk.base_model
        layer_cls, norm_cls = type(base.layers[0]), type(base.norm)
        hf = trunk.config
        if any(t != "full_attention" for t in (getattr(hf, "layer_types", None) or [])):
            raise ValueError("trunks with sliding-window attention layers are not supported (layer_types)")
        self.mtp = nn.ModuleList(MTPModule(hf, layer_cls, norm_cls) for _ in range(config.mtp_depths))
        std = float(getattr(hf, "initializer_range", 0.02))
        for module in self.mtp:
            module.reset_parameters(std)
            if config.mtp_init == "copy_last":
                module.copy_last(base)
        ref = trunk.get_input_embeddings().weight
        self.mtp.to(device=ref.device, dtype=ref.dtype)
        # nn.Embedding(padding_idx=...) zeroes the pad row's lookup gradient although the forward uses it
        # (a sampled response may contain the pad token): the gradient would not be the derivative of J.
        trunk.get_input_embeddings().padding_idx = None

    @property
    def num_mtp(self) -> int:
        return len(self.mtp)

    # -- parameter groups ---------------------------------------------------------------------

    def shared_param_names(self) -> list[str]:
        """θ_S: every trunk parameter (embeddings, blocks, final norm, head), tied ones once."""
        return [name for name, _ in self.named_parameters() if name.startswith("trunk.")]

    def mtp_param_names(self) -> list[str]:
        """θ_M: the parameters only the MTP modules use."""
        return [name for name, _ in self.named_parameters() if name.startswith("mtp.")]

    # -- forward ------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        grad_cut: str = "full",
        with_mtp: bool = True,
    ) -> tuple[Tensor, list[Tensor]]:
        """``(logits, mtp_logits)``.

        ``logits`` (B, T, V): position i predicts token i+1. ``mtp_logits[k-1]`` (B, T-k, V) for
        depth k: position i predicts token i+k+1 (empty list when D = 0 or ``with_mtp=False``).
        Without ``position_ids``, positions come from ``attention_mask`` (``position_ids_from_mask``)
        for the trunk and every MTP depth alike.
        """
        check_grad_cut(grad_cut)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = position_ids_from_mask(attention_mask)
            else:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        mask4d = causal_mask(self.trunk, attention_mask, position_ids, input_ids.shape)
        hidden = self.trunk.base_model(
            input_ids=input_ids, attention_mask=mask4d, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (B, T, H)
        logits = self.trunk.get_output_embeddings()(hidden)  # (B, T, V)
        if not with_mtp:
            return logits, []
        return logits, self._mtp_logits(hidden, input_ids, mask4d, position_ids, grad_cut)

    def _head(self, x: Tensor, detach: bool) -> Tensor:
        head = self.trunk.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if detach:
            weight = weight.detach()
            bias = bias.detach() if bias is not None else None
        return F.linear(x, weight, bias)

    def _mtp_logits(
        self, hidden: Tensor, input_ids: Tensor, mask4d: Tensor | None, position_ids: Tensor, grad_cut: str
    ) -> list[Tensor]:
        cut_inputs, cut_head = grad_cut != "full", grad_cut == "detach"
        base = self.trunk.base_model
        embed = self.trunk.get_input_embeddings()
        prev = hidden.detach() if cut_inputs else hidden  # h^0, (B, T, H)
        seq = input_ids.shape[1]
        out = []
        for k, module in enumerate(self.mtp, start=1):
            n = max(seq - k, 0)  # depth k has a state at positions 0 .. T-k-1
            emb = embed(input_ids[:, k:])  # embeddings of tokens k .. T-1, (B, n, H)
            if cut_inputs:
                emb = emb.detach()
            x = module.proj(torch.cat([module.hnorm(prev[:, :n]), module.enorm(emb)], dim=-1))  # (B, n, H)
            pos = position_ids[..., :n]
            mask = mask4d[:, :, :n, :n] if mask4d is not None else None  # the first n positions' mask
            x = _first_output(
                module.block(x, attention_mask=mask, position_ids=pos, position_embeddings=base.rotary_emb(x, pos))
            )
            out.append(self._head(module.norm(x), detach=cut_head))  # (B, n, V)
            prev = x
        return out


def causal_mask(trunk: nn.Module, attention_mask: Tensor | None, position_ids: Tensor | None,
                shape: tuple[int, ...]) -> Tensor | None:
    """The trunk's causal mask for a (B, T) batch, from ``create_causal_mask`` (so in the format of the
    current attention implementation), with every query allowed to attend to itself.

    ``None`` when the implementation needs no mask (SDPA without padding). Letting padding queries
    see themselves changes nothing at real positions (their keys stay masked) but keeps padding
    rows from being fully masked: eager attention of a float64 model turns a fully masked row
    into NaN (its float32 softmax sees -inf everywhere), and 0·NaN then leaks into real positions.
    """
    weight = trunk.get_input_embeddings().weight
    shape_probe = torch.empty((shape[0], shape[1], 0), dtype=weight.dtype, device=weight.device)
    pos = position_ids if attention_mask is not None else None
    mask = create_causal_mask(trunk.config, shape_probe, attention_mask, None, position_ids=pos)
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dim() != 4:
        impl = getattr(trunk.config, "_attn_implementation", None)
        raise ValueError(f"attention implementation {impl!r} is not supported here; use 'sdpa' or 'eager'")
    eye = torch.eye(mask.shape[-2], mask.shape[-1], dtype=torch.bool, device=mask.device)
    return mask | eye if mask.dtype == torch.bool else mask.masked_fill(eye, 0.0)


# -- parameter names ----------------------------------------------------------------------------

_WRAPPERS = ("module", "_orig_mod", "trunk")
_BLOCK = re.compile(r"^model\.layers\.(\d+)\.")


def module_group(name: str) -> str:
    """The module a parameter belongs to: "embed", "block.{i}", "final_norm", "head" or "mtp".

    Accepts ``OCCModel`` names (``trunk.model.layers.0.mlp.up_proj.weight``), bare trunk names and
    names under DDP / ``torch.compile`` wrappers. With tied embeddings the single shared matrix is
    named after the embedding, so it is counted once, under "embed".
    """
    parts = name.split(".")
    while parts and parts[0] in _WRAPPERS:
        parts = parts[1:]
    rest = ".".join(parts)
    if rest.startswith("mtp."):
        return "mtp"
    if rest.startswith("model.embed_tokens."):
        return "embed"
    if (m := _BLOCK.match(rest)) is not None:
        return f"block.{int(m.group(1))}"
    if rest.startswith("model.norm."):
        return "final_norm"
    if rest.startswith("lm_head."):
        return "head"
    raise ValueError(f"parameter {name!r} belongs to no known module group")


# -- building -----------------------------------------------------------------------------------


def _hf_config(cfg: ModelConfig, vocab_size: int, special_ids: Mapping[str, int | None]) -> Any:
    config_cls, _ = _HF_CLASSES[cfg.family]
    return config_cls(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        tie_word_embeddings=cfg.tie_word_embeddings,
        attn_implementation="sdpa",
        **({"head_dim": cfg.head_dim} if cfg.family == "qwen3" else {}),  # Qwen3Config's default is 128
        **special_ids,
    )


def config_from_hf(hf: Any, mtp_depths: int, init_from: str | None = None, mtp_init: str = DEFAULT_MTP_INIT
                   ) -> ModelConfig:
    """The ``ModelConfig`` describing an existing transformers trunk config."""
    family = getattr(hf, "model_type", None)
    check_family(family)
    rope = getattr(hf, "rope_parameters", None)
    theta = rope.get("rope_theta") if isinstance(rope, Mapping) else None
    theta = theta if theta is not None else getattr(hf, "rope_theta", 10000.0)
    return ModelConfig(
        family=family, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        max_position_embeddings=hf.max_position_embeddings, tie_word_embeddings=bool(hf.tie_word_embeddings),
        mtp_depths=mtp_depths, mtp_init=mtp_init, init_from=init_from, vocab_size=hf.vocab_size,
        rms_norm_eps=float(hf.rms_norm_eps), rope_theta=float(theta),
    )


def _special_ids(tokenizer: Any) -> dict[str, int | None]:
    if tokenizer is None:
        return {}
    return {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id}


def _check_vocab(vocab_size: int, tokenizer: Any, where: str) -> None:
    if tokenizer is not None and len(tokenizer) > vocab_size:
        raise ValueError(f"vocab_size={vocab_size} ({where}) is smaller than the tokenizer's {len(tokenizer)} tokens")


def check_family(model_type: Any, where: str = "trunk") -> None:
    """``ValueError`` unless ``model_type`` is a decoder-only family whose layer class the MTP block reuses."""
    if model_type not in FAMILIES:
        raise ValueError(f"{where} has model_type {model_type!r}, which is not supported: the MTP module reuses the "
                         f"trunk's decoder layer class, known for the decoder-only families {', '.join(FAMILIES)}")


def _from_pretrained_args(path: str) -> tuple[str, dict[str, Any]]:
    """``(directory, extra kwargs)`` for ``from_pretrained``: a ``.gguf`` file is read with ``gguf_file=``."""
    if os.path.isfile(path) and path.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}
    if not os.path.exists(path):
        raise ValueError(f"trunk checkpoint {path!r} does not exist")
    if not os.path.isdir(path):
        raise ValueError(f"trunk checkpoint {path!r} is neither a directory nor a .gguf file")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path!r} is not a transformers checkpoint: config.json is missing")
    return path, {}


def load_trunk(path: str, dtype: torch.dtype | None = None) -> nn.Module:
    """A local HF causal-LM checkpoint directory or ``.gguf`` file as a trunk (SDPA attention, offline).

    The config is checked before any weight is read: its ``model_type`` must be one of ``FAMILIES``
    and its recorded ``architectures`` (when any) a ``...ForCausalLM``, so an encoder or a
    sequence-classification checkpoint is refused rather than given a random output head.
    """
    where, extra = _from_pretrained_args(path)
    try:
        hf = AutoConfig.from_pretrained(where, local_files_only=True, **extra)
    except Exception as err:  # transformers raises OSError, ValueError, ImportError (gguf missing), ...
        hint = " (GGUF files need the optional extra: pip install 'occ-theory[gguf]')" if extra else ""
        raise ValueError(f"cannot read the model config of {path!r}: {type(err).__name__}: {err}{hint}") from err
    check_family(getattr(hf, "model_type", None), f"checkpoint {path!r}")
    archs = getattr(hf, "architectures", None) or []
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise ValueError(f"checkpoint {path!r} is not a causal LM: its architectures are {archs} (need ...ForCausalLM)")
    try:
        trunk = AutoModelForCausalLM.from_pretrained(
            where, local_files_only=True, attn_implementation="sdpa", dtype=dtype or torch.float32, **extra
        )
    except Exception as err:  # transformers raises OSError, SafetensorError, RuntimeError, ...
        raise ValueError(f"cannot load the trunk weights in {path!r}: {type(err).__name__}: {err}") from err
    return trunk


def build_model(config: ModelConfig | Mapping[str, Any], tokenizer: Any = None, seed: int | None = None) -> OCCModel:
    """A fresh ``OCCModel`` (or MTP modules on an ``init_from`` trunk), float32, on CPU, SDPA attention.

    ``vocab_size`` comes from the tokenizer when the config leaves it unset; the model vocabulary
    must cover the tokenizer. ``seed`` makes the initialisation reproducible without touching the
    global RNG state (it runs inside ``torch.random.fork_rng``).
    """
    cfg = ModelConfig.from_dict(config)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        if cfg.init_from is not None:
            trunk = load_trunk(cfg.init_from)
            resolved = config_from_hf(trunk.config, cfg.mtp_depths, cfg.init_from, cfg.mtp_init)
            wrong = mismatches(resolved, {k: getattr(cfg, k) for k in ARCH_FIELDS if getattr(cfg, k) is not None})
            if wrong:
                raise ValueError(f"init_from checkpoint {cfg.init_from!r} does not match the config: " + "; ".join(wrong))
            _check_vocab(resolved.vocab_size, tokenizer, f"of the checkpoint {cfg.init_from!r}")
        else:
            vocab = cfg.vocab_size if cfg.vocab_size is not None else (len(tokenizer) if tokenizer is not None else None)
            if vocab is None:
                raise ValueError("vocab_size is unset and no tokenizer was given to take it from")
            _check_vocab(vocab, tokenizer, "of the config")
            resolved = cfg.replace(vocab_size=vocab)
            _, model_cls = _HF_CLASSES[cfg.family]
            trunk = model_cls(_hf_config(resolved, vocab, _special_ids(tokenizer)))
        model = OCCModel(trunk, resolved)
    return model.float().eval()
