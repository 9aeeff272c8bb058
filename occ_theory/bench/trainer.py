"""``trainer``: generated-and-trained tokens/s of one full RL step, ours against TRL's ``GRPOTrainer``.

One full step = one rollout of ``prompts_per_rollout × group_size`` responses + ``minibatches``
optimizer steps on them. Ours: ``RLTrainer`` in regime ``off`` (no MTP: the trunk alone is
trained), the body of its loop (rollout, l_old once over the rollout, ``train_step`` per minibatch).
TRL: ``GRPOTrainer`` on ``model.trunk`` of the same checkpoint (a plain ``transformers`` model),
offline (``HF_HUB_OFFLINE=1``; model, tokenizer and an in-memory ``datasets.Dataset`` passed as
objects; ``report_to="none"``; a temporary ``output_dir``), with the same settings where TRL has
one: group size, completion length, prompts per step, learning rate (constant), AdamW betas/eps/
weight decay, gradient clip, clip range ε_lo/ε_hi, ``loss_type="dapo"`` (token mean), group
reward scaling, no KL, full precision on CPU, temperature and top-p (``top_k=0``). Prompts are
``<bos>`` + the task prompt (the same token ids as ours), from the same task mixture; rewards are
the tasks' own.

Interleaving: TRL's ``train()`` runs the whole loop, so a callback runs (and times) one of our full
steps after every ``minibatches`` TRL optimizer steps; a TRL step is timed from the end of that
callback to the end of its last optimizer step (generation, scoring, l_old, the updates and the
trainer's own bookkeeping all inside). Tokens: the generated tokens of the step (up to and including
EOS per row), which are also the tokens trained on.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .common import PEAK, BenchResult, Samples, measure_memory, paired_ratio, target
from .fixtures import checkpoint, trainer
from .profiling import PhaseTimer, describe_phases

TARGET = 1.5


def bench_trainer(repeats: int, threads: int, quick: bool = False) -> BenchResult:
    res = BenchResult("trainer")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import trl  # noqa: F401
        from datasets import Dataset  # noqa: F401
    except ImportError as e:
        res.skipped = (f"TRL is not importable ({e}); install the optional extra (pip install 'occ-theory[trl]') "
                       "to compare against TRL's GRPOTrainer")
        return res
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ckpt = checkpoint(d / "ckpt")
        ours = trainer(ckpt, d / "ours", "off", threads=threads)
        try:
            ours_s, trl_s, notes = _run(ours, ckpt, d, rounds=3 * repeats)  # a full step is short: more rounds
        except UnsupportedTRL as e:
            res.skipped = str(e)
            return res
        med, lo, hi = paired_ratio(ours_s.rates(float), trl_s.rates(float))
        rc = ours.rc
        res.rows.append({
            "prompts": rc.prompts_per_rollout, "group": rc.group_size, "updates": rc.minibatches,
            "max_new_tokens": rc.max_new_tokens, "ours_tok_s": statistics.median(ours_s.rates(float)),
            "ours_spread": ours_s.spread, "ours_step_s": ours_s.median_s,
            "trl_tok_s": statistics.median(trl_s.rates(float)), "trl_spread": trl_s.spread,
            "trl_step_s": trl_s.median_s, "ours_tok_per_step": statistics.mean(ours_s.values),
            "trl_tok_per_step": statistics.mean(trl_s.values), "ours_rss_delta_mb": ours_s.rss_delta_mb,
            "trl_rss_delta_mb": trl_s.rss_delta_mb, **target(med, ">=", TARGET), "ratio_min": lo, "ratio_max": hi,
            "calls": len(ours_s.times),
        })
        res.notes += notes
        if not res.rows[-1]["met"]:
            res.notes.append(f"misses ({med:.2f}×, rounds ranged {lo:.2f}–{hi:.2f}); see the phase breakdown above")
    return res


OUR_PHASES = {"rollout": "occ_theory.train.rl:RLTrainer.rollout",
              "of it generate": "occ_theory.train.rl:generate",
              "l_old": "occ_theory.train.rl:RLTrainer.fill_old_logp",
              "train_step": "occ_theory.train.rl:RLTrainer.train_step"}
TRL_PHASES = {"generate, score, l_old": "trl.trainer.grpo_trainer:GRPOTrainer._generate_and_score_completions",
              "of it generate": "trl.trainer.grpo_trainer:GRPOTrainer._generate_single_turn",
              "log-prob forwards (l_old and training)":
                  "trl.trainer.grpo_trainer:GRPOTrainer._get_per_token_logps_and_entropies",
              "training_step": "trl.trainer.grpo_trainer:GRPOTrainer.training_step"}


def our_full_step(tr: Any) -> int:
    """One rollout + ``minibatches`` optimizer steps, as ``RLTrainer._next_rollout`` and ``_loop`` do them (l_old
    once per rollout, over the whole batch); generated tokens."""
    batch, _ = tr.rollout()
    tr.rollouts += 1
    batch, _ = tr.fill_old_logp(batch)
    for i, mb in enumerate(batch.split(tr.rc.minibatches, tr.shuffle_gen)):
        tr.train_step(mb, first_after_rollout=i == 0, minibatch_index=i)
    return int(batch.response_mask.sum())


def _dataset(tr: Any, n: int) -> tuple[Any, list[Any]]:
    """``n`` prompts of the training mixture (their own seeded stream) as a TRL dataset, and the problems."""
    from datasets import Dataset

    from ..train.run import problem_stream

    stream = problem_stream(tr.cfg, np.random.default_rng([tr.cfg.seed, 17]), list(tr.tasks.values()))
    problems = [next(stream) for _ in range(n)]
    bos = tr.tokenizer.bos_token
    return Dataset.from_dict({"prompt": [bos + p.prompt for p in problems], "idx": list(range(n))}), problems


class UnsupportedTRL(RuntimeError):
    """The installed TRL lacks a setting the comparison needs."""


def _grpo_args(rc: Any, out_dir: Path, cycles: int, seed: int, cuda: bool) -> Any:
    """TRL's settings equal to ours where TRL has one (see the module docstring)."""
    from trl import GRPOConfig

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecations hit by TRL
    try:
        return GRPOConfig(
            output_dir=str(out_dir), report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
            use_cpu=not cuda, bf16=cuda, seed=seed, max_steps=rc.minibatches * cycles,
            per_device_train_batch_size=rc.minibatch_size, gradient_accumulation_steps=1,
            steps_per_generation=rc.minibatches, num_iterations=1, num_generations=rc.group_size,
            max_completion_length=rc.max_new_tokens, temperature=rc.temperature, top_p=rc.top_p, top_k=0,
            learning_rate=rc.lr, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
            adam_beta1=rc.betas[0], adam_beta2=rc.betas[1], adam_epsilon=rc.adam_eps, weight_decay=rc.weight_decay,
            max_grad_norm=rc.grad_clip, beta=0.0, epsilon=rc.eps_lo, epsilon_high=rc.eps_hi, loss_type="dapo",
            scale_rewards="group" if rc.adv_scale == "group" else "none", shuffle_dataset=False,
            dataloader_num_workers=0, log_completions=False,
        )
    except TypeError as e:  # an older TRL without one of these options
        raise UnsupportedTRL(f"TRL {__import__('trl').__version__}'s GRPOConfig rejects a setting this benchmark "
                             f"needs ({e}); it was written against TRL 1.16") from e


def _run(ours: Any, ckpt: Path, d: Path, rounds: int) -> tuple[Samples, Samples, list[str]]:
    import torch
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOTrainer

    from ..models import load_model, load_tokenizer

    rc = ours.rc
    cycles = 1 + rounds + 1  # warm-up, timed rounds, one memory round
    tok = load_tokenizer(ckpt)
    trunk = load_model(ckpt, device=ours.device).trunk
    data, problems = _dataset(ours, rc.prompts_per_rollout * cycles)
    generated = []

    def reward(completions, completion_ids, idx, **_):
        generated.append(sum(len(ids) for ids in completion_ids))
        return [float(ours.tasks[problems[i].suite].reward(problems[i], text)) for i, text in zip(idx, completions)]

    args = _grpo_args(rc, d / "trl", cycles, ours.cfg.seed, cuda=ours.device.type == "cuda")
    ours_s, trl_s = Samples(), Samples()
    trl_timer = PhaseTimer(TRL_PHASES)

    class Interleave(TrainerCallback):
        """After every full TRL step: record it, then run and time one of ours."""

        def __init__(self) -> None:
            self.start = 0.0
            self.cycle = 0

        def on_train_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, args_, state, *a, **k):
            if state.global_step % rc.minibatches:
                return
            now = time.perf_counter()
            self.cycle += 1
            if 1 < self.cycle < cycles:  # timed rounds: this TRL step, then one of ours
                trl_s.times.append(now - self.start)
                trl_s.values.append(generated[-1])
                t0 = time.perf_counter()
                ours_s.values.append(our_full_step(ours))
                ours_s.times.append(time.perf_counter() - t0)
            elif self.cycle == 1:
                our_full_step(ours)  # warm-up
            if self.cycle == cycles - 1:  # the next TRL step is the memory (and phase) round
                trl_timer.__enter__()
                trl_s.rss_delta_mb = PEAK.reset()
            self.start = time.perf_counter()

        def on_train_end(self, *a, **k):
            before = trl_s.rss_delta_mb
            peak = PEAK.peak()
            trl_timer.__exit__()
            trl_s.peak_rss_mb = peak if before is not None else None
            trl_s.rss_delta_mb = peak - before if before is not None else None

    torch.manual_seed(ours.cfg.seed)
    grpo = GRPOTrainer(model=trunk, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                       callbacks=[Interleave()])
    grpo.remove_callback(PrinterCallback)  # the end-of-training metrics dump
    grpo.train()
    with PhaseTimer(OUR_PHASES) as our_timer:
        measure_memory(lambda: our_full_step(ours), ours_s)
    notes = [
        "what differs (TRL's API leaves no equal choice): (1) sampling: TRL calls transformers generate "
        "(multinomial over the full vocabulary: temperature 1, top_p 1, top_k 0), ours its own KV-cached sampler "
        "(inverse-CDF; the same distribution); (2) the DAPO token mean: TRL divides every update by the mean "
        "tokens per update over the whole generation batch, ours by the update's own tokens (a per-step scale, "
        "no cost difference); (3) advantages: TRL (r − mean)/(std + 1e-4), ours std + 1e-6; (4) prompts: the "
        "same mixture and token ids, but TRL's come from an in-memory Dataset through its RepeatSampler and ours "
        "from the trainer's problem stream, so the problems (and response lengths) differ row by row: tokens/s "
        "counts each side's own tokens; (5) TRL's step includes HF Trainer/accelerate bookkeeping (dataloader, "
        "callbacks, metric accumulation with logging off) and an entropy per training forward; ours includes its "
        "log-prob proxies, entropy and metric record. Both recompute l_old at the rollout parameters before the "
        "first update, shuffle the batch into 4 updates, use AdamW (constant lr, same betas/eps/decay), clip "
        "at 1.0, no KL. Rewards of the untrained model are 0 for both, so advantages are 0; both still run every "
        "forward and backward",
        f"TRL {__import__('trl').__version__}: one full step = generation of {rc.batch_size} completions + "
        f"{rc.minibatches} optimizer steps of {rc.minibatch_size} rows; ratio = median over rounds of ours/TRL "
        "tokens/s",
        f"where one full step's time goes (the untimed memory round, inclusive): ours: "
        f"{describe_phases(our_timer.per_call(1))}; TRL: {describe_phases(trl_timer.per_call(1))}",
    ]
    return ours_s, trl_s, notes
