"""Test-wide settings: one torch thread (the test models are tiny; threads only add contention)."""

import torch

torch.set_num_threads(1)
