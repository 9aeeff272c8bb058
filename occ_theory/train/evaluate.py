"""Held-out evaluation on the six suites: greedy pass@1 and sampled mean@k.

Each suite's evaluation set is fixed (``occ_theory.tasks.eval_set``, seeded) and disjoint from
training data by construction. A response is the generated text up to EOS; the suite's own
verifier scores it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..rl.sampler import generate
from ..tasks import SUITES, Problem, Task, eval_set, get_task


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """``<bos>`` + the prompt's characters: what every trainer and the evaluator feed the model."""
    return [tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]


def decode_response(tokenizer: Any, ids: list[int]) -> str:
    """The response text up to (not including) the first EOS."""
    eos = tokenizer.eos_token_id
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def score(model: nn.Module, tokenizer: Any, task: Task, problems: list[Problem], max_new_tokens: int, *, greedy: bool,
          samples: int = 1, temperature: float = 1.0, generator: torch.Generator | None = None,
          batch_size: int = 256, autocast_dtype: torch.dtype | None = None) -> list[float]:
    """Mean reward of each problem over ``samples`` responses (1 when greedy)."""
    rows = [(i, p) for i, p in enumerate(problems) for _ in range(1 if greedy else samples)]
    totals = [0.0] * len(problems)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        out = generate(model, [prompt_ids(tokenizer, p.prompt) for _, p in chunk], max_new_tokens,
                       temperature=temperature, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                       generator=generator, greedy=greedy, autocast_dtype=autocast_dtype)
        for (i, p), resp in zip(chunk, out.responses):
            totals[i] += task.reward(p, decode_response(tokenizer, resp))
    n = 1 if greedy else samples
    return [t / n for t in totals]


def evaluate_suites(model: nn.Module, tokenizer: Any, suites: tuple[str, ...] = SUITES, size: int = 200,
                    samples: int = 4, temperature: float = 1.0, max_new_tokens: int = 48, seed: int = 1234,
                    difficulty: dict[str, dict] | None = None, generator: torch.Generator | None = None,
                    autocast_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """``{"suites": {name: {"greedy_acc", "mean_at_k", "n", "k"}}, "mean_greedy_acc", "mean_at_k"}``.

    ``samples=0`` skips the sampled evaluation.
    """
    difficulty = difficulty or {}
    was_training = model.training
    model.eval()
    if samples > 0 and generator is None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    result: dict[str, Any] = {"suites": {}}
    try:
        for suite in suites:
            settings = difficulty.get(suite, {})
            task, problems = get_task(suite, **settings), eval_set(suite, size, seed=seed, **settings)
            greedy = score(model, tokenizer, task, problems, max_new_tokens, greedy=True, autocast_dtype=autocast_dtype)
            entry = {"n": len(problems), "greedy_acc": sum(greedy) / len(greedy), "k": samples}
            if samples > 0:
                sampled = score(model, tokenizer, task, problems, max_new_tokens, greedy=False, samples=samples,
                                temperature=temperature, generator=generator, autocast_dtype=autocast_dtype)
                entry["mean_at_k"] = sum(sampled) / len(sampled)
            result["suites"][suite] = entry
    finally:
        model.train(was_training)
    accs = [e["greedy_acc"] for e in result["suites"].values()]
    result["mean_greedy_acc"] = sum(accs) / len(accs) if accs else float("nan")
    if samples > 0 and accs:
        result["mean_at_k"] = sum(e["mean_at_k"] for e in result["suites"].values()) / len(accs)
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'suite':<16}{'n':>6}{'greedy pass@1':>16}{'mean@k':>10}"]
    for suite, e in result["suites"].items():
        mk = f"{e['mean_at_k']:.3f}" if "mean_at_k" in e else "-"
        lines.append(f"{suite:<16}{e['n']:>6}{e['greedy_acc']:>16.3f}{mk:>10}")
    lines.append(f"{'mean':<16}{'':>6}{result['mean_greedy_acc']:>16.3f}"
                 f"{result['mean_at_k']:>10.3f}" if "mean_at_k" in result else
                 f"{'mean':<16}{'':>6}{result['mean_greedy_acc']:>16.3f}")
    return "\n".join(lines)
