"""RL with an MTP loss under one of six regimes, fully instrumented: ``occ rl``.

Variant implemented (GRPO with DAPO's loss), per rollout batch:

1. rollout: ``prompts_per_rollout`` prompts from the training mixture, ``group_size`` sampled
   responses each (temperature, top-p, stop at EOS); reward 1/0 from each problem's own task;
2. advantage: group-relative, ``(r − mean)/(std + 1e-6)`` (``adv_scale: group``) or ``r − mean``;
3. the batch is shuffled into ``minibatches`` equal minibatches, and the sampling policy's
   log-probs ``l_old`` are recomputed per minibatch at the rollout parameters (as verl does), so
   the first update after a rollout has ``l = l_old`` exactly;
4. one AdamW step per minibatch on ``L = −J − λ·M`` (+ ``kl_coef``·k3-KL to the initial policy,
   off by default): ``J`` the token-mean clipped surrogate (ε_lo, ε_hi), ``M`` the regime's MTP
   objective (THEORY.md section 1), ``λ`` the regime's coefficient (``rl/coef.py``); gradient
   clipping on the global norm. A step whose loss or gradient is not finite is skipped.

Left out: value functions, entropy bonus, dynamic sampling / over-long filtering, reference-model
resets, length penalties. On scheduled steps the diagnostics (``occ_theory.diagnostics``) run on
the state before the step and a probe bundle is saved. Every step writes one ``metrics.jsonl``
record. CUDA: bf16 autocast for rollouts and training, full precision for diagnostics.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_torch_save, atomic_write_text
from ..diagnostics.bundle import save_bundle
from ..diagnostics.probe import (
    OptimizerSnapshot,
    ProbeSettings,
    adam_preconditioner,
    logprob_proxies,
    run_probe,
)
from ..diagnostics.recorder import GradientRecorder
from ..diagnostics.schedule import Schedule
from ..errors import RunStopped
from ..jsonl import read_jsonl
from ..models import load_model, load_tokenizer, save_model
from ..rl.advantages import group_advantages
from ..rl.batch import Norms, ObjectiveSpec, RLBatch, compute_objectives, forward_logprobs, mtp_mask
from ..rl.coef import CoefficientRule
from ..rl.objectives import entropy_from_logits, mtp_objective
from ..rl.sampler import generate
from ..tasks import SUITES
from ..theory import proxies
from ..theory.params import axpy, mul
from .config import Config, load_config
from .dist import Dist, init_from_env
from .evaluate import decode_response, evaluate_suites, prompt_ids
from .logging import MetricsWriter, Progress
from .run import RunContext, problem_stream, training_tasks

CKPT_RE = re.compile(r"^step_(\d{6,})\.pt$")
FISHER_FD_STEP = 1e-4  # largest parameter change of the central difference behind the trainer's fisher proxy


class BadStepsError(RunStopped):
    """Too many consecutive steps with a non-finite loss or gradient."""


class RLTrainer:
    def __init__(self, cfg: Config, ctx: RunContext, dist: Dist | None = None):
        rc = cfg.rl
        if rc.init is None:
            raise ValueError("config key 'rl.init': RL needs a starting checkpoint (occ rl --init SFT_CHECKPOINT)")
        self.cfg, self.rc, self.ctx = cfg, rc, ctx
        self.dist = dist or Dist()
        world = self.dist.world
        if rc.prompts_per_rollout % world or (rc.prompts_per_rollout // world * rc.group_size) % rc.minibatches:
            raise ValueError(f"config key 'rl.prompts_per_rollout': {rc.prompts_per_rollout} prompts over {world} "
                             f"processes must give each the same number of prompts, and of rows per minibatch")
        self.local_prompts = rc.prompts_per_rollout // world
        self.device = ctx.device
        init = Path(rc.init)
        self.tokenizer = load_tokenizer(init)
        self.model = load_model(init, device=self.device)
        vocab = self.model.trunk.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > vocab:
            raise ValueError(f"checkpoint {init}: its tokenizer has {len(self.tokenizer)} tokens but the model's "
                             f"vocabulary only {vocab}")
        if rc.regime != "off" and self.model.num_mtp == 0:
            raise ValueError(f"regime {rc.regime!r} needs MTP modules, but {init} has mtp_depths = 0")
        self.spec = ObjectiveSpec.for_regime(rc.regime, rc.eps_lo, rc.eps_hi, rc.temperature, rc.kl_coef,
                                             rc.detach_mtp_loss)
        if rc.regime == "off":
            for p in self.model.mtp.parameters():
                p.requires_grad_(False)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=rc.lr, betas=rc.betas, eps=rc.adam_eps,
                                           weight_decay=rc.weight_decay)
        shared = set(self.model.shared_param_names())
        self.shared = {k: p for k, p in self.model.named_parameters() if k in shared}
        self.ref_model = None
        if rc.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.rule = CoefficientRule(rc.regime, rc.mtp_coef, rc.proxy, rc.coef_ema, rc.coef_clip)
        self.recorder = GradientRecorder(self.model)
        dc = cfg.diag
        self.schedule = Schedule(rc.steps, dc.every, dc.at, dc.log_spaced, dc.first)
        self.settings = ProbeSettings.from_diag(dc, cfg.seed)
        self.tasks = {t.name: t for t in training_tasks(cfg)}
        # randomness: every source is a seeded generator whose state is checkpointed (one set per process)
        rank = self.dist.rank
        self.task_rng = np.random.default_rng([cfg.seed, rank, 1])  # not SFT's stream (default_rng(seed))
        self.stream = problem_stream(cfg, self.task_rng, list(self.tasks.values()))
        self.sample_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 7919 * rank)
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0
        self.rollouts = 0
        self.bad_in_row = 0
        self.bad_total = 0

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
        ro = generate(self.model, prompts, rc.max_new_tokens, rc.temperature, rc.top_p,
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
        """l_old (and the reference log-probs) recomputed at the current parameters with the shapes of
        training, and max |sampler log-prob − l_old| (a sampler/trainer mismatch check)."""
        with self.ctx.autocast():
            lp = forward_logprobs(self.model, mb, self.rc.temperature, "full", False)[0]
            ref = None
            if self.ref_model is not None:
                ref = forward_logprobs(self.ref_model, mb, self.rc.temperature, "full", False)[0]
        m = mb.response_mask > 0
        old = torch.where(m, lp.float(), 0.0)
        gap = float((old - mb.old_logp).abs().max()) if m.any() else 0.0
        return replace(mb, old_logp=old, ref_logp=None if ref is None else torch.where(m, ref.float(), 0.0)), gap

    # ------------------------------------------------------------------ one optimizer step

    def fisher_coefficient(self, mb: RLBatch, u: dict[str, torch.Tensor]) -> float:
        """The fisher proxy with δ = ∇l·Pu in the optimizer's geometry (SGD before Adam has state), by a
        central finite difference of two forward passes (THEORY.md 4c), in full precision; ``u`` is the
        global MTP gradient and the sums are global. (Probes compute δ exactly, by a JVP.)"""
        params = {k: p.detach() for k, p in self.shared.items()}
        group = self.optimizer.param_groups[0]
        state = {k: self.optimizer.state.get(p, {}) for k, p in self.shared.items()}
        precond = adam_preconditioner(state, params, group["betas"][1], group["eps"])
        self._fisher_geometry = "sgd" if precond is None else "adam"
        pu = mul(u, precond)
        top = max(float(t.abs().max()) for t in pu.values())
        if top == 0.0:
            return 0.0
        eps = FISHER_FD_STEP / top  # the largest coordinate moves by FISHER_FD_STEP
        with torch.no_grad():
            plus, minus = (forward_logprobs(self.model, mb, self.rc.temperature, "full", False,
                                            axpy(sign * eps, pu, params))[0].float() for sign in (1.0, -1.0))
        dlogp = (plus - minus) / (2 * eps)
        num, den = proxies.fisher_terms(mb.advantages, dlogp, mb.response_mask)
        t = self.dist.sum({"num": num, "den": den})
        return proxies.from_terms(t["num"], t["den"], scale=1.0 / group["lr"])

    def train_step(self, mb: RLBatch, first_after_rollout: bool) -> dict[str, Any]:
        rc, spec = self.rc, self.spec
        self.step += 1
        step = self.step
        t0 = time.perf_counter()
        dist = self.dist
        self.model.train()
        norms = Norms.of(mb, self.model.num_mtp, dist.sum) if dist.active else None  # global token counts
        with self.ctx.autocast():
            obj = compute_objectives(self.model, mb, spec, norms=norms)
        mask = mb.response_mask
        rec: dict[str, Any] = {"step": step, "rollout": self.rollouts, "first_after_rollout": first_after_rollout}
        rec |= logprob_proxies(obj.logp.detach().float(), mb.old_logp, [q.detach().float() for q in obj.mtp_logp],
                               mask, rc.mtp_coef, mb.prompt_len, dist.sum_terms if dist.active else None)
        if rc.regime == "occ" and rc.proxy == "fisher":
            u = dict(zip(self.shared, torch.autograd.grad(obj.mtp, list(self.shared.values()), retain_graph=True,
                                                          allow_unused=True, materialize_grads=True)))
            rec["lambda/fisher"] = self.fisher_coefficient(mb, dist.sum(u))
            rec["lambda/fisher_geometry"] = self._fisher_geometry
        proxy_values = {k.split("/")[1]: v for k, v in rec.items() if k.startswith("lambda/")}
        lam = self.rule(proxy_values)
        mtp_term = obj.mtp
        if rc.regime == "occ" and rc.occ_convention == "advantages" and obj.mtp is not None:
            # the public code folds λ into the MTP surrogate's advantages (differs from λ·M when λ < 0)
            mtp_term = torch.stack([mtp_objective("policy", q, mb.old_logp, lam * mb.advantages, mtp_mask(mask, k),
                                                  rc.eps_lo, rc.eps_hi, None if norms is None else norms.mtp[k - 1])
                                    for k, q in enumerate(obj.mtp_logp, start=1)]).mean()
            loss = -obj.rl - mtp_term
        else:
            loss = -obj.rl - lam * mtp_term if mtp_term is not None else -obj.rl
        rec |= {"lambda/used": lam, "lambda/convention": rc.occ_convention if rc.regime == "occ" else "objective",
                "lambda/non_finite_total": self.rule.non_finite}

        diag_s = 0.0
        record = None
        if step in self.schedule and rc.regime != "off":
            td = time.perf_counter()
            record = self.recorder.record(obj.rl, obj.mtp, dist.sum if dist.active else None)
            snap = OptimizerSnapshot.capture(self.optimizer, self.shared, rc.grad_clip)
            heldout = self.heldout_batch(step) if self.cfg.diag.curve_heldout else None
            settings = replace(self.settings, seed=self.cfg.seed * 1_000_003 + step)  # each probe its bootstrap
            probe = run_probe(self.model, mb, spec, lam, rc.mtp_coef, snap, settings, heldout, dist)
            probe["first_after_rollout"] = first_after_rollout
            self.model.train()
            rec |= {k: v for k, v in probe.items() if not isinstance(v, list) and k not in rec}
            if self.cfg.diag.probes:  # the global minibatch: `occ probe` recomputes it in one process
                whole = RLBatch.from_tensors(dist.gather_cat(mb.tensors()))
                held = None if heldout is None else RLBatch.from_tensors(dist.gather_cat(heldout.tensors()))
                if dist.main:
                    save_bundle(self.ctx.run_dir / "probes" / f"step_{step:06d}", step=step, model=self.model,
                                batch=whole, spec=spec, lam_used=lam, base_coef=rc.mtp_coef, optim=snap,
                                settings=settings, heldout=held, online=probe,
                                extra={"first_after_rollout": first_after_rollout, "world": dist.world})
            diag_s = time.perf_counter() - td

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dist.sum_grads(self.trainable)  # every process now holds the gradient of the global batch
        if record is not None:
            td = time.perf_counter()
            rec |= self.recorder.check(record, lam) | self.recorder.breakdown(record)
            diag_s += time.perf_counter() - td
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, rc.grad_clip if rc.grad_clip > 0 else float("inf"))
        totals = dist.sum({"loss": loss.detach().double(), "rl": obj.rl.detach().double()}
                          | ({"kl": obj.kl.detach().double()} if obj.kl is not None else {})
                          | ({"mtp": obj.mtp.detach().double()} if obj.mtp is not None else {})
                          | {f"mtp{k}": m.detach().double() for k, m in enumerate(obj.mtp_depths, start=1)})
        finite = bool(torch.isfinite(totals["loss"])) and bool(torch.isfinite(norm))
        if finite:
            self.optimizer.step()
            self.bad_in_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_in_row += 1
            self.bad_total += 1
        step_s = time.perf_counter() - t0
        n_tok = float(norms.rl) if norms is not None else float(mask.sum())
        local = torch.tensor([obj.surrogate.clip_frac, obj.surrogate.ratio_mean, entropy_from_logits(obj.logits, mask)])
        clip_frac, ratio_mean, entropy = (float(x) for x in dist.sum({"v": local})["v"] / dist.world)
        rec |= {
            "rl/loss": float(totals["loss"]), "rl/objective": float(totals["rl"]), "rl/clip_frac": clip_frac,
            "rl/ratio_mean": ratio_mean, "rl/entropy": entropy,
            "rl/grad_norm": float(norm), "rl/skipped": not finite, "rl/bad_steps_total": self.bad_total,
            "perf/step_s": step_s, "perf/train_s": step_s - diag_s, "perf/diag_s": diag_s,
            "perf/train_tokens_per_s": n_tok / max(step_s - diag_s, 1e-9),
        }
        if obj.kl is not None:
            rec["rl/kl"] = float(totals["kl"])
        if obj.mtp is not None:
            rec["mtp/objective"] = float(totals["mtp"])
            for k in range(1, len(obj.mtp_depths) + 1):
                rec[f"mtp/objective_d{k}"] = float(totals[f"mtp{k}"])
        if self.bad_in_row >= rc.max_bad_steps:
            raise BadStepsError(f"{self.bad_in_row} consecutive steps had a non-finite loss or gradient "
                                f"(rl.max_bad_steps = {rc.max_bad_steps}); stopped at step {step}")
        return rec

    def heldout_batch(self, step: int) -> RLBatch:
        """A fresh rollout batch from its own seeded stream (the main streams are untouched)."""
        rng = np.random.default_rng([self.cfg.seed, step, 7, self.dist.rank])
        gen = torch.Generator(device=self.device).manual_seed(int(rng.integers(2**62)))
        batch, _ = self.rollout(problem_stream(self.cfg, rng, list(self.tasks.values())), gen)
        return self.fill_old_logp(batch)[0]

    # ------------------------------------------------------------------ loop, checkpoints

    def evaluate(self, size: int, samples: int) -> dict[str, Any]:
        """Held-out evaluation on all six suites (whatever the training mixture), on rank 0."""
        ec = self.cfg.eval
        if self.cfg.task.user_data is not None or not self.dist.main:
            self.dist.barrier()
            return {}
        result = evaluate_suites(self.model, self.tokenizer, SUITES, size, samples, ec.temperature, ec.max_new_tokens,
                                 ec.seed, self.cfg.task.difficulty, autocast_dtype=self.ctx.autocast_dtype)
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
        try:
            self._loop(progress)
        except BadStepsError as e:
            path = self.save_checkpoint()
            self.ctx.log(f"stopped: {e}; checkpoint {path}")
            raise BadStepsError(f"{e}; checkpoint saved to {path}") from e
        self.save_checkpoint()
        return self._finish()

    def _loop(self, progress: Progress) -> None:
        rc = self.rc
        main = self.dist.main
        with MetricsWriter(self.ctx.run_dir) if main else contextlib.nullcontext() as writer:
            while self.step < rc.steps:
                batch, ro_rec = self.rollout()
                self.rollouts += 1
                filled = [self.fill_old_logp(mb) for mb in batch.split(rc.minibatches, self.shuffle_gen)]
                minibatches = [mb for mb, _ in filled]
                ro_rec["rollout/logp_gap"] = max(self.dist.gather(max(gap for _, gap in filled)))
                for i, mb in enumerate(minibatches):
                    if self.step >= rc.steps:
                        break
                    rec = self.train_step(mb, first_after_rollout=i == 0) | ro_rec
                    if rc.eval_every and self.step % rc.eval_every == 0:
                        res = self.evaluate(rc.eval_size, 0)
                        rec |= {f"eval/{s}/greedy_acc": e["greedy_acc"] for s, e in res.get("suites", {}).items()}
                        if res:
                            rec["eval/mean_greedy_acc"] = res["mean_greedy_acc"]
                    if main:
                        writer.write(rec)
                        progress.update(self.step, reward=rec["reward/mean"], lam=rec["lambda/used"],
                                        J=rec["rl/objective"])
                if rc.checkpoint_every and self.rollouts % rc.checkpoint_every == 0:
                    self.save_checkpoint()

    def _finish(self) -> Path:
        rc = self.rc
        if self.dist.main:
            save_model(self.model, self.ctx.run_dir / "final", self.tokenizer)
        ec = self.cfg.eval
        result = self.evaluate(ec.size, ec.samples)
        if result:
            atomic_write_text(self.ctx.run_dir / "eval.json", json.dumps(result, indent=2))
        self.ctx.log(f"RL {rc.regime} done: {self.step} steps in {time.perf_counter() - self.ctx.start:.0f}s "
                     f"-> {self.ctx.run_dir}")
        return self.ctx.run_dir

    def checkpoint_state(self) -> dict[str, Any]:
        """Model, optimizer, coefficient state, and every process's random generators (rank order)."""
        rngs = self.dist.gather({"task_rng": self.task_rng.bit_generator.state,
                                 "sample_gen": self.sample_gen.get_state().cpu()})
        return {"format": "occ_theory.rl_checkpoint", "step": self.step, "rollouts": self.rollouts,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rule": self.rule.state_dict(), "rngs": rngs, "shuffle_gen": self.shuffle_gen.get_state(),
                "bad_in_row": self.bad_in_row, "bad_total": self.bad_total}

    def save_checkpoint(self) -> Path:
        d = self.ctx.run_dir / "checkpoints"
        path = d / f"step_{self.step:06d}.pt"
        state = self.checkpoint_state()  # collective: every process takes part
        if not self.dist.main:
            return path
        atomic_torch_save(state, path)
        for old in _checkpoints(d)[:-self.rc.keep_checkpoints]:
            old.unlink()
        return path

    def load_checkpoint(self, path: Path) -> None:
        try:
            st = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"checkpoint {path} is corrupt or unreadable: {type(e).__name__}: {e}") from e
        if not isinstance(st, dict) or st.get("format") != "occ_theory.rl_checkpoint":
            raise ValueError(f"{path} is not an occ_theory RL checkpoint")
        try:
            self.model.load_state_dict(st["model"])
            self.optimizer.load_state_dict(st["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"checkpoint {path} does not match this run's model or optimizer: {e}") from e
        self.rule.load_state_dict(st["rule"])
        if len(st["rngs"]) != self.dist.world:
            raise ValueError(f"checkpoint {path} was written by {len(st['rngs'])} processes, this run has "
                             f"{self.dist.world}")
        mine = st["rngs"][self.dist.rank]
        self.task_rng.bit_generator.state = mine["task_rng"]
        self.stream = problem_stream(self.cfg, self.task_rng, list(self.tasks.values()))
        self.sample_gen.set_state(mine["sample_gen"])
        self.shuffle_gen.set_state(st["shuffle_gen"])
        self.step, self.rollouts = st["step"], st["rollouts"]
        self.bad_in_row, self.bad_total = st["bad_in_row"], st["bad_total"]


def _checkpoints(d: Path) -> list[Path]:
    """Checkpoint files of a run, oldest step first (by number, not by name)."""
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return None
    found = _checkpoints(d)
    return found[-1] if found else None


def truncate_metrics(run_dir: Path, step: int) -> int:
    """Keep records with ``step`` <= the checkpoint's; later ones move to ``metrics.orphaned.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    records = read_jsonl(path)
    keep = [r for r in records if r.get("step", 0) <= step]
    orphans = [r for r in records if r.get("step", 0) > step]
    if orphans:
        with open(Path(run_dir) / "metrics.orphaned.jsonl", "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in orphans)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
    return len(orphans)


def run_rl(cfg: Config, out_dir: Path | None = None) -> Path:
    ctx = RunContext.create(cfg, kind=cfg.rl.regime, out_dir=out_dir)
    dist = init_from_env(ctx.device)
    ctx = replace(ctx, main=dist.main)
    trainer = RLTrainer(cfg, ctx, dist)  # validates the checkpoint and settings before anything is written
    ctx.begin()
    if dist.main:
        save_model(trainer.model, ctx.run_dir / "init", trainer.tokenizer)
    dist.barrier()
    ctx.log(f"RL regime={cfg.rl.regime} steps={cfg.rl.steps} from {cfg.rl.init} -> {ctx.run_dir}")
    return trainer.run()


def resume_rl(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ValueError(f"{run_dir} is not a run directory: config.yaml is missing")
    cfg = load_config(cfg_path)
    cfg = replace(cfg, rl=replace(cfg.rl, init=str(run_dir / "init")))
    ckpt = latest_checkpoint(run_dir)
    ctx = RunContext.create(cfg, kind=cfg.rl.regime, out_dir=run_dir, resume=True)
    dist = init_from_env(ctx.device)
    ctx = replace(ctx, main=dist.main)
    trainer = RLTrainer(cfg, ctx, dist)
    if ckpt is None:
        ctx.log("no checkpoint yet: restarting from the initial model")
        if dist.main:
            truncate_metrics(run_dir, 0)
            shutil.rmtree(run_dir / "probes", ignore_errors=True)
    else:
        trainer.load_checkpoint(ckpt)
        dropped = truncate_metrics(run_dir, trainer.step) if dist.main else 0
        if dist.main:  # bundles of steps after the checkpoint belong to the abandoned continuation
            for b in (run_dir / "probes").glob("step_*"):
                if b.is_dir() and int(b.name.split("_")[1]) > trainer.step:
                    shutil.rmtree(b)
        ctx.log(f"resumed from {ckpt.name} (step {trainer.step}); {dropped} later records moved to "
                "metrics.orphaned.jsonl")
    return trainer.run()
