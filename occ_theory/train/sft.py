"""Supervised warm-up with MTP: ``occ sft --config tiny``; MTP warm-up of a pretrained model:
``occ sft --model PATH --set sft.train=mtp``.

Variant: each sequence is the prompt (``evaluate.prompt_ids``: BOS or the chat template) then
target and EOS (right-padded); the loss is the next-token cross-entropy of the target and EOS
tokens plus ``sft.mtp_coef`` times the mean over MTP depths of each depth's cross-entropy on the
same tokens (depth k predicts token t from the state at t−k−1). AdamW, linear warm-up then cosine
decay to ``lr_min_ratio·lr``, global-norm clipping. Prompts are drawn from the training split of
the configured suites (in natural language for a pretrained model's tokenizer: ``evaluate.tasks_for``).
Greedy held-out accuracy every ``eval_every`` steps and at the end; the final checkpoint is
``<run>/checkpoint``, with the tokenizer the model was trained with (the ``model.init_from``
checkpoint's own, else the character tokenizer). A user dataset (``task.user_data``) is trained on
its train split and evaluated on its held-out one (``UserTask.held_out``). A step whose loss or
gradient is not finite is skipped and counted, ``sft.max_bad_steps`` in a row stop the run
(``train.guard``); weights that turn non-finite stop it, and no non-finite checkpoint is saved.

``sft.train=mtp`` trains θ_M alone with the trunk frozen (the loss is the mean MTP cross-entropy;
the trunk's logits, and so the policy, do not change); ``sft.data=self`` makes the targets the
model's own sampled responses to the training prompts (self-distillation, temperature 1,
``eval.max_new_tokens`` long). Then the held-out measure is the MTP top-1 agreement with the main
head per depth on greedy generations (``evaluate.mtp_agreement``), before training and at every
evaluation; ``<run>/mtp_agreement.json`` holds the first and the last.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..atomic import atomic_write_text
from ..errors import RunStopped
from ..models import align_logprobs, build_model, build_tokenizer, load_tokenizer, save_model
from ..rl.objectives import token_mean
from ..rl.sampler import generate
from ..tasks import Problem
from .config import Config
from .evaluate import mtp_agreement, prompt_ids, tasks_for
from .guard import StepGuard, params_finite
from .logging import MetricsWriter, Progress
from .run import RunContext, check_user_data, evaluate_run, problem_stream, training_data, training_tasks


def encode(tokenizer: Any, problem: Problem) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (``prompt_ids``), target and EOS, and the loss mask (1 on target and EOS)."""
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


def self_distillation_batch(model: torch.nn.Module, tokenizer: Any, problems: list[Problem], max_new_tokens: int,
                            generator: torch.Generator, autocast_dtype: torch.dtype | None) -> tuple[Tensor, ...]:
    """``(input_ids, attention_mask, loss_mask)`` of the model's own responses (temperature 1) to the
    prompts, the loss on the generated tokens (EOS included)."""
    model.eval()
    ro = generate(model, [prompt_ids(tokenizer, p.prompt) for p in problems], max_new_tokens, eos_id=tokenizer.eos_token_id,
                  pad_id=tokenizer.pad_token_id, generator=generator, autocast_dtype=autocast_dtype)
    model.train()
    return ro.input_ids, ro.attention_mask, ro.response_mask.float()


def run_sft(cfg: Config, run_name: str | None = None, out_dir: Path | None = None) -> Path:
    """Train from scratch (or from ``model.init_from``, with that checkpoint's tokenizer); returns the
    checkpoint directory."""
    ctx = RunContext.create(cfg, kind="sft", run_name=run_name, out_dir=out_dir)
    sc = cfg.sft
    mtp_only = sc.train == "mtp"
    if sc.data == "self" and not mtp_only:
        raise ValueError("config key 'sft.data': 'self' (the model's own responses) needs sft.train=mtp")
    init = cfg.model.init_from
    tokenizer = load_tokenizer(init) if init is not None else build_tokenizer()
    model = build_model(cfg.model, tokenizer, seed=cfg.seed).to(ctx.device)
    if mtp_only:
        if model.num_mtp == 0:
            raise ValueError("config key 'sft.train': 'mtp' trains the MTP modules, but model.mtp_depths is 0")
        model.trunk.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    opt = torch.optim.AdamW(params, lr=sc.lr, weight_decay=sc.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, sc.warmup, sc.steps, sc.lr_min_ratio))
    data = training_tasks(cfg)
    warnings = check_user_data(data, tokenizer, model.trunk.config.max_position_embeddings,
                               cfg.eval.max_new_tokens)
    tasks = tasks_for(tokenizer, data, cfg.task.parse)
    stream = problem_stream(cfg, np.random.default_rng(cfg.seed), tasks)
    sample_gen = torch.Generator(device=ctx.device).manual_seed(cfg.seed)
    held_rng = np.random.default_rng(cfg.eval.seed)
    held_out = [prompt_ids(tokenizer, tasks[i % len(tasks)].sample(held_rng, "eval").prompt)
                for i in range(sc.eval_size)] if mtp_only else []

    def agreement() -> dict[str, float]:
        found = mtp_agreement(model, tokenizer, held_out, cfg.eval.max_new_tokens, autocast_dtype=ctx.autocast_dtype)
        return {f"eval/mtp_agree_d{k}": v for k, v in found.items()}

    guard = StepGuard(sc.max_bad_steps, "sft.max_bad_steps")
    ctx.begin()
    for w in warnings:
        ctx.log(w)
    ctx.log(f"SFT {sum(p.numel() for p in params) / 1e6:.2f}M trained of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
            f"parameters ({sc.train}, data {sc.data}), {sc.steps} steps on {training_data(cfg)} -> {ctx.run_dir}")
    before = agreement() if mtp_only else {}
    if before:
        ctx.log("MTP top-1 agreement before: " + ", ".join(f"{k.rsplit('_', 1)[1]} {v:.3f}" for k, v in before.items()))
    progress = Progress("sft", sc.steps)
    rec: dict[str, Any] = {}
    with MetricsWriter(ctx.run_dir) as writer:
        for step in range(1, sc.steps + 1):
            t0 = time.perf_counter()
            problems = [next(stream) for _ in range(sc.batch_size)]
            if sc.data == "self":
                batch = self_distillation_batch(model, tokenizer, problems, cfg.eval.max_new_tokens, sample_gen,
                                                ctx.autocast_dtype)
            else:
                batch = collate([encode(tokenizer, p) for p in problems], tokenizer.pad_token_id)
            ids, attn, loss_mask = (t.to(ctx.device) for t in batch)
            with ctx.autocast():
                losses = sft_losses(model, ids, attn, loss_mask)
            mtp_terms = [v for k, v in losses.items() if k.startswith("mtp_nll")]
            if mtp_only:
                loss = torch.stack(mtp_terms).mean()
            else:
                loss = losses["nll"] + (sc.mtp_coef * torch.stack(mtp_terms).mean() if mtp_terms else 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params, sc.grad_clip or float("inf"))
            finite = guard.check(bool(torch.isfinite(loss.detach())) and bool(torch.isfinite(gnorm)), step)
            if finite:  # a non-finite step is skipped: neither the weights nor the schedule move
                opt.step()
                sched.step()
                if not params_finite(params):
                    raise RunStopped(f"the weights became non-finite at step {step} (the run diverged: lower sft.lr "
                                     "or set sft.grad_clip); no checkpoint saved")
            opt.zero_grad(set_to_none=True)
            rec = {"step": step, "sft/loss": float(loss.detach()), "sft/lr": sched.get_last_lr()[0],
                   "perf/step_s": time.perf_counter() - t0}
            rec |= {f"sft/{k}": float(v.detach()) for k, v in losses.items()}
            rec |= {"sft/grad_norm": float(gnorm), "sft/skipped": not finite, "sft/bad_steps_total": guard.total}
            if (sc.eval_every and step % sc.eval_every == 0) or step == sc.steps:
                if mtp_only:  # the trunk is frozen: its accuracy cannot change, the drafts' agreement can
                    rec |= agreement()
                else:
                    res = evaluate_run(model, tokenizer, cfg, sc.eval_size, 0, tasks, ctx.autocast_dtype)
                    rec |= {f"eval/{s}/greedy_acc": e["greedy_acc"] for s, e in res.get("suites", {}).items()}
                    if res:
                        rec["eval/mean_greedy_acc"] = res["mean_greedy_acc"]
            writer.write(rec)
            progress.update(step, loss=rec["sft/loss"], nll=rec["sft/nll"])
    model.eval()
    ckpt = Path(save_model(model, ctx.run_dir / "checkpoint", tokenizer))
    if mtp_only:
        after = {k: rec[k] for k in before}
        atomic_write_text(ctx.run_dir / "mtp_agreement.json", json.dumps({"before": before, "after": after}, indent=2))
        ctx.log("MTP top-1 agreement after: " + ", ".join(f"{k.rsplit('_', 1)[1]} {v:.3f}" for k, v in after.items()))
    ctx.log(f"SFT done in {time.perf_counter() - ctx.start:.0f}s; checkpoint {ckpt}")
    return ckpt
