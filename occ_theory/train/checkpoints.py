"""An RL run's checkpoint files and the metrics a resumed run keeps (``checkpoints/step_NNNNNN.pt``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..atomic import atomic_write_text
from ..jsonl import read_jsonl

CKPT_RE = re.compile(r"^step_(\d{6,})\.pt$")


def checkpoint_files(d: Path) -> list[Path]:
    """Checkpoint files of a run, oldest step first (by number, not by name)."""
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


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
