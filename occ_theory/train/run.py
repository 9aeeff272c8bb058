"""What every run shares: device, threads, run directory, config dump, autocast, the task mixture and
its checks (a user dataset must fit the model's context, as the model is asked it), the held-out evaluation,
log lines."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import check_output_dir
from ..extras import check_run, is_gguf, require
from ..models.tokenizer import is_character_tokenizer
from ..names import EVAL_FILE
from ..runtime import resolve_device, set_threads
from ..tasks import SUITES, Problem, Task, UserTask, get_task, train_stream
from ..tasks.chat import ChatTask, natural_problem
from .config import Config, dump_config
from .evaluate import evaluate_sets, prompt_ids, suite_sets, tasks_for


def default_run_name(cfg: Config, kind: str) -> str:
    """``{task}__{regime}__{seed}__{time}`` (CleanRL style); ``kind`` is the regime or 'sft'."""
    return f"{cfg.name}__{kind}__{cfg.seed}__{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass
class RunContext:
    cfg: Config
    run_dir: Path
    device: torch.device
    start: float = field(default_factory=time.perf_counter)
    main: bool = True  # the process that writes files (rank 0)

    @classmethod
    def create(cls, cfg: Config, kind: str, run_name: str | None = None, out_dir: Path | None = None,
               resume: bool = False) -> RunContext:
        check_run(cfg, kind)  # the optional dependencies the run needs, before anything is written
        device = resolve_device(cfg.device)
        set_threads(cfg.threads)
        run_dir = Path(out_dir) if out_dir is not None else Path(cfg.out_dir) / (run_name or
                                                                                   default_run_name(cfg, kind))
        check_output_dir(run_dir, "run directory (--out)")
        if not resume and run_dir.exists() and any(run_dir.iterdir()):
            command = "sft" if kind == "sft" else "rl"
            raise ValueError(f"run directory {run_dir} already exists and is not empty (continue its run with occ "
                             f"{command} --resume {run_dir}, or give another --out)")
        return cls(cfg, run_dir, device)

    def begin(self) -> None:
        """Create the run directory and write the resolved config: call once the inputs are validated."""
        if not self.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not (self.run_dir / "config.yaml").exists():
            dump_config(self.cfg, self.run_dir / "config.yaml")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.device.type == "cuda" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def log(self, msg: str, echo: bool = True) -> None:
        """``msg`` to ``run.log`` and (``echo``) stderr. A ``run.log`` that cannot be written (a full disk) is
        skipped: the line still reaches stderr, and the write error that stops the run is reported once."""
        if not self.main:
            return
        line = f"[occ {time.strftime('%H:%M:%S')}] {msg}"
        if echo:
            print(line, file=sys.stderr, flush=True)
        try:
            with open(self.run_dir / "run.log", "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError:
            if not echo:
                print(line, file=sys.stderr, flush=True)


def training_tasks(cfg: Config) -> list[Task]:
    """The tasks prompts are drawn from (a user dataset replaces the suites)."""
    if cfg.task.user_data is not None:
        task = UserTask.from_file(cfg.task.user_data)
        if len(task.held_out(len(task.problems))) < len(task.problems):
            return [task]
        raise ValueError(f"config key 'task.user_data': every one of the {len(task.problems)} problems of "
                         f"{cfg.task.user_data} falls in the held-out split; none is left to train on")
    return [get_task(s, **cfg.task.difficulty.get(s, {})) for s in cfg.task.suites]


def training_data(cfg: Config) -> str:
    """What a run trains on, for its log."""
    return f"user data {cfg.task.user_data}" if cfg.task.user_data is not None else ", ".join(cfg.task.suites)


def check_user_data(tasks: list[Task], tokenizer: Any, context: int, new_tokens: int, held_out_only: bool = False
                    ) -> list[str]:
    """Refuse a user record that does not fit the model's ``context`` positions (``max_position_embeddings``):
    the prompt's tokens as the model is asked it (``tasks`` as ``tasks_for`` gives them: a pretrained model's
    ``ChatTask`` adds the answer-format instruction; ``prompt_ids`` the chat template) plus ``new_tokens``
    generated ones, or plus its target and EOS (SFT). Returns the notes for the run's log: one counting the
    characters the tokenizer turns into its unknown token, one when no problem is held out (no evaluation then),
    one when a pretrained model's tokenizer has no chat template (its prompts go in raw). ``held_out_only``: check
    only the held-out problems (``occ eval`` asks no other)."""
    warnings = []
    if not is_character_tokenizer(tokenizer) and not getattr(tokenizer, "chat_template", None):
        warnings.append("note: the model's tokenizer has no chat template: prompts go in as plain text "
                        f"({'its BOS token, then ' if tokenizer.bos_token_id is not None else ''}the question and "
                        "the answer-format instruction), not as a chat turn")
    longest = max(len(t) for t in tokenizer.get_vocab())  # a token spells at most this many characters
    for task in tasks:
        user = task.task if isinstance(task, ChatTask) else task
        if not isinstance(user, UserTask):
            continue
        unk, records, first = 0, 0, None
        for raw in user.held_out(len(user.problems)) if held_out_only else user.problems:
            p = natural_problem(raw) if task is not user else raw  # as the model is asked it
            line = p.meta.get("where", f"record {p.meta.get('index')}")
            where = f"{p.meta.get('source', 'user data')}, {line}"
            if len(p.prompt) > longest * context:  # cannot fit: refused without tokenizing it
                raise ValueError(f"{where}: the prompt has {len(raw.prompt)} characters, far more than the model's "
                                 f"{context} positions (max_position_embeddings) can hold")
            ids = prompt_ids(tokenizer, p.prompt)
            target = tokenizer.encode(p.target, add_special_tokens=False)
            need = len(ids) + max(new_tokens, len(target) + 1)
            if need > context:
                raise ValueError(f"{where}: the prompt is {len(ids)} tokens as the model is asked it and needs up to "
                                 f"{need - len(ids)} more (response or target), {need} in all, but the model has "
                                 f"{context} positions (max_position_embeddings): shorten the prompt, lower the "
                                 "new-token limit or use a model with a longer context")
            n = [*ids, *target].count(tokenizer.unk_token_id) if tokenizer.unk_token_id is not None else 0
            if n:
                unk, records, first = unk + n, records + 1, first or where
        if unk:
            warnings.append(f"warning: {unk} characters in {records} records of the user data are not in the "
                            "tokenizer's vocabulary (e.g. tabs, non-ASCII) and become its unknown token; first at "
                            f"{first}")
        if not user.held_out(1):
            warnings.append(f"warning: none of the {len(user.problems)} user problems falls in the held-out split "
                            "(about 20% of prompts, by a hash of the prompt): the run has no held-out evaluation")
    return warnings


def eval_sets(cfg: Config, tokenizer: Any, size: int, tasks: list[Task] | None = None,
              ) -> dict[str, tuple[Task, list[Problem]]]:
    """The held-out sets: the first ``size`` held-out problems of the user data (``UserTask.held_out``),
    else the six suites' fixed sets (``eval.seed``, ``task.difficulty``); both as ``tokenizer``'s model is
    asked them (a pretrained model's user task is a ``ChatTask`` around the ``UserTask``)."""
    if cfg.task.user_data is None:
        return suite_sets(tokenizer, SUITES, size, cfg.eval.seed, cfg.task.difficulty, cfg.task.parse)
    sets = {}
    for t in tasks if tasks is not None else tasks_for(tokenizer, training_tasks(cfg), cfg.task.parse):
        user = t.task if isinstance(t, ChatTask) else t
        if isinstance(user, UserTask) and user.held_out(1):
            problems = user.held_out(size)
            sets[t.name] = (t, [natural_problem(p) for p in problems] if t is not user else problems)
    return sets


def evaluate_run(model: torch.nn.Module, tokenizer: Any, cfg: Config, size: int, samples: int,
                 tasks: list[Task] | None = None, autocast_dtype: torch.dtype | None = None,
                 progress: str | None = None) -> dict[str, Any]:
    """Held-out evaluation of a run's data (``eval_sets``) with the ``eval`` settings; the result records
    them under ``settings``. Empty when there is nothing held out."""
    sets = eval_sets(cfg, tokenizer, size, tasks)
    if not sets:
        return {}
    ec = cfg.eval
    result = evaluate_sets(model, tokenizer, sets, samples, ec.temperature, ec.max_new_tokens, ec.seed,
                           autocast_dtype=autocast_dtype, progress=progress)
    result["settings"] = {"data": cfg.task.user_data or "suites", "size": size, "samples": samples,
                          "temperature": ec.temperature, "max_new_tokens": ec.max_new_tokens, "seed": ec.seed}
    if cfg.task.parse != "stated":  # answers not stated in the asked format were scored too
        result["settings"]["parse"] = cfg.task.parse
    return result


def evaluate_checkpoint(checkpoint: Path, cfg: Config, out: Path | None = None, progress: str | None = None
                        ) -> tuple[dict[str, Any], Path]:
    """``occ eval``: the held-out evaluation of a saved checkpoint (or of a pretrained model, ``models.load_any``)
    with ``cfg``'s ``eval`` settings, written atomically to ``out`` (default ``CHECKPOINT/eval.json``; checked
    before any work); returns it and the path. A user dataset is checked against the model's context first
    (``check_user_data``), its notes printed on stderr."""
    import json

    from ..atomic import atomic_write_text, check_output_file
    from ..models import load_any

    out = Path(out) if out is not None else Path(checkpoint) / EVAL_FILE
    check_output_file(out, "--json")
    if is_gguf(checkpoint):
        require("gguf", f"{checkpoint} (a .gguf file)")
    data = [UserTask.from_file(cfg.task.user_data)] if cfg.task.user_data is not None else []
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    model, tok = load_any(checkpoint, cfg.model.mtp_depths, cfg.model.mtp_init, seed=cfg.seed, device=device)
    tasks = tasks_for(tok, data, cfg.task.parse) if data else None
    for note in check_user_data(tasks or [], tok, model.trunk.config.max_position_embeddings,
                                cfg.eval.max_new_tokens, held_out_only=True):
        print(f"occ eval: {note}", file=sys.stderr)
    ec = cfg.eval
    res = evaluate_run(model, tok, cfg, ec.size, ec.samples, tasks=tasks, progress=progress,
                       autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    if not res:
        raise ValueError(f"config key 'task.user_data': {cfg.task.user_data} has no held-out problem to evaluate")
    atomic_write_text(out, json.dumps(res, indent=2))
    return res, out


def problem_stream(cfg: Config, rng: np.random.Generator, tasks: list[Task] | None = None) -> Any:
    """Endless training problems; all randomness from ``rng`` (so its state resumes the stream)."""
    tasks = tasks if tasks is not None else training_tasks(cfg)
    weights = cfg.task.weights if cfg.task.user_data is None else None
    return train_stream(tasks, rng, weights)
