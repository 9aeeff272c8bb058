"""Models: a transformers trunk with chained MTP modules, the character tokenizer, save/load,
and pretrained checkpoints (``load_pretrained``).

See ``mtp.py`` for the architecture and the gradient cuts, ``logprobs.py`` for the alignment
convention of ``logp`` / ``mtp_logp``, ``io.py`` for the checkpoint format.
"""

from .config import FAMILIES, MTP_INITS, ModelConfig
from .io import load_model, read_model_config, save_model
from .logprobs import align_logprobs, aligned_logprobs, selective_log_softmax
from .mtp import (
    GRAD_CUTS,
    MTPModule,
    OCCModel,
    build_model,
    config_from_hf,
    module_group,
    position_ids_from_mask,
)
from .precision import exact_float64
from .pretrained import is_checkpoint, load_any, load_pretrained
from .tokenizer import SPECIAL_TOKENS, build_tokenizer, is_character_tokenizer, load_tokenizer

__all__ = [
    "FAMILIES",
    "GRAD_CUTS",
    "MTP_INITS",
    "SPECIAL_TOKENS",
    "MTPModule",
    "ModelConfig",
    "OCCModel",
    "align_logprobs",
    "aligned_logprobs",
    "build_model",
    "build_tokenizer",
    "config_from_hf",
    "exact_float64",
    "is_character_tokenizer",
    "is_checkpoint",
    "load_any",
    "load_model",
    "load_pretrained",
    "load_tokenizer",
    "module_group",
    "position_ids_from_mask",
    "read_model_config",
    "save_model",
    "selective_log_softmax",
]
