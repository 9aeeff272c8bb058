"""Where computations run: the torch device and CPU threads of a command (config keys ``device``, ``threads``).

Below ``train/`` and ``diagnostics/``: every command (``occ sft``, ``rl``, ``eval``, ``probe``) sets them the same way.
"""

from __future__ import annotations

import os

import torch


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("config key 'device': cuda was asked for but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per process under torchrun
        name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return torch.device(name)


def set_threads(threads: int) -> None:
    """torch's CPU threads: ``threads`` > 0 sets them (config key ``threads``); 0 leaves torch's default."""
    if threads > 0:
        torch.set_num_threads(threads)
