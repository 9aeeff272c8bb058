"""Supervised warm-up with MTP: ``occ sft --config tiny``.

Variant: each sequence is ``<bos> prompt target <eos>`` (right-padded); the loss is the next-token
cross-entropy of the target and EOS tokens plus ``sft.mtp_coef`` times the mean over MTP depths of
each depth's cross-entropy on the same tokens (depth k predicts token t from the state at
t−k−1). AdamW, linear warm-up then cosine decay to ``lr_min_ratio·lr``, global-norm clipping.
Prompts are drawn from the training split of the configured suites. Greedy held-out accuracy every
``eval_every`` steps and at the end; the final checkpoint is ``<run>/checkpoint``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..models import align_logprobs, build_model, build_tokenizer, save_model
from ..rl.objectives import token_mean
from ..tasks import Problem
from .config import Config
from .evaluate import evaluate_suites, prompt_ids
from .logging import MetricsWriter, Progress
from .run import RunContext, problem_stream


def encode(tokenizer: Any, problem: Problem) -> tuple[list[int], list[int]]:
    """Token ids of ``<bos> prompt target <eos>`` and the loss mask (1 on target and EOS)."""
    prompt = prompt_ids(tokenizer, problem.prompt)
    target = [*tokenizer.encode(problem.target, add_special_tokens=False), tokenizer.eos_token_id]
    return prompt + target, [0] * len(prompt) + [1] * len(target)


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``(input_ids, attention_mask, loss_mask)``, each (B, L)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    loss = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (x, m) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        attn[i, : len(x)] = 1
        loss[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return ids, attn, loss


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def sft_losses(model: torch.nn.Module, ids: Tensor, attn: Tensor, loss_mask: Tensor) -> dict[str, Tensor]:
    """Next-token NLL and accuracy, and per MTP depth k its NLL and accuracy (predicting token t from
    position t−k−1: depth 1 is next-next-token accuracy), on target tokens."""
    logits, mtp_logits = model(ids, attention_mask=attn)
    logp, mtp = align_logprobs(logits, mtp_logits, ids)
    out = {"nll": -token_mean(logp, loss_mask)}
    with torch.no_grad():
        out["acc"] = token_mean((logits[:, :-1].argmax(-1) == ids[:, 1:]).float(), loss_mask[:, 1:])
    for k, (q, lg) in enumerate(zip(mtp, mtp_logits), start=1):
        valid = loss_mask * torch.isfinite(q).to(loss_mask.dtype)
        out[f"mtp_nll_d{k}"] = -token_mean(q, valid)
        with torch.no_grad():
            hit = (lg[:, : ids.shape[1] - k - 1].argmax(-1) == ids[:, k + 1:]).float()
            out[f"mtp_acc_d{k}"] = token_mean(hit, valid[:, k + 1:])
    return out


def run_sft(cfg: Config, run_name: str | None = None, out_dir: Path | None = None) -> Path:
    """Train from scratch (or from ``model.init_from``); returns the checkpoint directory."""
    ctx = RunContext.create(cfg, kind="sft", run_name=run_name, out_dir=out_dir)
    sc = cfg.sft
    tokenizer = build_tokenizer()
    model = build_model(cfg.model, tokenizer, seed=cfg.seed).to(ctx.device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=sc.lr, weight_decay=sc.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, sc.warmup, sc.steps, sc.lr_min_ratio))
    stream = problem_stream(cfg, np.random.default_rng(cfg.seed))
    ctx.begin()
    ctx.log(f"SFT {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {sc.steps} steps "
            f"on {', '.join(cfg.task.suites)} -> {ctx.run_dir}")
    progress = Progress("sft", sc.steps)
    with MetricsWriter(ctx.run_dir) as writer:
        for step in range(1, sc.steps + 1):
            t0 = time.perf_counter()
            ids, attn, loss_mask = (t.to(ctx.device) for t in
                                    collate([encode(tokenizer, next(stream)) for _ in range(sc.batch_size)],
                                            tokenizer.pad_token_id))
            with ctx.autocast():
                losses = sft_losses(model, ids, attn, loss_mask)
            mtp_terms = [v for k, v in losses.items() if k.startswith("mtp_nll")]
            loss = losses["nll"] + (sc.mtp_coef * torch.stack(mtp_terms).mean() if mtp_terms else 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), sc.grad_clip) if sc.grad_clip > 0 else None
            opt.step()
            sched.step()
            rec: dict[str, Any] = {"step": step, "sft/loss": float(loss.detach()), "sft/lr": sched.get_last_lr()[0],
                                   "perf/step_s": time.perf_counter() - t0}
            rec |= {f"sft/{k}": float(v.detach()) for k, v in losses.items()}
            if gnorm is not None:
                rec["sft/grad_norm"] = float(gnorm)
            if (sc.eval_every and step % sc.eval_every == 0) or step == sc.steps:
                res = evaluate_suites(model, tokenizer, size=sc.eval_size, samples=0,
                                      max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.eval.seed,
                                      difficulty=cfg.task.difficulty, autocast_dtype=ctx.autocast_dtype)
                rec |= {f"eval/{s}/greedy_acc": e["greedy_acc"] for s, e in res["suites"].items()}
                rec["eval/mean_greedy_acc"] = res["mean_greedy_acc"]
            writer.write(rec)
            progress.update(step, loss=rec["sft/loss"], nll=rec["sft/nll"])
    model.eval()
    ckpt = Path(save_model(model, ctx.run_dir / "checkpoint", tokenizer))
    ctx.log(f"SFT done in {time.perf_counter() - ctx.start:.0f}s; checkpoint {ckpt}")
    return ckpt
