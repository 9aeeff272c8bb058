"""What every run shares: device, run directory, config dump, autocast, the task mixture, log lines."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..tasks import Task, UserTask, get_task, train_stream
from .config import Config, dump_config


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("config key 'device': cuda was asked for but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per process under torchrun
        name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return torch.device(name)


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
        device = resolve_device(cfg.device)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        run_dir = Path(out_dir) if out_dir is not None else Path(cfg.out_dir) / (run_name or
                                                                                   default_run_name(cfg, kind))
        if not resume and run_dir.exists() and any(run_dir.iterdir()):
            raise ValueError(f"run directory {run_dir} already exists and is not empty (use --resume or another "
                             "--out)")
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

    def log(self, msg: str) -> None:
        if not self.main:
            return
        line = f"[occ {time.strftime('%H:%M:%S')}] {msg}"
        print(line, file=sys.stderr, flush=True)
        with open(self.run_dir / "run.log", "a", encoding="utf-8") as f:
            f.write(line + "\n")


def training_tasks(cfg: Config) -> list[Task]:
    """The tasks prompts are drawn from (a user dataset replaces the suites)."""
    if cfg.task.user_data is not None:
        return [UserTask.from_file(cfg.task.user_data)]
    return [get_task(s, **cfg.task.difficulty.get(s, {})) for s in cfg.task.suites]


def problem_stream(cfg: Config, rng: np.random.Generator, tasks: list[Task] | None = None) -> Any:
    """Endless training problems; all randomness from ``rng`` (so its state resumes the stream)."""
    tasks = tasks if tasks is not None else training_tasks(cfg)
    weights = cfg.task.weights if cfg.task.user_data is None else None
    return train_stream(tasks, rng, weights)
