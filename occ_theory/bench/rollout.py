"""``rollout``: tokens/s of ``occ_theory.rl.sampler.generate`` (the hand-written static-KV decoder)
against ``transformers`` ``generate`` in its CPU configurations.

Contenders: ``generate`` with the default dynamic cache, with a static cache
(``cache_implementation="static"``), and with a static cache and its decode forward compiled by
``torch.compile`` (``compile_config``; transformers compiles off accelerators only when told to).
The compiled one is left out under ``--quick`` (its first call compiles for tens of seconds), and
with a note when compiling fails; ``first_call_s`` (the untimed warm-up) holds its compile time.

The same tiny model (``ModelConfig.tiny()``, eval mode), the same prompts (random printable
characters after ``<bos>``, lengths uniform in 6–14, left-padded), 40 new tokens, temperature 1,
top-p 1 (transformers: also ``top_k=0``, so all sample from the full vocabulary), stop at EOS, at
the trainer's batch sizes (8 prompts × 8 samples = 64, and 8). Generated tokens are counted alike
for all: per row, the tokens up to and including its first EOS (all generated tokens when there
is none). tokens/s is per call; ``ratio`` is the median over rounds of hand-written/contender (the
calls of a round back to back). The decision table holds the hand-written decoder against the
fastest ``generate`` at each batch (the smallest ratio): it earns its place at ≥ ``TARGET``×.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .common import BenchResult, interleave, paired_ratio, target
from .fixtures import checkpoint
from .profiling import describe_ops, top_ops

NEW_TOKENS = 40
PROMPT_LENS = (6, 14)
TARGET = 1.5
HAND_WRITTEN = "hand-written static-KV"
COMPILED = "generate static+compiled"


def random_prompts(n: int, bos: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(PROMPT_LENS[0], PROMPT_LENS[1] + 1, (n,), generator=g).tolist()
    return [[bos, *torch.randint(4, vocab, (k - 1,), generator=g).tolist()] for k in lens]


def left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def generated_tokens(out: torch.Tensor, prompt_width: int, eos: int) -> int:
    """Tokens per row up to and including the first EOS (all of them without one), summed."""
    gen = out[:, prompt_width:]
    is_eos = gen == eos
    per_row = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, gen.shape[1])
    return int(per_row.sum())


def _compile_config() -> Any:
    """``torch.compile`` of the decode forward on any device (transformers' default compiles on CUDA only);
    ``mode="default"``: the CUDA-graph default ``reduce-overhead`` does nothing on CPU."""
    from transformers import CompileConfig

    cfg = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    cfg._compile_all_devices = True  # without it transformers compiles on accelerators only (a private field)
    return cfg


def bench_rollout(repeats: int, threads: int, quick: bool = False, batches: tuple[int, ...] = (64, 8)
                  ) -> BenchResult:
    from ..models import load_model, load_tokenizer
    from ..rl.sampler import generate

    res = BenchResult("rollout")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint(Path(tmp) / "ckpt")
        model, tok = load_model(ckpt), load_tokenizer(ckpt)
    model.eval()
    device = model.trunk.get_output_embeddings().weight.device
    trunk, eos, pad = model.trunk, tok.eos_token_id, tok.pad_token_id
    settings = {"generate dynamic": {}, "generate static": {"cache_implementation": "static"}}
    if not quick:
        settings[COMPILED] = {"cache_implementation": "static", "compile_config": _compile_config()}
    decision = []
    for batch in batches:
        prompts = random_prompts(batch, tok.bos_token_id, trunk.config.vocab_size, seed=batch)
        ids, mask = (t.to(device) for t in left_pad(prompts, pad))
        gen = torch.Generator(device=device).manual_seed(0)
        torch.manual_seed(0)  # transformers samples from the global generator

        def ours(prompts=prompts, gen=gen) -> int:
            ro = generate(model, prompts, NEW_TOKENS, 1.0, 1.0, eos_id=eos, pad_id=pad, generator=gen)
            return int(ro.response_lengths.sum())

        def theirs(kw: dict[str, Any], ids=ids, mask=mask) -> Callable[[], int]:
            def call() -> int:
                out = trunk.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=NEW_TOKENS,
                                     temperature=1.0, top_p=1.0, top_k=0, eos_token_id=eos, pad_token_id=pad, **kw)
                return generated_tokens(out, ids.shape[1], eos)
            return call

        fns = {HAND_WRITTEN: ours, **{name: theirs(kw) for name, kw in settings.items()}}
        first_call_s = {}
        for name, fn in list(fns.items()):  # the warm-up, timed: the compiled contender compiles here
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as e:  # torch.compile on CPU needs a working C++ toolchain: report, go on without it
                if name != COMPILED:
                    raise
                res.notes.append(f"batch {batch}: {COMPILED} left out, compiling failed: {type(e).__name__}: {e}")
                del fns[name], settings[name]
                continue
            first_call_s[name] = time.perf_counter() - t0
        s = interleave(fns, rounds=3 * repeats, warmup=0, progress=f"rollout/batch {batch}")
        rates = {name: s[name].rates(float) for name in fns}
        ratios = {name: paired_ratio(rates[HAND_WRITTEN], rates[name]) for name in settings}  # (median, min, max)
        for name in fns:
            med, lo, hi = ratios.get(name, (None, None, None))
            res.rows.append({
                "batch": batch, "contender": name, "tok_s": statistics.median(rates[name]), "spread": s[name].spread,
                "ratio": med, "ratio_min": lo, "ratio_max": hi, "tok_per_row": statistics.mean(s[name].values) / batch,
                "first_call_s": first_call_s[name], "rss_delta_mb": s[name].rss_delta_mb, "calls": 3 * repeats,
            })
        best = min(settings, key=lambda name: ratios[name][0])  # the generate closest to the hand-written decoder
        med, lo, hi = ratios[best]
        decision.append({"batch": batch, "best generate": best, **target(med, ">=", TARGET),
                         "ratio_min": lo, "ratio_max": hi})
        if not decision[-1]["met"]:
            res.notes.append(f"batch {batch} misses ({med:.2f}× {best}). Top ops per call: hand-written: "
                             f"{describe_ops(top_ops(ours, calls=1))}; {best}: "
                             f"{describe_ops(top_ops(fns[best], calls=1))}")
    res.tables["hand-written against the fastest generate"] = decision
    if quick:
        res.notes.append(f"--quick: {COMPILED} left out (its first call compiles for tens of seconds)")
    res.notes.append(f"prompts: <bos> + random characters, {PROMPT_LENS[0]}–{PROMPT_LENS[1]} tokens, "
                     "left-padded; the hand-written sampler pads its token lists inside the timed call, generate gets "
                     "the padded tensors; ratio = median over rounds of hand-written/contender tokens/s; first_call_s = "
                     "the untimed warm-up call (compilation for the compiled contender)")
    return res
