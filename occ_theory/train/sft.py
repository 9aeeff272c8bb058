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

SIGINT / SIGTERM stop the run after the step in progress with a checkpoint (``checkpoints/step_N.pt``: model,
optimizer, schedule, the problem stream's and the sampler's generators), and ``occ sft --resume RUN`` continues it,
bit-for-bit on CPU (later metrics records move to ``metrics.orphaned.jsonl``); a write that fails (a full disk)
saves one too when it can. A finished run deletes its checkpoints (``checkpoint/`` is its result). A pretrained
model (``--model``, ``model.init_from``) needs a config written for one (``pretrained: true``), and such a config
needs the model.

``sft.train=mtp`` trains θ_M alone with the trunk frozen (the loss is the mean MTP cross-entropy;
the trunk's logits, and so the policy, do not change); ``sft.data=self`` makes the targets the
model's own sampled responses to the training prompts (self-distillation, temperature 1,
``eval.max_new_tokens`` long). Then the held-out measure is the MTP top-1 agreement with the main
head per depth on greedy generations (``evaluate.mtp_agreement``), before training and at every
evaluation; ``<run>/mtp_agreement.json`` holds the first and the last.

Several processes (``torchrun --nproc_per_node N``): every process draws the same global batch of ``batch_size``
problems and trains on its N-th of the rows; the losses are normalised by the global token counts, so the summed
gradient (``dist.strategy``: ddp all-reduces it, fsdp shards the model with FSDP2 and reduce-scatters it) and every
logged number are those of one process on the whole batch. With ``sft.data=self`` each process samples its own
rows' responses with its own generator. Rank 0 evaluates (on a gathered copy under fsdp) and writes the files.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..atomic import atomic_write_text
from ..errors import Interrupted, RunStopped
from ..models import align_logprobs, build_model, build_tokenizer, load_tokenizer, save_model
from ..rl.objectives import token_mean
from ..rl.sampler import generate
from ..tasks import Problem
from .checkpoints import (
    drop_checkpoints,
    read_checkpoint_file,
    restore_training_state,
    resume_from_latest,
    save_checkpoint_file,
    write_failed,
)
from .config import Config, load_config
from .dist import Dist, init_from_env, leave, make_strategy
from .evaluate import mtp_agreement, prompt_ids, tasks_for
from .guard import StepGuard, StopSignals
from .logging import MetricsWriter, Progress
from .run import RunContext, check_user_data, evaluate_run, problem_stream, training_data, training_tasks

CHECKPOINT_FORMAT = "occ_theory.sft_checkpoint"


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


def sft_losses(model: torch.nn.Module, ids: Tensor, attn: Tensor, loss_mask: Tensor, reduce: Any = None
               ) -> dict[str, Tensor]:
    """Next-token NLL and accuracy, and per MTP depth k its NLL and accuracy (predicting token t from
    position t−k−1: depth 1 is next-next-token accuracy), on target tokens. ``reduce`` sums the token counts over
    processes (each process's values are then its terms of the global means)."""
    logits, mtp_logits = model(ids, attention_mask=attn)
    logp, mtp = align_logprobs(logits, mtp_logits, ids)
    valid = {k: loss_mask * torch.isfinite(q).to(loss_mask.dtype) for k, q in enumerate(mtp, start=1)}
    counts = {"nll": loss_mask.sum().double(), "acc": loss_mask[:, 1:].sum().double()}
    counts |= {f"d{k}": v.sum().double() for k, v in valid.items()} | {f"acc{k}": v[:, k + 1:].sum().double()
                                                                          for k, v in valid.items()}
    n = {k: float(v) for k, v in reduce(counts).items()} if reduce is not None else dict.fromkeys(counts)
    out = {"nll": -token_mean(logp, loss_mask, n["nll"])}
    with torch.no_grad():
        out["acc"] = token_mean((logits[:, :-1].argmax(-1) == ids[:, 1:]).float(), loss_mask[:, 1:], n["acc"])
    for k, (q, lg) in enumerate(zip(mtp, mtp_logits), start=1):
        out[f"mtp_nll_d{k}"] = -token_mean(q, valid[k], n[f"d{k}"])
        with torch.no_grad():
            hit = (lg[:, : ids.shape[1] - k - 1].argmax(-1) == ids[:, k + 1:]).float()
            out[f"mtp_acc_d{k}"] = token_mean(hit, valid[k][:, k + 1:], n[f"acc{k}"])
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


def check_model_source(cfg: Config) -> None:
    """A pretrained model needs a config written for one (``pretrained: true``), and such a config the model."""
    init = cfg.model.init_from
    if cfg.pretrained and init is None:
        raise ValueError(f"config '{cfg.name}' is for a pretrained model (pretrained: true): give it with --model DIR "
                         "(or model.init_from); `occ models fetch smollm2` downloads SmolLM2-135M and prints its DIR")
    if init is not None and not cfg.pretrained:
        raise ValueError(f"--model / model.init_from {init}: config '{cfg.name}' is written for the fresh tiny model "
                         f"(sft.lr {cfg.sft.lr:g} for {cfg.sft.steps} steps); with a pretrained model use a config "
                         "for one (--config smollm2, smollm2_gpu or paper_sketch), or your own with pretrained: true")


class SFTRun:
    """One SFT run: the model, its optimizer and schedule, the problem stream and the generators (all checkpointed),
    built and checked before anything is written (``begin`` writes the run directory)."""

    def __init__(self, cfg: Config, ctx: RunContext, dist: Dist | None = None, strategy: Any = None):
        self.cfg, self.sc, self.ctx = cfg, cfg.sft, ctx
        sc = self.sc
        self.dist = dist or Dist()
        self.strategy = strategy if strategy is not None else make_strategy(cfg.dist.strategy, self.dist)
        if sc.batch_size % self.dist.world:
            raise ValueError(f"config key 'sft.batch_size': {sc.batch_size} rows over {self.dist.world} processes must "
                             "give each the same number")
        self.mtp_only = sc.train == "mtp"
        if sc.data == "self" and not self.mtp_only:
            raise ValueError("config key 'sft.data': 'self' (the model's own responses) needs sft.train=mtp")
        init = cfg.model.init_from
        self.tokenizer = load_tokenizer(init) if init is not None else build_tokenizer()
        self.model = build_model(cfg.model, self.tokenizer, seed=cfg.seed).to(ctx.device)
        if self.mtp_only:
            if self.model.num_mtp == 0:
                raise ValueError("config key 'sft.train': 'mtp' trains the MTP modules, but model.mtp_depths is 0")
            self.model.trunk.requires_grad_(False)
        self.model = self.strategy.wrap(self.model)  # before anything holds its parameters (fsdp replaces them)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.model.train()
        self.opt = torch.optim.AdamW(self.params, lr=sc.lr, weight_decay=sc.weight_decay, betas=(0.9, 0.98))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, sc.warmup, sc.steps, sc.lr_min_ratio))
        self.tasks = tasks_for(self.tokenizer, training_tasks(cfg), cfg.task.parse)
        self.notes = check_user_data(self.tasks, self.tokenizer, self.model.trunk.config.max_position_embeddings,
                                     cfg.eval.max_new_tokens)
        self.task_rng = np.random.default_rng(cfg.seed)  # the same global batches on every process
        self.stream = problem_stream(cfg, self.task_rng, self.tasks)
        self.sample_gen = torch.Generator(device=ctx.device).manual_seed(cfg.seed + 7919 * self.dist.rank)
        held_rng = np.random.default_rng(cfg.eval.seed)
        self.held_out = [prompt_ids(self.tokenizer, self.tasks[i % len(self.tasks)].sample(held_rng, "eval").prompt)
                         for i in range(sc.eval_size)] if self.mtp_only else []
        self.guard = StepGuard(sc.max_bad_steps, "sft.max_bad_steps")
        self.step = 0
        self.before: dict[str, float] = {}
        """MTP top-1 agreement before training (train=mtp), measured once and checkpointed."""
        self.record: dict[str, Any] = {}
        """The last step's metrics record (the final agreement is read from it)."""

    def begin(self) -> None:
        """Write the run directory and the run's log header (after every check)."""
        self.ctx.begin()
        for note in self.notes:
            self.ctx.log(note)
        n_train, n_all = sum(p.numel() for p in self.params), sum(p.numel() for p in self.model.parameters())
        sc = self.sc
        procs = f" ({self.dist.world} processes, {self.strategy.name})" if self.dist.world > 1 else ""
        self.ctx.log(f"SFT {n_train / 1e6:.2f}M trained of {n_all / 1e6:.2f}M parameters ({sc.train}, data {sc.data}), "
                     f"{sc.steps} steps on {training_data(self.cfg)} -> {self.ctx.run_dir}{procs}")

    def agreement(self, when: str) -> dict[str, float]:
        """MTP top-1 agreement with the main head on greedy generations of the held-out prompts, logged with its
        duration (at 135M parameters it takes minutes)."""
        t0 = time.perf_counter()
        self.ctx.log(f"MTP top-1 agreement {when}: {len(self.held_out)} greedy generations of up to "
                     f"{self.cfg.eval.max_new_tokens} tokens ...")
        found = {}
        with self.strategy.full_model(self.model, main_only=True) as model:  # on rank 0 (gathered under fsdp)
            if model is not None:
                found = mtp_agreement(model.to(self.ctx.device), self.tokenizer, self.held_out,
                                      self.cfg.eval.max_new_tokens, autocast_dtype=self.ctx.autocast_dtype)
        found = self.dist.gather(found)[0]
        self.ctx.log(f"MTP top-1 agreement {when}: " + ", ".join(f"d{k} {v:.3f}" for k, v in found.items())
                     + f" ({time.perf_counter() - t0:.0f} s)")
        return {f"eval/mtp_agree_d{k}": v for k, v in found.items()}

    def train_step(self) -> dict[str, Any]:
        """One optimizer step on a fresh batch (a non-finite one is skipped: neither the weights nor the schedule
        move); its metrics record, with the periodic evaluation when due."""
        sc, ctx, model, dist = self.sc, self.ctx, self.model, self.dist
        step = self.step + 1
        t0 = time.perf_counter()
        problems = [next(self.stream) for _ in range(sc.batch_size)]  # the global batch; this process's rows:
        rows = sc.batch_size // dist.world
        problems = problems[dist.rank * rows: (dist.rank + 1) * rows]
        if sc.data == "self":
            with self.strategy.full_model(model) as plain:  # the sampler's decoder reads the weights by hand
                batch = self_distillation_batch(plain, self.tokenizer, problems, self.cfg.eval.max_new_tokens,
                                                self.sample_gen, ctx.autocast_dtype)
        else:
            batch = collate([encode(self.tokenizer, p) for p in problems], self.tokenizer.pad_token_id)
        ids, attn, loss_mask = (t.to(ctx.device) for t in batch)
        with ctx.autocast():
            losses = sft_losses(model, ids, attn, loss_mask, dist.sum if dist.active else None)
        mtp_terms = [v for k, v in losses.items() if k.startswith("mtp_nll")]
        if self.mtp_only:
            loss = torch.stack(mtp_terms).mean()
        else:
            loss = losses["nll"] + (sc.mtp_coef * torch.stack(mtp_terms).mean() if mtp_terms else 0.0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.strategy.reduce_grads(self.params)  # every process: (its shard of) the global batch's gradient
        gnorm = self.strategy.clip(self.params, sc.grad_clip or float("inf"))
        totals = dist.sum({"loss": loss.detach().double()} | {k: v.detach().double() for k, v in losses.items()})
        finite = self.guard.check(bool(torch.isfinite(totals["loss"])) and bool(torch.isfinite(gnorm)), step)
        if finite:
            self.opt.step()
            self.sched.step()
            if not self.strategy.all_finite(self.params):
                raise RunStopped(f"the weights became non-finite at step {step} (the run diverged: lower sft.lr "
                                 "or set sft.grad_clip); no checkpoint saved")
        self.opt.zero_grad(set_to_none=True)
        rec = {"step": step, "sft/loss": float(totals.pop("loss")), "sft/lr": self.sched.get_last_lr()[0],
               "perf/step_s": time.perf_counter() - t0}
        rec |= {f"sft/{k}": float(v) for k, v in totals.items()}
        rec |= {"sft/grad_norm": float(gnorm), "sft/skipped": not finite, "sft/bad_steps_total": self.guard.total}
        if (sc.eval_every and step % sc.eval_every == 0) or step == sc.steps:
            if self.mtp_only:  # the trunk is frozen: its accuracy cannot change, the drafts' agreement can
                rec |= self.agreement("at step " + str(step))
            else:
                rec |= self.evaluate()
        self.step = step
        return rec

    def evaluate(self) -> dict[str, Any]:
        """Held-out greedy accuracy (``run.evaluate_run``) on rank 0, on a gathered copy under fsdp."""
        rec: dict[str, Any] = {}
        with self.strategy.full_model(self.model, main_only=True) as model:
            if model is not None:
                res = evaluate_run(model.to(self.ctx.device), self.tokenizer, self.cfg, self.sc.eval_size, 0,
                                   self.tasks, self.ctx.autocast_dtype)
                rec |= {f"eval/{s}/greedy_acc": e["greedy_acc"] for s, e in res.get("suites", {}).items()}
                if res:
                    rec["eval/mean_greedy_acc"] = res["mean_greedy_acc"]
        return self.dist.gather(rec)[0]

    def run(self) -> Path:
        """Train to ``sft.steps`` (from the checkpoint's step when resumed), then save ``checkpoint/``."""
        sc, ctx = self.sc, self.ctx
        if self.mtp_only and not self.before:
            self.before = self.agreement("before training")
        progress = Progress("sft", sc.steps)
        resume = f"continue with: occ sft --resume {ctx.run_dir}"
        main = self.dist.main
        with StopSignals(lambda: self.step + 1) as stop:
            try:
                writing = MetricsWriter(ctx.run_dir, purge_step=self.step + 1 if self.step else None) if main \
                    else contextlib.nullcontext()
                with writing as writer:
                    while self.step < sc.steps:
                        self.record = self.train_step()
                        if main:
                            writer.write(self.record)
                            progress.update(self.step, loss=self.record["sft/loss"], nll=self.record["sft/nll"])
                        # every process stops at the same step (any of them may have the signal)
                        if self.dist.max(int(stop.received is not None)) and self.step < sc.steps:
                            raise Interrupted(f"interrupted by {stop.received or 'a signal'} after step {self.step}",
                                              stop.received)
            except Interrupted as e:
                path = self.save_checkpoint()
                ctx.log(f"stopped: {e}; checkpoint {path}; {resume}", echo=False)
                raise Interrupted(f"{e}; checkpoint saved to {path}; {resume}", e.signal) from e
            except OSError as e:  # a write failed (a full disk): the checkpoint first, then one line
                raise write_failed(e, self.save_checkpoint, ctx.run_dir, "sft") from e
        try:
            return self.finish()
        except OSError as e:
            raise write_failed(e, self.save_checkpoint, ctx.run_dir, "sft") from e

    def finish(self) -> Path:
        """Save ``checkpoint/`` (and ``mtp_agreement.json``); the training checkpoints are then no longer needed."""
        ctx = self.ctx
        self.model.eval()
        ckpt = ctx.run_dir / "checkpoint"
        with self.strategy.full_model(self.model, main_only=True) as model:  # on rank 0 (gathered under fsdp)
            if model is not None:
                ckpt = Path(save_model(model, ckpt, self.tokenizer))
        if self.mtp_only and self.dist.main:
            after = {k: self.record[k] for k in self.before}
            atomic_write_text(ctx.run_dir / "mtp_agreement.json",
                              json.dumps({"before": self.before, "after": after}, indent=2))
        self.dist.barrier()
        if self.dist.main:
            drop_checkpoints(ctx.run_dir)
        ctx.log(f"SFT done in {time.perf_counter() - ctx.start:.0f}s; checkpoint {ckpt}")
        return ckpt

    def checkpoint_state(self) -> dict[str, Any]:
        """Model and optimizer in full (gathered on rank 0 under fsdp), schedule, stream, every process's sampling
        generator (``sample_gens``, rank order; ``sample_gen`` is rank 0's)."""
        gens = self.dist.gather(self.sample_gen.get_state().cpu())
        return {"format": CHECKPOINT_FORMAT, "step": self.step, "model": self.strategy.model_state(self.model),
                "optimizer": self.strategy.optimizer_state(self.model, self.opt), "lr_schedule": self.sched.state_dict(),
                "task_rng": self.task_rng.bit_generator.state, "sample_gen": gens[0], "sample_gens": gens,
                "bad_in_row": self.guard.in_row, "bad_total": self.guard.total, "before": self.before,
                "record": self.record}

    def save_checkpoint(self) -> Path:
        """``checkpoints/step_N.pt`` (atomic, by rank 0; every process takes part); only the latest is kept."""
        return save_checkpoint_file(self.checkpoint_state(), self.ctx.run_dir, self.step, 1, self.dist.main)

    def load_checkpoint(self, path: Path) -> None:
        st = read_checkpoint_file(path, CHECKPOINT_FORMAT, "SFT")
        gens = st.get("sample_gens", [st["sample_gen"]])  # checkpoints of one process hold sample_gen alone
        restore_training_state(st, path, self.strategy, self.model, self.opt, self.sched, self.dist.world, len(gens))
        self.task_rng.bit_generator.state = st["task_rng"]
        self.stream = problem_stream(self.cfg, self.task_rng, self.tasks)
        self.sample_gen.set_state(gens[self.dist.rank])
        self.guard.in_row, self.guard.total = st["bad_in_row"], st["bad_total"]
        self.step, self.before, self.record = st["step"], st["before"], st["record"]


def run_sft(cfg: Config, run_name: str | None = None, out_dir: Path | None = None) -> Path:
    """Train from scratch (or from ``model.init_from``, with that checkpoint's tokenizer); returns the
    checkpoint directory."""
    check_model_source(cfg)
    ctx = RunContext.create(cfg, kind="sft", run_name=run_name, out_dir=out_dir)
    dist = init_from_env(ctx.device, cfg.dist.strategy)
    ctx = replace(ctx, main=dist.main, run_dir=Path(dist.gather(str(ctx.run_dir))[0]))  # rank 0's time-stamped name
    run = SFTRun(cfg, ctx, dist)
    run.begin()
    out = run.run()
    leave()
    return out


def resume_sft(run_dir: Path) -> Path:
    """Continue the SFT run in ``run_dir`` from its latest checkpoint (from step 0 without one), with its own
    config; metrics records after the checkpoint move to ``metrics.orphaned.jsonl``."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    ctx = RunContext.create(cfg, kind="sft", out_dir=run_dir, resume=True)
    dist = init_from_env(ctx.device, cfg.dist.strategy)
    run = SFTRun(cfg, replace(ctx, main=dist.main), dist)
    resume_from_latest(run_dir, run, dist, run.ctx.log)
    out = run.run()
    leave()
    return out
