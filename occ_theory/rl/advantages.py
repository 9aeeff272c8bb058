"""Group-relative advantages (GRPO): one scalar per response, shared by its tokens."""

from __future__ import annotations

import torch
from torch import Tensor

ADV_EPS = 1e-6


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = ADV_EPS) -> Tensor:
    """``A = (r − mean_group) / (std_group + eps)`` (``scale="group"``) or ``r − mean_group`` (``"none"``).

    ``rewards`` is (N,) ordered group by group (G consecutive responses per prompt). ``std`` is the
    unbiased sample standard deviation, as in verl's GRPO. A group whose rewards are all equal
    gets advantage exactly 0 (no signal, no division by zero).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"group_size={group_size} must be >= 2 and divide the {rewards.numel()} rewards")
    if scale not in ("group", "none"):
        raise ValueError(f"scale must be 'group' or 'none', got {scale!r}")
    r = rewards.to(torch.float32).view(-1, group_size)  # (prompts, G)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)
