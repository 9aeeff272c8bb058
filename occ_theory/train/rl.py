"""RL with an MTP loss under one of six regimes, fully instrumented: ``occ rl``.

Variant implemented (GRPO with DAPO's loss), per rollout batch:

1. rollout: ``prompts_per_rollout`` prompts from the training mixture, ``group_size`` sampled
   responses each (temperature, top-p, stop at EOS); reward 1/0 from each problem's own task;
2. advantage: group-relative, ``(r − mean)/(std + 1e-6)`` (``adv_scale: group``) or ``r − mean``;
3. the sampling policy's log-probs ``l_old`` are recomputed once per rollout at the rollout parameters
   with the training forward (``rl.old_logp_rows`` rows a pass; as verl recomputes them), so the first update
   after a rollout has ``l = l_old`` (exactly on CPU); the batch is then shuffled into ``minibatches`` equal
   minibatches;
4. one AdamW step per minibatch on ``L = −J − λ·M`` (+ ``kl_coef``·k3-KL to the initial policy,
   off by default): ``J`` the token-mean clipped surrogate (ε_lo, ε_hi), ``M`` the regime's MTP
   objective (docs/theory.md section 1), ``λ`` the regime's coefficient (``rl/coef.py``); gradient
   clipping on the global norm. A step whose loss or gradient is not finite is skipped.

Left out: value functions, entropy bonus, dynamic sampling / over-long filtering, reference-model
resets, length penalties. On scheduled steps the diagnostics (``occ_theory.diagnostics``) run on
the state before the step and a probe bundle is saved. Every step writes one ``metrics.jsonl``
record. CUDA: bf16 autocast for rollouts and training, full precision for diagnostics.

Several processes (``torchrun``): each samples its share of the prompts; how they hold the model is
``dist.strategy`` (``train/dist.py``: ddp replicates it; ``train/fsdp.py``: fsdp shards it with FSDP2, and
then rollouts, evaluation, the probe and the rules that differentiate the model read a gathered full copy).
The numbers do not depend on the strategy.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_write_text
from ..diagnostics.offline import bundle_dirs, bundle_step
from ..diagnostics.recorder import wide
from ..diagnostics.step import StepDiagnostics
from ..errors import BadStepsError, Diverged, Interrupted
from ..models import load_any, save_model
from ..names import REGIME_TABLE
from ..rl.advantages import group_advantages
from ..rl.batch import (
    Norms,
    Objectives,
    ObjectiveSpec,
    RLBatch,
    compute_objectives,
    forward_logprobs,
    mtp_mask,
)
from ..rl.coef import (
    Coefficient,
    CoefficientRule,
    CoefInputs,
    SharedUpdate,
    fisher_from_optimizer,
    logprob_proxies,
    proxy_record,
    shared_update,
    step_lambda,
)
from ..rl.objectives import entropy_from_logits, mtp_objective
from ..rl.sampler import NonFiniteLogitsError, generate
from .checkpoints import (
    completed_steps,
    drop_checkpoints,
    latest_checkpoint,
    read_checkpoint_file,
    restore_training_state,
    resume_from_latest,
    save_checkpoint_file,
    write_failed,
)
from .config import Config, load_config
from .dist import Dist, init_from_env, leave, make_strategy
from .evaluate import decode_response, prompt_ids, tasks_for
from .guard import StepGuard, StopSignals
from .logging import MetricsWriter, Progress
from .run import RunContext, check_user_data, evaluate_run, problem_stream, training_tasks


class RLTrainer:
    def __init__(self, cfg: Config, ctx: RunContext, dist: Dist | None = None, strategy: Any = None):
        rc = cfg.rl
        if rc.init is None:
            raise ValueError("config key 'rl.init': RL needs a starting model (occ rl --init SFT_CHECKPOINT, "
                             "or --model PATH for a pretrained model with fresh MTP modules)")
        self.cfg, self.rc, self.ctx = cfg, rc, ctx
        self.dist = dist or Dist()
        self.strategy = strategy if strategy is not None else make_strategy(cfg.dist.strategy, self.dist)
        world = self.dist.world
        if rc.prompts_per_rollout % world or (rc.prompts_per_rollout // world * rc.group_size) % rc.minibatches:
            raise ValueError(f"config key 'rl.prompts_per_rollout': {rc.prompts_per_rollout} prompts over {world} "
                             f"processes must give each the same number of prompts, and of rows per minibatch")
        self.local_prompts = rc.prompts_per_rollout // world
        self.device = ctx.device
        init = Path(rc.init)  # a checkpoint, or a pretrained model (occ rl --model) with fresh MTP modules
        self.model, self.tokenizer = load_any(init, cfg.model.mtp_depths, cfg.model.mtp_init, seed=cfg.seed,
                                              device=self.device)
        vocab = self.model.trunk.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > vocab:
            raise ValueError(f"checkpoint {init}: its tokenizer has {len(self.tokenizer)} tokens but the model's "
                             f"vocabulary only {vocab}")
        regime = REGIME_TABLE[rc.regime]
        if regime.mtp_loss is not None and self.model.num_mtp == 0:
            raise ValueError(f"regime {rc.regime!r} needs MTP modules, but {init} has mtp_depths = 0")
        self.spec = ObjectiveSpec.for_regime(rc.regime, rc.eps_lo, rc.eps_hi, rc.temperature, rc.kl_coef,
                                             rc.detach_mtp_loss)
        if regime.mtp_loss is None:  # no MTP loss: θ_M frozen
            for p in self.model.mtp.parameters():
                p.requires_grad_(False)
        self.ref_model = None
        if rc.kl_coef > 0:
            self.ref_model = self.strategy.wrap(copy.deepcopy(self.model).eval().requires_grad_(False), template=False)
        self.model = self.strategy.wrap(self.model)  # before anything holds its parameters (fsdp replaces them)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=rc.lr, betas=rc.betas, eps=rc.adam_eps,
                                           weight_decay=rc.weight_decay)
        warm = rc.warmup_steps
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda i: min(1.0, (i + 1) / warm) if warm
                                                          else 1.0)
        shared = set(self.model.shared_param_names())
        self.shared = {k: p for k, p in self.model.named_parameters() if k in shared}
        self.mtp_trainable = [p for k, p in self.model.named_parameters() if k not in shared and p.requires_grad]
        self.rule = CoefficientRule(rc.regime, rc.mtp_coef, rc.proxy, rc.coef_ema, rc.coef_clip, rc.coef_max,
                                    rc.coef_every)
        self.diagnostics = StepDiagnostics(self.model, self.shared, self.optimizer, cfg.diag, total_steps=rc.steps,
                                           seed=cfg.seed, grad_clip=rc.grad_clip, clip_scope=rc.clip_scope,
                                           bundle_dir=ctx.run_dir / "probes",
                                           enabled=regime.mtp_loss is not None, dist=self.dist,
                                           heldout=self.heldout_batch, strategy=self.strategy)
        # a pretrained model's tokenizer gets the tasks in natural language (its chat template, "Answer: N")
        self.tasks = {t.name: t for t in tasks_for(self.tokenizer, training_tasks(cfg), cfg.task.parse)}
        # randomness: every source is a seeded generator whose state is checkpointed (one set per process)
        rank = self.dist.rank
        self.task_rng = np.random.default_rng([cfg.seed, rank, 1])  # not SFT's stream (default_rng(seed))
        self.stream = problem_stream(cfg, self.task_rng, list(self.tasks.values()))
        self.sample_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 7919 * rank)
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0
        self.rollouts = 0
        self.guard = StepGuard(rc.max_bad_steps, "rl.max_bad_steps")

    # ------------------------------------------------------------------ rollout

    def rollout(self, stream: Any = None, gen: torch.Generator | None = None) -> tuple[RLBatch, dict[str, Any]]:
        rc = self.rc
        stream = stream or self.stream
        t0 = time.perf_counter()
        problems = [next(stream) for _ in range(self.local_prompts)]
        prompts = [prompt_ids(self.tokenizer, p.prompt) for p in problems for _ in range(rc.group_size)]
        self.model.eval()
        # every process pads its prompts to the same width, so the global batch concatenates column-aligned
        width = {"prompt_width": self.dist.max(max(len(p) for p in prompts))} if self.dist.active else {}
        with self.strategy.full_model(self.model) as model:  # the sampler's decoder reads the weights by hand
            ro = generate(model, prompts, rc.max_new_tokens, rc.temperature, rc.top_p,
                          eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id,
                          generator=gen or self.sample_gen, autocast_dtype=self.ctx.autocast_dtype, **width)
        texts = [decode_response(self.tokenizer, r) for r in ro.responses]
        owners = [p for p in problems for _ in range(rc.group_size)]
        rewards = torch.tensor([self.tasks[p.suite].reward(p, t) for p, t in zip(owners, texts)])
        adv = group_advantages(rewards, rc.group_size, rc.adv_scale)
        # old_logp holds the sampler's log-probs until fill_old_logp recomputes them
        batch = RLBatch(ro.input_ids, ro.attention_mask, ro.response_mask.float(), adv.to(self.device), ro.logprobs)
        gen_s = time.perf_counter() - t0
        # statistics of the global rollout batch
        parts = self.dist.gather((rewards.tolist(), [p.suite for p in owners], ro.response_lengths.tolist(), gen_s))
        rewards = torch.tensor([r for part in parts for r in part[0]])
        suites = [s for part in parts for s in part[1]]
        lengths = torch.tensor([n for part in parts for n in part[2]], dtype=torch.float32)
        gen_s = max(part[3] for part in parts)
        by_group = rewards.view(-1, rc.group_size)
        rec = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
               "rollout/response_len": float(lengths.mean()),
               "rollout/eos_frac": float((lengths < rc.max_new_tokens).float().mean()),
               "rollout/zero_adv_groups": float((by_group.std(1) == 0).float().mean()),
               "rollout/tokens_per_s": float(lengths.sum()) / gen_s, "perf/rollout_s": gen_s}
        for suite in sorted(set(suites)):
            sel = torch.tensor([s == suite for s in suites])
            rec[f"reward/{suite}"] = float(rewards[sel].mean())
        return batch, rec

    @torch.no_grad()
    def fill_old_logp(self, mb: RLBatch) -> tuple[RLBatch, float]:
        """l_old (and the reference log-probs) recomputed at the current parameters with the column layout of
        training, ``rl.old_logp_rows`` rows per forward pass, and max |sampler log-prob − l_old| (a sampler/trainer
        mismatch check)."""
        rows = self.rc.old_logp_rows or mb.size
        parts = [mb.select(slice(i, i + rows)) for i in range(0, mb.size, rows)]
        with self.ctx.autocast():
            lp = torch.cat([forward_logprobs(self.model, p, self.rc.temperature, "full", False)[0] for p in parts])
            ref = None
            if self.ref_model is not None:
                ref = torch.cat([forward_logprobs(self.ref_model, p, self.rc.temperature, "full", False)[0]
                                 for p in parts])
        m = mb.response_mask > 0
        old = torch.where(m, lp.float(), 0.0)
        gap = float((old - mb.old_logp).abs().max()) if m.any() else 0.0
        return replace(mb, old_logp=old, ref_logp=None if ref is None else torch.where(m, ref.float(), 0.0)), gap

    # ------------------------------------------------------------------ one optimizer step

    def coefficient(self, mb: RLBatch, obj: Objectives, u: dict[str, torch.Tensor] | None, norms: Norms | None
                    ) -> tuple[Coefficient, dict[str, Any]]:
        """λ from the run's rule (``rl/coef.py``) and the log-prob proxies' record (every step)."""
        dist = self.dist
        raw, stats = logprob_proxies(obj.logp.detach().float(), mb.old_logp, [q.detach().float() for q in obj.mtp_logp],
                                     mb.response_mask, mb.prompt_len, mb.attention_mask,
                                     dist.sum_terms if dist.active else None)
        rc = self.rc

        def step_rule(rule: str) -> float:  # differentiates the model functionally: a full view of it
            with self.strategy.full_view(self.model, self.optimizer, self.shared) as v:
                return step_lambda(rule, v.model, mb, self.spec, v.shared, v.optimizer, u,
                                   self.diagnostics.recorder.mtp_grad_sq, grad_clip=rc.grad_clip,
                                   clip_scope=rc.clip_scope, norms=norms, method=self.cfg.diag.hvp_method,
                                   reduce=dist.sum if dist.active else None)

        def fisher() -> float:
            with self.strategy.full_view(self.model, self.optimizer, self.shared) as v:
                return fisher_from_optimizer(v.model, mb, rc.temperature, v.shared, v.optimizer, u, dist.sum)

        inputs = CoefInputs(
            raw, fisher=fisher,
            real=lambda: step_rule("real"), adam_step=lambda: step_rule("adam_step"),
            first_step=not any(self.optimizer.state.get(p) for p in self.shared.values()))
        coef = self.rule(inputs)
        if coef.rule == "fisher":
            raw["fisher"] = coef.raw
        return coef, stats | proxy_record(self.rule, raw)

    def loss(self, mb: RLBatch, obj: Objectives, lam: float, norms: Norms | None) -> torch.Tensor:
        """L = −J − λ·M; with ``occ_convention: advantages`` λ is folded into the MTP surrogate's advantages
        instead, as the public code does (which differs from λ·M when λ < 0)."""
        if obj.mtp is None:
            return -obj.rl_objective
        if self.rc.regime != "occ" or self.rc.occ_convention != "advantages":
            return -obj.rl_objective - lam * obj.mtp
        rc = self.rc
        folded = torch.stack([mtp_objective("policy", q, mb.old_logp, lam * mb.advantages,
                                            mtp_mask(mb.response_mask, k, mb.attention_mask), rc.eps_lo, rc.eps_hi,
                                            None if norms is None else norms.mtp[k - 1])
                              for k, q in enumerate(obj.mtp_logp, start=1)]).mean()
        return -obj.rl_objective - folded

    def train_step(self, mb: RLBatch, first_after_rollout: bool, minibatch_index: int | None = None) -> dict[str, Any]:
        """One optimizer step: objectives → coefficient → loss → backward → (diagnostics) → clip → step → log.
        ``minibatch_index``: which minibatch of its rollout ``mb`` is (0 = the first after the rollout)."""
        self.step += 1
        t0 = time.perf_counter()
        dist, diag = self.dist, self.diagnostics
        lr = self.optimizer.param_groups[0]["lr"]  # this step's (the warm-up moves it after the step)
        self.model.train()
        norms = Norms.of(mb, self.model.num_mtp, dist.sum) if dist.active else None  # global token counts
        with self.ctx.autocast():
            obj = compute_objectives(self.model, mb, self.spec, norms=norms)
        u = diag.mtp_grad(obj.mtp) if diag.needs_mtp_grad or self.rule.needs_mtp_grad_now else None
        coef, rec = self.coefficient(mb, obj, u, norms)
        loss = self.loss(mb, obj, coef.value, norms)

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.strategy.reduce_grads(self.trainable)  # every process: (its shard of) the global batch's gradient
        realised = self.edit_shared_update(u, coef) if self.rule.edits_shared else None
        td = time.perf_counter()
        rec = diag.measure(self.step, mb, self.spec, coef, u, realised,  # the applied values win
                           first_after_rollout=first_after_rollout, minibatch_index=minibatch_index) | rec
        rec |= realised.record() if realised is not None else {}
        diag_s = time.perf_counter() - td

        norm, clip_rec = self.clip_gradients()
        rec |= clip_rec
        totals = self.totals(loss, obj)
        finite = bool(torch.isfinite(totals["loss"])) and bool(torch.isfinite(norm))
        self.take_step(finite)
        step_s = time.perf_counter() - t0
        return rec | self.step_record(mb, obj, coef, totals, norm, finite, norms, first_after_rollout, minibatch_index,
                                      lr, step_s, diag_s)

    def edit_shared_update(self, u: dict[str, torch.Tensor], coef: Coefficient) -> SharedUpdate:
        """Replace the update on θ_S by the rule's own (``rl/coef.py: shared_update``); g = −∇L − λ·u."""
        grads = {k: wide(t) for k, t in self.strategy.full_grads(self.shared).items()}
        g = {k: -grads[k] - coef.value * u[k] for k in grads}
        realised = shared_update(coef.rule, g, u, coef.value)
        self.strategy.set_grads(self.shared, {k: -d for k, d in realised.d.items()})
        return realised

    def clip_gradients(self) -> tuple[torch.Tensor, dict[str, Any]]:
        """Clip by ``rl.clip_scope`` with ``clip_grad_norm_`` (global: one norm over θ_S and θ_M; shared: θ_S's,
        θ_M unclipped; separate: each its own) and record, at no extra backward, the norms, whether the clip
        acted on θ_S, its factor there, and θ_M's share of the global squared norm. Returns the global norm."""
        rc, shared, st = self.rc, [p for p in self.shared.values() if p.requires_grad], self.strategy
        n_s, n_m = st.grad_norm(shared), st.grad_norm(self.mtp_trainable)
        total = torch.sqrt(n_s**2 + n_m**2)
        c = rc.grad_clip or float("inf")
        if rc.clip_scope == "global":
            st.clip(self.trainable, c)
            factor = min(1.0, c / (float(total) + 1e-6))
        else:
            st.clip(shared, c)
            factor = min(1.0, c / (float(n_s) + 1e-6))
            if rc.clip_scope == "separate" and self.mtp_trainable:
                st.clip(self.mtp_trainable, c)
        tot_sq = float(total) ** 2
        return total, {"rl/grad_norm_shared": float(n_s), "rl/grad_norm_mtp": float(n_m),
                       "rl/grad_norm_mtp_share": float(n_m) ** 2 / tot_sq if tot_sq > 0 else 0.0,
                       "rl/clip_factor": factor, "rl/clip_active": factor < 1.0}

    def take_step(self, finite: bool) -> None:
        """The optimizer step, or a skipped one (counted; too many in a row stop the run)."""
        if self.guard.check(finite, self.step):
            self.optimizer.step()
            self.lr_schedule.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def totals(self, loss: torch.Tensor, obj: Objectives) -> dict[str, torch.Tensor]:
        """Loss and objectives of the global batch (summed over processes)."""
        return self.dist.sum({"loss": loss.detach().double(), "rl": obj.rl_objective.detach().double()}
                             | ({"kl": obj.kl.detach().double()} if obj.kl is not None else {})
                             | ({"mtp": obj.mtp.detach().double()} if obj.mtp is not None else {})
                             | {f"mtp{k}": m.detach().double() for k, m in enumerate(obj.mtp_depths, start=1)})

    def step_record(self, mb: RLBatch, obj: Objectives, coef: Coefficient, totals: dict[str, torch.Tensor],
                    norm: torch.Tensor, finite: bool, norms: Norms | None, first_after_rollout: bool,
                    minibatch_index: int | None, lr: float, step_s: float, diag_s: float) -> dict[str, Any]:
        dist, mask = self.dist, mb.response_mask
        n_tok = float(norms.rl) if norms is not None else float(mask.sum())
        local = torch.tensor([obj.surrogate.clip_frac, obj.surrogate.ratio_mean, entropy_from_logits(obj.logits, mask)])
        clip_frac, ratio_mean, entropy = (float(x) for x in dist.sum({"v": local})["v"] / dist.world)
        rec = {
            "step": self.step, "rollout": self.rollouts, "first_after_rollout": first_after_rollout,
            "minibatch_index": minibatch_index,
            "lambda/used": coef.value, "lambda/rule": coef.rule, "lambda/raw": coef.raw, "lambda/held": coef.held,
            "lambda/convention": self.rc.occ_convention if self.rc.regime == "occ" else "objective",
            "lambda/non_finite_total": self.rule.non_finite, "lambda/undefined_total": self.rule.undefined,
            "rl/loss": float(totals["loss"]), "rl/objective": float(totals["rl"]), "rl/clip_frac": clip_frac,
            "rl/ratio_mean": ratio_mean, "rl/entropy": entropy,
            "rl/grad_norm": float(norm), "rl/skipped": not finite, "rl/bad_steps_total": self.guard.total,
            "rl/lr": lr, "perf/step_s": step_s, "perf/train_s": step_s - diag_s, "perf/diag_s": diag_s,
            "perf/train_tokens_per_s": n_tok / max(step_s - diag_s, 1e-9),
        }
        if obj.kl is not None:
            rec["rl/kl"] = float(totals["kl"])
        if obj.mtp is not None:
            rec["mtp/objective"] = float(totals["mtp"])
            for k in range(1, len(obj.mtp_depths) + 1):
                rec[f"mtp/objective_d{k}"] = float(totals[f"mtp{k}"])
        return rec

    def heldout_batch(self, step: int) -> RLBatch:
        """A fresh rollout batch from its own seeded stream (the main streams are untouched)."""
        rng = np.random.default_rng([self.cfg.seed, step, 7, self.dist.rank])
        gen = torch.Generator(device=self.device).manual_seed(int(rng.integers(2**62)))
        batch, _ = self.rollout(problem_stream(self.cfg, rng, list(self.tasks.values())), gen)
        return self.fill_old_logp(batch)[0]

    # ------------------------------------------------------------------ loop, checkpoints

    pending: dict[str, Any] | None = None
    """The rest of the current rollout: its minibatches, its record, the next one's index (checkpointed)."""

    def evaluate(self, size: int, samples: int, progress: str | None = None) -> dict[str, Any]:
        """Held-out evaluation on rank 0: all six suites whatever the training mixture, or the user data's
        held-out split (``run.evaluate_run``)."""
        result = {}
        with self.strategy.full_model(self.model, main_only=True) as model:  # gathered on rank 0 under fsdp
            if model is not None:
                result = evaluate_run(model.to(self.device), self.tokenizer, self.cfg, size, samples,
                                      list(self.tasks.values()), self.ctx.autocast_dtype, progress)
        self.dist.barrier()
        return result

    def run(self) -> Path:
        rc = self.rc
        if rc.regime == "occ" and rc.proxy in ("reference", "least_squares"):
            if rc.minibatches == 1:
                self.ctx.log(f"warning: occ with the {rc.proxy} proxy and one minibatch per rollout applies λ = 0 on "
                             "every step (l = l_old on the first update after a rollout): OCC equals detach here")
            else:
                self.ctx.log(f"note: occ with the {rc.proxy} proxy applies λ = 0 on the first of every "
                             f"{rc.minibatches} minibatches (l = l_old there), as the public implementation does; "
                             "metrics mark those steps with first_after_rollout = true")
        progress = Progress(f"rl {rc.regime}", rc.steps)
        resume = f"continue with: occ rl --resume {self.ctx.run_dir}"
        # a second SIGINT / SIGTERM (e.g. during the save) stops at once; the loop checks after each step (the one
        # in progress, or the next one during a rollout)
        with StopSignals(lambda: self.step + (self.pending is None)) as stop:
            try:
                self._loop(progress, stop)
            except (BadStepsError, Interrupted) as e:
                path = self.save_checkpoint()
                self.ctx.log(f"stopped: {e}; checkpoint {path}; {resume}", echo=False)  # the command prints it
                raise type(e)(f"{e}; checkpoint saved to {path}; {resume}") from e
            except OSError as e:  # a write failed (a full disk): the checkpoint first, then one line saying so
                self.step = completed_steps(self.optimizer, self.guard)  # a step the failure cut short runs again
                raise write_failed(e, self.save_checkpoint, self.ctx.run_dir, "rl") from e
            except Diverged as e:
                path = (self.save_checkpoint() if self.strategy.all_finite(self.trainable)
                        else latest_checkpoint(self.ctx.run_dir))
                saved = (f"the last checkpoint is {path}" if path is not None else
                         "no checkpoint was saved (rl.checkpoint_every keeps earlier ones)")
                self.ctx.log(f"stopped: {e}; {saved}", echo=False)
                raise Diverged(f"{e}; {saved}") from e
        try:
            self.save_checkpoint()
            return self._finish()
        except OSError as e:
            raise write_failed(e, self.save_checkpoint, self.ctx.run_dir, "rl") from e

    def _next_rollout(self) -> dict[str, Any]:
        try:
            batch, ro_rec = self.rollout()
        except NonFiniteLogitsError as e:
            raise Diverged(f"before step {self.step + 1}: {e}") from e
        self.rollouts += 1
        batch, gap = self.fill_old_logp(batch)  # once per rollout, at the rollout's parameters
        ro_rec["rollout/logp_gap"] = max(self.dist.gather(gap))
        return {"batches": batch.split(self.rc.minibatches, self.shuffle_gen), "record": ro_rec, "next": 0}

    def _loop(self, progress: Progress, stop: StopSignals) -> None:
        """Rollouts and their minibatch steps; after each step, stop on non-finite weights or on a signal
        (all processes agree on it), with the rest of the rollout kept in ``pending`` for the checkpoint."""
        rc = self.rc
        main = self.dist.main
        purge = self.step + 1 if self.step else None  # a resumed run: TensorBoard drops the abandoned steps
        with MetricsWriter(self.ctx.run_dir, purge_step=purge) if main else contextlib.nullcontext() as writer:
            while self.step < rc.steps:
                if self.pending is None:
                    self.pending = self._next_rollout()
                batches, ro_rec = self.pending["batches"], self.pending["record"]
                while self.pending["next"] < len(batches) and self.step < rc.steps:
                    i = self.pending["next"]
                    rec = self.train_step(batches[i], first_after_rollout=i == 0, minibatch_index=i) | ro_rec
                    self.pending["next"] = i + 1
                    if rc.eval_every and self.step % rc.eval_every == 0:
                        res = self.evaluate(rc.eval_size, 0)
                        rec |= {f"eval/{s}/greedy_acc": e["greedy_acc"] for s, e in res.get("suites", {}).items()}
                        if res:
                            rec["eval/mean_greedy_acc"] = res["mean_greedy_acc"]
                    if main:
                        writer.write(rec)
                        progress.update(self.step, reward=rec["reward/mean"], lam=rec["lambda/used"],
                                        J=rec["rl/objective"])
                    if not self.strategy.all_finite(self.trainable):
                        raise Diverged(f"the weights became non-finite at step {self.step} (lower rl.lr or set "
                                       "rl.grad_clip)")
                    if self.dist.max(int(stop.received is not None)) and self.step < rc.steps:
                        raise Interrupted(f"interrupted by {stop.received or 'a signal'} after step {self.step}")
                self.pending = None
                if rc.checkpoint_every and self.rollouts % rc.checkpoint_every == 0:
                    self.save_checkpoint()

    def _finish(self) -> Path:
        rc = self.rc
        self.save_model(self.ctx.run_dir / "final")
        ec = self.cfg.eval
        result = self.evaluate(ec.size, ec.samples, progress="eval")
        if result:
            atomic_write_text(self.ctx.run_dir / "eval.json", json.dumps(result, indent=2))
        if self.dist.main:  # final/ and eval.json are written: --resume has nothing left to do
            drop_checkpoints(self.ctx.run_dir)
        self.ctx.log(f"RL {rc.regime} done: {self.step} steps in {time.perf_counter() - self.ctx.start:.0f}s "
                     f"-> {self.ctx.run_dir}")
        return self.ctx.run_dir

    def save_model(self, path: Path) -> None:
        """``save_model`` of the whole model, on rank 0 (gathered under fsdp; every process calls it)."""
        with self.strategy.full_model(self.model, main_only=True) as model:
            if model is not None:
                save_model(model, path, self.tokenizer)

    def checkpoint_state(self) -> dict[str, Any]:
        """Model, optimizer, coefficient state, and every process's random generators (rank order); the model and
        the optimizer in full (gathered on rank 0 under fsdp: one checkpoint format for both strategies)."""
        pending = None
        if self.pending is not None:  # the rollout's minibatches not yet stepped on (an interrupted run)
            nxt = self.pending["next"]
            pending = {"batches": [mb.tensors() for mb in self.pending["batches"][nxt:]],
                       "record": self.pending["record"], "next": nxt}
        rngs = self.dist.gather({"task_rng": self.task_rng.bit_generator.state,
                                 "sample_gen": self.sample_gen.get_state().cpu(), "pending": pending})
        return {"format": "occ_theory.rl_checkpoint", "step": self.step, "rollouts": self.rollouts,
                "model": self.strategy.model_state(self.model),
                "optimizer": self.strategy.optimizer_state(self.model, self.optimizer),
                "lr_schedule": self.lr_schedule.state_dict(),
                "rule": self.rule.state_dict(), "diagnostics": self.diagnostics.state_dict(), "rngs": rngs, "shuffle_gen": self.shuffle_gen.get_state(),
                "bad_in_row": self.guard.in_row, "bad_total": self.guard.total}

    def save_checkpoint(self) -> Path:
        state = self.checkpoint_state()  # collective: every process takes part
        return save_checkpoint_file(state, self.ctx.run_dir, self.step, self.rc.keep_checkpoints, self.dist.main)

    def load_checkpoint(self, path: Path) -> None:
        st = read_checkpoint_file(path, "occ_theory.rl_checkpoint", "RL")
        restore_training_state(st, path, self.strategy, self.model, self.optimizer, self.lr_schedule,
                               self.dist.world, len(st["rngs"]))
        self.rule.load_state_dict(st["rule"])
        if "diagnostics" in st:  # checkpoints before the momentum buffers have none
            self.diagnostics.load_state_dict(st["diagnostics"])
        mine = st["rngs"][self.dist.rank]
        self.task_rng.bit_generator.state = mine["task_rng"]
        self.stream = problem_stream(self.cfg, self.task_rng, list(self.tasks.values()))
        self.sample_gen.set_state(mine["sample_gen"])
        if mine.get("pending") is not None:
            p = mine["pending"]
            self.pending = {"batches": [None] * p["next"] + [RLBatch.from_tensors(t) for t in p["batches"]],
                            "record": p["record"], "next": p["next"]}
        self.shuffle_gen.set_state(st["shuffle_gen"])
        self.step, self.rollouts = st["step"], st["rollouts"]
        self.guard.in_row, self.guard.total = st["bad_in_row"], st["bad_total"]


def _check_data(trainer: RLTrainer) -> list[str]:
    """``run.check_user_data`` against the model's context: prompt + the longest generation."""
    cfg = trainer.cfg
    return check_user_data(list(trainer.tasks.values()), trainer.tokenizer,
                           trainer.model.trunk.config.max_position_embeddings,
                           max(cfg.rl.max_new_tokens, cfg.eval.max_new_tokens))


def run_rl(cfg: Config, out_dir: Path | None = None) -> Path:
    if cfg.rl.init is not None and not Path(cfg.rl.init).exists():  # what kind of model it is, load_any judges
        raise ValueError(f"config key 'rl.init' (--init, --model): nothing at {cfg.rl.init}")
    ctx = RunContext.create(cfg, kind=cfg.rl.regime, out_dir=out_dir)
    dist = init_from_env(ctx.device, cfg.dist.strategy)
    ctx = replace(ctx, main=dist.main, run_dir=Path(dist.gather(str(ctx.run_dir))[0]))  # rank 0's time-stamped name
    trainer = RLTrainer(cfg, ctx, dist)  # validates the checkpoint and settings before anything is written
    warnings = _check_data(trainer)
    ctx.begin()
    for w in warnings:
        ctx.log(w)
    if cfg.dist.strategy != trainer.strategy.name:
        ctx.log(f"note: dist.strategy {cfg.dist.strategy} without torchrun: one process holds the whole model")
    trainer.save_model(ctx.run_dir / "init")
    dist.barrier()
    ctx.log(f"RL regime={cfg.rl.regime} steps={cfg.rl.steps} from {cfg.rl.init} -> {ctx.run_dir} "
            f"({dist.world} process{'es' if dist.world > 1 else ''}, {trainer.strategy.name})")
    out = trainer.run()
    leave()
    return out


def resume_rl(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ValueError(f"{run_dir} is not a run directory: config.yaml is missing")
    cfg = load_config(cfg_path)
    cfg = cfg.replace(rl=cfg.rl.replace(init=str(run_dir / "init")))
    ctx = RunContext.create(cfg, kind=cfg.rl.regime, out_dir=run_dir, resume=True)
    dist = init_from_env(ctx.device, cfg.dist.strategy)
    ctx = replace(ctx, main=dist.main)
    trainer = RLTrainer(cfg, ctx, dist)

    def drop_bundles_after(step: int) -> None:
        """Probe bundles past the checkpoint (the abandoned continuation's), and what a killed bundle write left."""
        for b in bundle_dirs(run_dir):
            if bundle_step(b) > step:
                shutil.rmtree(b)
        for leftover in (run_dir / "probes").glob(".step_*"):  # a killed write's .step_N.….tmp, or its .step_N.old
            if leftover.is_dir():
                shutil.rmtree(leftover)

    resume_from_latest(run_dir, trainer, dist, ctx.log, drop_bundles_after)
    out = trainer.run()
    leave()
    return out
