"""A pretrained model under study: its trunk, MTP modules on top, and its own tokenizer.

``load_pretrained(path)`` takes a local Hugging Face directory of a decoder-only causal LM (one of
``FAMILIES``: Llama, Qwen2, Qwen3) or a ``.gguf`` file (needs ``pip install 'occ-theory[gguf]'``),
and returns ``(OCCModel, tokenizer)``. It is ``build_model(ModelConfig(init_from=path, ...))`` with
the checkpoint's tokenizer: the trunk is θ_S, the D MTP modules (DeepSeek-V3/MiMo: a block of the
trunk's own decoder-layer class, the shared embedding and output head) are θ_M, initialised as
``mtp_init`` says. The result is an ordinary ``OCCModel``: ``aligned_logprobs``, the gradient cuts
of every regime, ``save_model`` / ``load_model`` and the probes treat it like any other.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .config import DEFAULT_MTP_INIT, ModelConfig
from .io import META_FILE, load_model
from .mtp import OCCModel, build_model
from .tokenizer import load_tokenizer


def load_pretrained(
    path: str | os.PathLike,
    mtp_depths: int = 1,
    mtp_init: str = DEFAULT_MTP_INIT,
    *,
    seed: int | None = 0,
    device: str | torch.device | None = None,
) -> tuple[OCCModel, Any]:
    """``(model, tokenizer)`` from a local HF causal-LM directory or ``.gguf`` file, float32, eval mode.

    ``mtp_init``: "fresh" (default, ``DEFAULT_MTP_INIT``) or "copy_last" (each MTP block starts as a copy of the
    trunk's last block and final norm); ``seed`` fixes the fresh parameters without touching the global RNG.
    ``ValueError`` for an unsupported or non-causal-LM checkpoint, a missing tokenizer, or a
    tokenizer with more tokens than the model's vocabulary.
    """
    path = os.fspath(path)
    tokenizer = load_tokenizer(path)
    model = build_model(ModelConfig(init_from=path, mtp_depths=mtp_depths, mtp_init=mtp_init), tokenizer, seed=seed)
    return (model.to(device) if device is not None else model), tokenizer


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True for a directory written by ``save_model`` (it holds ``occ_model.json``)."""
    return os.path.isfile(os.path.join(os.fspath(path), META_FILE))


def load_any(
    path: str | os.PathLike,
    mtp_depths: int = 1,
    mtp_init: str = DEFAULT_MTP_INIT,
    *,
    seed: int | None = 0,
    device: str | torch.device | None = None,
) -> tuple[OCCModel, Any]:
    """``(model, tokenizer)`` from either a toolkit checkpoint (``save_model``: loaded as saved, its MTP
    modules trained; ``mtp_depths`` and ``mtp_init`` do not apply) or a pretrained model (``load_pretrained``:
    fresh MTP modules). What ``occ rl --model``, ``occ eval --model`` and ``occ probe --model`` open."""
    if is_checkpoint(path):
        return load_model(path, device=device), load_tokenizer(path)
    where = os.fspath(path)
    if not (os.path.isfile(os.path.join(where, "config.json")) or (os.path.isfile(where) and where.endswith(".gguf"))):
        raise ValueError(f"{where} is neither a toolkit checkpoint (no {META_FILE}; a run's is RUN/checkpoint or "
                         "RUN/final) nor a Hugging Face model directory (no config.json) nor a .gguf file")
    return load_pretrained(path, mtp_depths, mtp_init, seed=seed, device=device)
