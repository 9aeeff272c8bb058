"""A tiny checkpoint and tiny RL configs for the trainer tests."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from occ_theory.models import ModelConfig, build_model, build_tokenizer, save_model
from occ_theory.rl.batch import RLBatch
from occ_theory.train.config import Config, load_config

TINY = ModelConfig(family="qwen2", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                   max_position_embeddings=128, mtp_depths=1)


def make_checkpoint(path: Path) -> Path:
    tok = build_tokenizer()
    return Path(save_model(build_model(TINY, tok, seed=0), path, tok))


def rl_config(ckpt: Path, regime: str, *extra: str) -> Config:
    return load_config(None, [
        f"rl.init={ckpt}", f"rl.regime={regime}", "rl.steps=4", "rl.prompts_per_rollout=2", "rl.group_size=4",
        "rl.minibatches=2", "rl.max_new_tokens=10", "rl.lr=1e-3", "diag.every=2", "diag.curve_points=5",
        "diag.bootstrap=10", "eval.size=3", "eval.samples=1", "eval.max_new_tokens=10", "rl.eval_size=2",
        "task.suites=[addition,linear]", "threads=1", *extra])


def rl_trainer(ckpt: Path, out_dir: Path, regime: str, *extra: str):
    """An ``RLTrainer`` of ``rl_config(ckpt, regime, *extra)`` writing into ``out_dir``."""
    from occ_theory.train.rl import RLTrainer
    from occ_theory.train.run import RunContext

    cfg = rl_config(ckpt, regime, *extra)
    return RLTrainer(cfg, RunContext.create(cfg, regime, out_dir=out_dir))


def with_signal(trainer, mb: RLBatch, seed: int = 0, noise: float = 0.05) -> RLBatch:
    """A minibatch with random advantages and an old policy slightly off the current one (ratios ≠ 1)."""
    g = torch.Generator().manual_seed(seed)
    mb, _ = trainer.fill_old_logp(mb)
    noise = noise * torch.randn(mb.old_logp.shape, generator=g) * mb.response_mask
    return replace(mb, advantages=torch.randn(mb.size, generator=g), old_logp=mb.old_logp + noise)


def inject_random_advantages(monkeypatch, seed: int = 0, zero_rollouts: int = 0) -> None:
    """Rollouts of an untrained model all score 0; give them seeded random advantages instead, so every
    regime has a learning signal (the reward itself is tested with the tasks). The first ``zero_rollouts``
    rollouts keep all advantages 0 (no signal at all)."""
    from occ_theory.train.rl import RLTrainer

    original = RLTrainer.rollout

    def rollout(self, *args, **kwargs):
        batch, rec = original(self, *args, **kwargs)
        gen = torch.Generator().manual_seed(seed * 100_003 + self.rollouts)  # a function of the run's state
        adv = torch.zeros(batch.size) if self.rollouts < zero_rollouts else torch.randn(batch.size, generator=gen)
        return replace(batch, advantages=adv), rec

    monkeypatch.setattr(RLTrainer, "rollout", rollout)
