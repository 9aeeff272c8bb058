"""JSON run files, torch-free: reading ``metrics.jsonl`` (shared by the trainer's resume and ``analysis``)
and the one sanitiser of values written to JSON (``json_safe``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


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


def json_safe(v: Any) -> Any:
    """``v`` as strict JSON can hold it: non-finite floats become ``None`` (``null``), numpy/torch scalars
    plain numbers, lists and dicts element-wise, anything else its ``str``."""
    if isinstance(v, bool) or v is None or isinstance(v, str | int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [json_safe(x) for x in v]
    if hasattr(v, "item"):  # numpy / torch scalars
        return json_safe(v.item())
    return str(v)
