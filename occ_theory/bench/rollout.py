"""``rollout``: tokens/s of ``occ_theory.rl.sampler.generate`` against ``transformers`` ``generate``.

The same tiny model (``ModelConfig.tiny()``, eval mode), the same prompts (random printable
characters after ``<bos>``, lengths uniform in 6–14, left-padded), 40 new tokens, temperature 1,
top-p 1 (transformers: also ``top_k=0``, so both sample from the full vocabulary), stop at EOS.
Generated tokens are counted alike for both: per row, the tokens up to and including its first
EOS (all generated tokens when there is none). tokens/s is per call; the ratio is the median over
rounds of ours/theirs, the two calls of a round back to back.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch

from .common import BenchResult, interleave, paired_ratio, target
from .fixtures import checkpoint
from .profiling import describe_ops, top_ops

NEW_TOKENS = 40
PROMPT_LENS = (6, 14)
TARGET = 2.0


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
    for batch in batches:
        prompts = random_prompts(batch, tok.bos_token_id, trunk.config.vocab_size, seed=batch)
        ids, mask = (t.to(device) for t in left_pad(prompts, pad))
        gen = torch.Generator(device=device).manual_seed(0)
        torch.manual_seed(0)  # transformers samples from the global generator

        def ours(prompts=prompts, gen=gen) -> int:
            ro = generate(model, prompts, NEW_TOKENS, 1.0, 1.0, eos_id=eos, pad_id=pad, generator=gen)
            return int(ro.response_lengths.sum())

        def theirs(ids=ids, mask=mask) -> int:
            out = trunk.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=NEW_TOKENS,
                                 temperature=1.0, top_p=1.0, top_k=0, eos_token_id=eos, pad_token_id=pad)
            return generated_tokens(out, ids.shape[1], eos)

        s = interleave({"ours": ours, "transformers": theirs}, rounds=3 * repeats, warmup=1,
                       progress=f"rollout/batch {batch}")
        ours_rate, hf_rate = s["ours"].rates(float), s["transformers"].rates(float)
        med, lo, hi = paired_ratio(ours_rate, hf_rate)
        res.rows.append({
            "batch": batch, "new_tokens": NEW_TOKENS, "ours_tok_s": statistics.median(ours_rate),
            "ours_spread": s["ours"].spread, "hf_tok_s": statistics.median(hf_rate),
            "hf_spread": s["transformers"].spread,
            "ours_tok_per_row": statistics.mean(s["ours"].values) / batch,
            "hf_tok_per_row": statistics.mean(s["transformers"].values) / batch,
            "ours_rss_delta_mb": s["ours"].rss_delta_mb, "hf_rss_delta_mb": s["transformers"].rss_delta_mb,
            **target(med, ">=", TARGET), "ratio_min": lo, "ratio_max": hi, "calls": 3 * repeats,
        })
        if not res.rows[-1]["met"]:
            res.notes.append(f"batch {batch} misses ({med:.2f}×). Top ops per call: ours: "
                             f"{describe_ops(top_ops(ours, calls=1))}; transformers: "
                             f"{describe_ops(top_ops(theirs, calls=1))}")
    res.notes.append(f"prompts: <bos> + random characters, {PROMPT_LENS[0]}–{PROMPT_LENS[1]} tokens, "
                     "left-padded; ours pads its token lists inside the timed call, transformers gets the padded "
                     "tensors; ratio = median over rounds of ours/transformers tokens/s")
    return res
