"""Held-out evaluation on the six suites: greedy pass@1 and sampled mean@k; how prompts are fed.

Each suite's evaluation set is fixed (``occ_theory.tasks.eval_set``, seeded) and disjoint from
training data by construction. A response is the generated text up to EOS; the suite's own
verifier scores it. With the built-in character tokenizer the suites are asked symbolically
(``347+285=``); with any other tokenizer (a pretrained model's) they are asked in natural language
and scored on free text (``occ_theory.tasks.chat``, chosen by ``tasks_for``), and the prompt goes
through the tokenizer's chat template when it has one (``prompt_ids``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models.tokenizer import is_character_tokenizer
from ..progress import Progress
from ..rl.sampler import generate
from ..tasks import SUITES, Problem, Task, eval_set, get_task
from ..tasks.chat import ChatTask, natural_problem


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """What every trainer and the evaluator feed the model before the response.

    With a chat template: the prompt as one user turn, rendered with the generation prompt (the
    template places any BOS itself). Without one: the BOS token, when the tokenizer has one
    (Qwen2's and GPT-2-style tokenizers have none), then the prompt's tokens.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return [*bos, *tokenizer.encode(prompt, add_special_tokens=False)]


def tasks_for(tokenizer: Any, tasks: list[Task], parse: str = "stated") -> list[Task]:
    """The tasks as ``tokenizer``'s model is asked them: as they are for the character tokenizer,
    in natural language (``ChatTask``, reading answers as ``parse`` says) for any other."""
    return list(tasks) if is_character_tokenizer(tokenizer) else [ChatTask(t, parse) for t in tasks]


def decode_response(tokenizer: Any, ids: list[int]) -> str:
    """The response text up to (not including) the first EOS."""
    eos = tokenizer.eos_token_id
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True)


@torch.no_grad()
def mtp_agreement(model: nn.Module, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int,
                  batch_size: int = 64, autocast_dtype: torch.dtype | None = None) -> dict[int, float]:
    """``{k: a_k}``: top-1 agreement of MTP depth k with the main head on greedy generations from ``prompts``.

    ``a_k`` is the share of generated tokens t whose depth-k argmax (position t−k−1) equals the main
    head's argmax for the same token (position t−1), over tokens whose depth-k inputs are real tokens:
    the acceptance rate of a depth-k draft in greedy speculative decoding.
    """
    hits = [0] * model.num_mtp
    counts = [0] * model.num_mtp
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            ro = generate(model, prompts[start:start + batch_size], max_new_tokens, eos_id=tokenizer.eos_token_id,
                          pad_id=tokenizer.pad_token_id, generator=None, greedy=True, autocast_dtype=autocast_dtype)
            real, response = ro.attention_mask.bool(), ro.response_mask.bool()  # (B, L)
            with torch.autocast(real.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits, mtp_logits = model(ro.input_ids, attention_mask=ro.attention_mask)
            main = logits[:, :-1].argmax(-1)  # (B, L-1): entry t-1 is the main head's pick for token t
            seq = ro.input_ids.shape[1]
            for k, lg in enumerate(mtp_logits, start=1):
                draft = lg[:, : seq - k - 1].argmax(-1)  # (B, L-k-1): entry t-k-1 drafts token t
                valid = response[:, k + 1:] & real[:, : seq - k - 1]  # token t generated, depth-k inputs real
                hits[k - 1] += int(((draft == main[:, k:]) & valid).sum())
                counts[k - 1] += int(valid.sum())
    finally:
        model.train(was_training)
    return {k: hits[k - 1] / counts[k - 1] if counts[k - 1] else float("nan") for k in range(1, model.num_mtp + 1)}


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


def suite_sets(tokenizer: Any, suites: tuple[str, ...] = SUITES, size: int = 200, seed: int = 1234,
               difficulty: dict[str, dict] | None = None, parse: str = "stated") -> dict[str, tuple[Task, list[Problem]]]:
    """Each suite's fixed held-out set of ``size`` problems, as ``tokenizer``'s model is asked them."""
    difficulty = difficulty or {}
    sets = {}
    for suite in suites:
        settings = difficulty.get(suite, {})
        [task] = tasks_for(tokenizer, [get_task(suite, **settings)], parse)
        problems = eval_set(suite, size, seed=seed, **settings)
        if isinstance(task, ChatTask):
            problems = [natural_problem(p) for p in problems]
        sets[suite] = (task, problems)
    return sets


def evaluate_sets(model: nn.Module, tokenizer: Any, sets: dict[str, tuple[Task, list[Problem]]], samples: int = 4,
                  temperature: float = 1.0, max_new_tokens: int = 48, seed: int = 1234,
                  generator: torch.Generator | None = None, autocast_dtype: torch.dtype | None = None,
                  progress: str | None = None) -> dict[str, Any]:
    """``{"suites": {name: {"greedy_acc", "mean_at_k", "n", "k"}}, "mean_greedy_acc", "mean_at_k"}`` over
    ``sets`` (name -> task and problems). ``samples=0`` skips the sampled evaluation; ``progress`` (a
    label) draws a status line per set."""
    was_training = model.training
    model.eval()
    if samples > 0 and generator is None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    result: dict[str, Any] = {"suites": {}}
    bar = Progress(progress, len(sets)) if progress else None
    try:
        for i, (name, (task, problems)) in enumerate(sets.items(), 1):
            greedy = score(model, tokenizer, task, problems, max_new_tokens, greedy=True, autocast_dtype=autocast_dtype)
            entry = {"n": len(problems), "greedy_acc": sum(greedy) / len(greedy), "k": samples}
            if samples > 0:
                sampled = score(model, tokenizer, task, problems, max_new_tokens, greedy=False, samples=samples,
                                temperature=temperature, generator=generator, autocast_dtype=autocast_dtype)
                entry["mean_at_k"] = sum(sampled) / len(sampled)
            result["suites"][name] = entry
            if bar is not None:
                bar.update(i, set=name)
    finally:
        model.train(was_training)
    accs = [e["greedy_acc"] for e in result["suites"].values()]
    result["mean_greedy_acc"] = sum(accs) / len(accs) if accs else float("nan")
    if samples > 0 and accs:
        result["mean_at_k"] = sum(e["mean_at_k"] for e in result["suites"].values()) / len(accs)
    return result


def evaluate_suites(model: nn.Module, tokenizer: Any, suites: tuple[str, ...] = SUITES, size: int = 200,
                    samples: int = 4, temperature: float = 1.0, max_new_tokens: int = 48, seed: int = 1234,
                    difficulty: dict[str, dict] | None = None, generator: torch.Generator | None = None,
                    autocast_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """``evaluate_sets`` on the suites' fixed held-out sets (``suite_sets``)."""
    return evaluate_sets(model, tokenizer, suite_sets(tokenizer, suites, size, seed, difficulty), samples,
                         temperature, max_new_tokens, seed, generator, autocast_dtype)


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'suite':<16}{'n':>6}{'greedy pass@1':>16}{'mean@k':>10}"]
    if "settings" in result:
        lines.insert(0, "settings: " + ", ".join(f"{k} {v}" for k, v in result["settings"].items()))
    for suite, e in result["suites"].items():
        mk = f"{e['mean_at_k']:.3f}" if "mean_at_k" in e else "-"
        lines.append(f"{suite:<16}{e['n']:>6}{e['greedy_acc']:>16.3f}{mk:>10}")
    lines.append(f"{'mean':<16}{'':>6}{result['mean_greedy_acc']:>16.3f}"
                 f"{result['mean_at_k']:>10.3f}" if "mean_at_k" in result else
                 f"{'mean':<16}{'':>6}{result['mean_greedy_acc']:>16.3f}")
    return "\n".join(lines)
