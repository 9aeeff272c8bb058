"""Models, trainers and minibatches the benchmarks measure on (the benchmarks' own, seeded)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..models import ModelConfig, build_model, build_tokenizer, save_model
from ..rl.batch import RLBatch

DIAG_OFF = ("diag.every=0",)
# the instrumented step: every diagnostic forced on every step, except the bootstrap, the Taylor
# halvings and probe bundles: recorder + decomposition in both geometries + an 8-point curve
DIAG_EVERY_STEP = ("diag.every=1", "diag.probes=false", "diag.bootstrap=0", "diag.taylor_halvings=0",
                   "diag.curve_points=8", "diag.curve_heldout=false", "diag.curve_real_step=false")


def checkpoint(path: Path, model: ModelConfig | None = None, seed: int = 0) -> Path:
    """A fresh checkpoint (``ModelConfig.tiny()`` unless ``model``), as ``occ sft`` would write one."""
    tok = build_tokenizer()
    return Path(save_model(build_model(model or ModelConfig.tiny(), tok, seed=seed), path, tok))


def trainer(ckpt: Path, run_dir: Path, regime: str, *overrides: str, threads: int = 1) -> Any:
    """An ``RLTrainer`` on ``ckpt`` with the default RL settings (8 prompts × 8 samples, 4 minibatches,
    40 new tokens) and a step budget no benchmark reaches (the diagnostics schedule covers every step)."""
    from ..train.config import load_config
    from ..train.rl import RLTrainer
    from ..train.run import RunContext

    cfg = load_config(None, [f"rl.init={ckpt}", f"rl.regime={regime}", "rl.steps=1000000", f"threads={threads}",
                             *DIAG_OFF, *overrides])
    return RLTrainer(cfg, RunContext.create(cfg, regime, out_dir=run_dir))


def with_signal(trainer: Any, mb: RLBatch, seed: int = 0, noise: float = 0.05) -> RLBatch:
    """``mb`` with l_old recomputed, then nudged off the current policy (ratios ≠ 1), and random nonzero
    advantages: every regime's loss and gradient then do real work (``tests/rl_fixtures.with_signal``)."""
    g = torch.Generator().manual_seed(seed)
    mb, _ = trainer.fill_old_logp(mb)
    nudge = noise * torch.randn(mb.old_logp.shape, generator=g) * mb.response_mask
    return replace(mb, advantages=torch.randn(mb.size, generator=g), old_logp=mb.old_logp + nudge)


def rollout_minibatch(trainer: Any, seed: int = 0) -> RLBatch:
    """One minibatch of a real rollout of ``trainer`` (its first of ``rl.minibatches``), with signal."""
    batch, _ = trainer.rollout()
    return with_signal(trainer, batch.split(trainer.rc.minibatches, torch.Generator().manual_seed(seed))[0], seed)


def synthetic_minibatch(trainer: Any, rows: int, response_len: int, prompt_lens: tuple[int, int] = (6, 14),
                        seed: int = 0) -> RLBatch:
    """``rows`` left-padded prompts of random length in ``prompt_lens`` and responses of exactly
    ``response_len`` random tokens (no early EOS), with signal: shapes under the benchmark's control."""
    g = torch.Generator().manual_seed(seed)
    vocab = trainer.model.trunk.config.vocab_size
    plen = prompt_lens[1]
    lens = torch.randint(prompt_lens[0], prompt_lens[1] + 1, (rows,), generator=g)
    ids = torch.randint(4, vocab, (rows, plen + response_len), generator=g)  # 0-3 are the special tokens
    cols = torch.arange(plen + response_len)
    attn = (cols[None] >= plen - lens[:, None]).long()  # (B, P+T)
    ids = torch.where(attn > 0, ids, trainer.tokenizer.pad_token_id)
    resp = (cols[None] >= plen).float().expand(rows, -1).contiguous()
    zeros = torch.zeros(rows, plen + response_len)
    mb = RLBatch(ids, attn, resp, torch.zeros(rows), zeros).to(trainer.device)
    return with_signal(trainer, mb, seed)
