"""Reading ``metrics.jsonl`` files, torch-free (shared by the trainer's resume and ``analysis``)."""

from __future__ import annotations

import json
from pathlib import Path


class RunFileError(ValueError):
    """A run file that is missing or corrupt."""


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file; a partial last line (no newline) is dropped, other bad lines raise."""
    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"missing file: {path}")
    text = path.read_text(encoding="utf-8", errors="strict")
    lines = text.split("\n")
    truncated_tail = not text.endswith("\n")
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if truncated_tail and i == len(lines):
                break  # the writer was killed mid-line: everything before it is complete
            raise RunFileError(f"{path}: line {i} is not valid JSON ({e.msg})") from e
        if not isinstance(rec, dict):
            raise RunFileError(f"{path}: line {i} is not a JSON object")
        records.append(rec)
    return records
