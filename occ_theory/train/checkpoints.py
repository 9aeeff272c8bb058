"""A run's checkpoint files (``checkpoints/step_NNNNNN.pt``, RL and SFT), the metrics a resumed run keeps, which
runs can be resumed, and the one-line error of a write that failed mid-run (``write_failed``).

One format whatever ``dist.strategy``: the model and the optimizer state in full (``state_dict()`` layouts; under
fsdp gathered on rank 0, one tensor at a time, into host memory), written by rank 0 alone, read by every process
(fsdp keeps its shard of each tensor). A checkpoint resumes under either strategy with the same number of processes
(every process's random generators are in it)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..atomic import as_write_error, atomic_write_text, describe_os_error
from ..errors import WriteFailed
from ..jsonl import read_jsonl

CKPT_RE = re.compile(r"^step_(\d{6,})\.pt$")


def checkpoint_files(d: Path) -> list[Path]:
    """Checkpoint files of a run, oldest step first (by number, not by name)."""
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint_file(state: dict[str, Any], run_dir: Path, step: int, keep: int, main: bool) -> Path:
    """``checkpoints/step_N.pt`` of ``run_dir``, written atomically by the main process (the others have already
    taken part in gathering ``state``), then all but the newest ``keep`` removed; its path on every process."""
    from ..atomic import atomic_torch_save

    d = Path(run_dir) / "checkpoints"
    path = d / f"step_{step:06d}.pt"
    if main:
        atomic_torch_save(state, path)
        for old in checkpoint_files(d)[:-keep]:
            old.unlink()
    return path


def read_checkpoint_file(path: Path, fmt: str, what: str) -> dict[str, Any]:
    """A checkpoint file's state dict (tensors on the CPU), refused in one line when it cannot be read or is not
    a ``fmt`` checkpoint (``what`` names the kind: ``"RL"``, ``"SFT"``)."""
    import torch

    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = next(iter(str(e).strip().splitlines()), "")  # torch's unpickling errors run to many lines
        raise ValueError(f"checkpoint {path} is corrupt or unreadable: {type(e).__name__}: {first}") from e
    if not isinstance(st, dict) or st.get("format") != fmt:
        raise ValueError(f"{path} is not an occ_theory {what} checkpoint")
    return st


def restore_training_state(state: dict[str, Any], path: Path, strategy: Any, model: Any, optimizer: Any,
                           schedule: Any, world: int, writers: int) -> None:
    """Load a checkpoint's model, optimizer and lr schedule into this run (a checkpoint written before the warm-up
    setting has no schedule: its lr was constant), refused in one line that names the checkpoint when they do not
    fit, or when ``writers`` processes wrote it and this run has ``world`` (each process's generators are in it)."""
    if writers != world:
        raise ValueError(f"checkpoint {path} was written by {writers} processes, this run has {world}")
    try:
        strategy.load_state(model, optimizer, state["model"], state["optimizer"])
        if "lr_schedule" in state:
            schedule.load_state_dict(state["lr_schedule"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"checkpoint {path} does not match this run's model or optimizer: {e}") from e


def resume_from_latest(run_dir: Path, run: Any, dist: Any, log: Callable[[str], None],
                       drop_after: Callable[[int], None] | None = None) -> None:
    """Bring ``run`` (an ``SFTRun`` or ``RLTrainer``: ``load_checkpoint``, ``step``) to ``run_dir``'s latest
    checkpoint, or leave it at step 0 without one. The main process first clears the temporary files of a killed
    write, then moves the metrics records past the checkpoint to ``metrics.orphaned.jsonl`` and calls
    ``drop_after(step)`` for whatever else belongs to the abandoned continuation."""
    ckpt = latest_checkpoint(run_dir)
    dist.barrier()  # every process has found the same checkpoint before the main one clears anything
    if dist.main:
        clear_unfinished_writes(run_dir)
    if ckpt is not None:
        run.load_checkpoint(ckpt)
    step = run.step if ckpt is not None else 0
    dropped = truncate_metrics(run_dir, step) if dist.main else 0
    if dist.main and drop_after is not None:
        drop_after(step)
    log("no checkpoint yet: restarting from step 0" if ckpt is None else
        f"resumed from {ckpt.name} (step {step}); {dropped} later records moved to metrics.orphaned.jsonl")


def clear_unfinished_writes(run_dir: Path) -> None:
    """Remove the temporary files of checkpoint writes a killed process left (an atomic write never leaves a torn
    checkpoint, only its ``.step_*.tmp``); the main process calls it before resuming."""
    for leftover in (Path(run_dir) / "checkpoints").glob(".step_*.tmp"):
        leftover.unlink()


def latest_checkpoint(run_dir: Path) -> Path | None:
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return None
    found = checkpoint_files(d)
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


def run_kind(run_dir: Path) -> str | None:
    """``"rl"`` or ``"sft"`` for a run directory of ``occ rl`` / ``occ sft`` (None when it cannot be told): an RL
    run writes ``init/`` before its first step, an SFT run ``checkpoint/`` at its end; else its first metrics
    record (``rl/…`` or ``sft/…`` keys) or its latest checkpoint's name says it."""
    run_dir = Path(run_dir)
    if (run_dir / "init").is_dir() or (run_dir / "probes").is_dir():
        return "rl"
    if (run_dir / "checkpoint").is_dir() or (run_dir / "mtp_agreement.json").is_file():
        return "sft"
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        with open(metrics, encoding="utf-8") as f:
            first = f.readline()
        for kind in ("sft", "rl"):
            if f'"{kind}/' in first:
                return kind
    return None


def check_resumable(run_dir: Path, kind: str) -> None:
    """Refuse, with one line saying what to do instead, ``occ {kind} --resume run_dir`` on a directory that is not a
    run, is a run of the other command, or finished (its checkpoints were deleted once final/ or checkpoint/ and its
    evaluation were written)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"--resume {run_dir}: not a run directory (config.yaml is missing)")
    found = run_kind(run_dir)
    if found is not None and found != kind:
        hint = (f"continue it with: occ sft --resume {run_dir}; RL from its checkpoint is occ rl --init "
                f"{run_dir / 'checkpoint'}" if found == "sft" else f"continue it with: occ rl --resume {run_dir}")
        raise ValueError(f"--resume {run_dir}: this is an {found.upper()} run, not an {kind.upper()} one; {hint}")
    result = run_dir / ("final" if kind == "rl" else "checkpoint")
    if result.is_dir() and latest_checkpoint(run_dir) is None:
        raise ValueError(f"--resume {run_dir}: the run finished ({result.name}/ is written); nothing to resume")


def write_failed(err: OSError, save: Callable[[], Path], run_dir: Path, command: str) -> WriteFailed:
    """The error of a write that failed mid-run (``err``: a full disk, a lost permission): it tries ``save`` (the
    run's checkpoint) first, then says in one line what failed and what ``occ {command} --resume`` continues from."""
    resume = f"occ {command} --resume {run_dir}"
    try:
        path = save()
        kept = f"checkpoint saved to {path}; make room, then {resume} continues from it"
    except Exception as again:  # the disk is full: any failure here is reported, not raised
        again_os = as_write_error(again, Path(run_dir) / "checkpoints") or again
        why = describe_os_error(again_os) if isinstance(again_os, OSError) else f"{type(again).__name__}: {again}"
        last = latest_checkpoint(run_dir)
        kept = (f"no checkpoint could be saved either ({why}); make room, then {resume} "
                + (f"continues from the last one, {last.name}" if last is not None else "starts again from step 0"))
    return WriteFailed(f"{describe_os_error(err)}; {kept}")


def drop_checkpoints(run_dir: Path) -> None:
    """Delete a finished run's ``checkpoints/`` (what ``--resume`` needs, no longer needed: the run wrote its result;
    at 135M parameters each is 1.6 GB)."""
    shutil.rmtree(Path(run_dir) / "checkpoints", ignore_errors=True)


def completed_steps(optimizer: Any, guard: Any) -> int:
    """The optimizer steps a run completed: those AdamW took plus those ``guard`` skipped (non-finite). Below the
    trainer's step counter when a failure cut the step in progress short (after its counter moved, before the
    optimizer stepped): a checkpoint then resumes at that step's start."""
    taken = max((int(st["step"]) for st in optimizer.state.values() if "step" in st), default=0)
    return taken + guard.total
