"""The toolkit's one checkpoint format: a HF-format trunk + MTP weights + tokenizer in one directory.

    <path>/config.json, model.safetensors, ...   the trunk, ``save_pretrained`` (safetensors)
    <path>/mtp.safetensors                         MTP weights, keys relative to ``model.mtp``
    <path>/occ_model.json                          {"format", "version", "dtype", "config": ModelConfig}
    <path>/tokenizer.json, tokenizer_config.json   the tokenizer, when one is given

The directory is written with ``occ_theory.atomic.atomic_dir`` (a temporary sibling, fsynced, then
swapped in), so an interrupted save never leaves a half-written checkpoint at ``path``. Overwriting is allowed only for an existing
checkpoint or an empty directory. The trunk directory is a plain HF checkpoint:
``AutoModelForCausalLM.from_pretrained(path)`` loads it, and ``ModelConfig(init_from=path)``
builds fresh MTP modules on it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_dir
from .config import ModelConfig, mismatches
from .mtp import OCCModel, config_from_hf, load_trunk
from .tokenizer import load_tokenizer

FORMAT = "occ_theory.model"
VERSION = 1
META_FILE = "occ_model.json"
MTP_FILE = "mtp.safetensors"
__all__ = ["load_model", "load_tokenizer", "read_model_config", "save_model", "state_mismatch"]


def save_model(model: OCCModel, path: str | os.PathLike, tokenizer: Any = None) -> str:
    """Write ``model`` (and ``tokenizer``) as a checkpoint directory at ``path``; returns the path."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"cannot save a checkpoint to {path!r}: it exists and is not a directory")
        if os.listdir(path) and not os.path.isfile(os.path.join(path, META_FILE)):
            raise ValueError(f"refusing to overwrite {path!r}: it is a non-empty directory that is not a checkpoint")
    with atomic_dir(Path(path)) as tmp:
        model.trunk.save_pretrained(tmp)
        mtp_state = {k: v.detach().cpu().contiguous() for k, v in model.mtp.state_dict().items()}
        save_file(mtp_state, os.path.join(tmp, MTP_FILE), metadata={"format": FORMAT})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        dtype = str(model.trunk.get_input_embeddings().weight.dtype).removeprefix("torch.")
        meta = {"format": FORMAT, "version": VERSION, "dtype": dtype, "config": model.config.to_dict()}
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
    return path


def state_mismatch(expected: Mapping[str, Any], given: Mapping[str, Any], shown: int = 2) -> str:
    """What keeps state dict ``given`` from loading into a model whose state dict is ``expected``, in one line:
    how many weights are missing, unexpected, or of another shape, with the first ``shown`` of each (PyTorch's own
    message lists every key, kilobytes for a real model)."""
    missing = [k for k in expected if k not in given]
    extra = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
              if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    parts = [f"{len(keys)} {what} (e.g. {', '.join(keys[:shown])})"
             for what, keys in (("weights missing", missing), ("unexpected weights", extra),
                                ("weights of another shape, given vs model", shapes)) if keys]
    return "; ".join(parts) or "the weights match by name and shape"


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The ``ModelConfig`` recorded in a checkpoint, without loading any weights."""
    return ModelConfig.from_dict(_read_meta(os.fspath(path))["config"])


def _read_meta(path: str) -> dict[str, Any]:
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint directory {path!r} does not exist")
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        hint = (" (it is a plain transformers checkpoint: use build_model(ModelConfig(init_from=...)) to put "
                "fresh MTP modules on it)") if os.path.isfile(os.path.join(path, "config.json")) else ""
        raise ValueError(f"{path!r} is not an occ_theory checkpoint: {META_FILE} is missing{hint}")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"corrupt {META_FILE} in {path!r}: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(f"{meta_path!r} is not an occ_theory model description")
    if meta.get("version") != VERSION:
        raise ValueError(f"{meta_path!r} has format version {meta.get('version')!r}; this code reads version {VERSION}")
    return meta


def load_model(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    expect: ModelConfig | Mapping[str, Any] | None = None,
) -> OCCModel:
    """Load a checkpoint written by ``save_model``; the logits equal the saved model's exactly.

    ``expect`` names what the caller needs (a ``ModelConfig``, or a mapping such as
    ``{"vocab_size": len(tokenizer), "mtp_depths": 1}``); any difference is a ``ValueError`` that
    names the field. Missing files, a corrupt weights file or a trunk that disagrees with the
    recorded config are ``ValueError`` too.
    """
    path = os.path.abspath(os.fspath(path))
    meta = _read_meta(path)
    try:
        config = ModelConfig.from_dict(meta["config"])
    except ValueError as err:
        raise ValueError(f"invalid model config in {os.path.join(path, META_FILE)!r}: {err}") from err
    if expect is not None:
        wrong = mismatches(config, expect)
        if wrong:
            raise ValueError(f"checkpoint {path!r} does not match what was asked: " + "; ".join(wrong))
    mtp_path = os.path.join(path, MTP_FILE)
    if not os.path.isfile(mtp_path):
        raise ValueError(f"checkpoint {path!r} is incomplete: {MTP_FILE} is missing")
    dtype = getattr(torch, str(meta.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{META_FILE} in {path!r} names an unknown dtype {meta.get('dtype')!r}")
    trunk = load_trunk(path, dtype=dtype)
    wrong = mismatches(config_from_hf(trunk.config, config.mtp_depths), config.replace(init_from=None))
    if wrong:
        raise ValueError(f"the trunk in {path!r} disagrees with {META_FILE}: " + "; ".join(wrong))
    with torch.random.fork_rng(devices=[]):  # the MTP init (overwritten below) must not consume the global RNG
        model = OCCModel(trunk, config)
    try:
        state = load_file(mtp_path)
    except Exception as err:  # safetensors raises SafetensorError on a corrupt file
        raise ValueError(f"corrupt MTP weights file {mtp_path!r}: {type(err).__name__}: {err}") from err
    try:
        result = model.mtp.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{mtp_path!r} does not fit the recorded config: {err}") from err
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{mtp_path!r} does not fit mtp_depths={config.mtp_depths}: missing {list(result.missing_keys)[:4]}, "
            f"unexpected {list(result.unexpected_keys)[:4]}"
        )
    model.eval()
    return model.to(device) if device is not None else model
