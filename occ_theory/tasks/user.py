"""User datasets: problems read from JSONL or Parquet files with ``prompt`` and ``answer`` fields.

Each record becomes a ``Problem`` (suite ``"user"`` unless told otherwise) whose prompt is used
verbatim (add your own separator) and whose target is the record's optional ``target`` string, or
``#<answer>``. ``UserTask`` scores the text after a response's single ``#`` (the rule of every
suite; answers may not contain ``#``, and may be up to 1000 characters long): it matches when
the normalised strings are equal (``normalise_answer``: surrounding whitespace and ``$``, case,
commas between digit groups, a trailing ``.0``), or when ``math_verify`` is importable and says
the two are equivalent. Its train / eval split is the same prompt hash as the generated suites
(``is_eval_prompt``: about 20% of the prompts, fixed by their text, so the same in every run):
runs train on the train split and evaluate on the held-out one (``UserTask.held_out``).
Malformed files raise a ``ValueError`` naming the file, the line or row, and the problem.
"""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from occ_theory.tasks.base import ANSWER_MARK, Problem, Task, check_split, extract_final, is_eval_prompt

HAVE_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
MAX_USER_ANSWER_CHARS = 1000

_THOUSANDS = re.compile(r"(?<=[0-9]),(?=[0-9]{3}(?![0-9]))")
_TRAILING_ZERO = re.compile(r"^([+-]?[0-9]+)\.0+$")


def normalise_answer(text: str) -> str:
    """Canonical form for exact match: strip whitespace and surrounding ``$``, lower-case,
    drop commas between digit groups and a trailing ``.0`` (``" $1,234.0$ "`` -> ``"1234"``)."""
    s = text.strip()
    while len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s[1:-1].strip()
    s = _THOUSANDS.sub("", s.lower())
    return _TRAILING_ZERO.sub(r"\1", s)


def answers_match(gold: str, predicted: str) -> bool:
    """Normalised exact match, else ``math_verify`` equivalence when it is importable."""
    if normalise_answer(gold) == normalise_answer(predicted):
        return True
    return HAVE_MATH_VERIFY and _math_verify_match(gold, predicted)


def _math_verify_match(gold: str, predicted: str) -> bool:
    import math_verify  # optional dependency, guarded by HAVE_MATH_VERIFY

    try:
        return bool(math_verify.verify(math_verify.parse(gold), math_verify.parse(predicted)))
    except Exception:  # a verifier failure (parse error, timeout) must not crash a rollout
        return False


class UserTask(Task):
    """A task over fixed user problems; ``verifier(gold, predicted)`` defaults to ``answers_match``."""

    def __init__(self, problems: Iterable[Problem], verifier: Callable[[str, str], bool] | None = None):
        self.problems = tuple(problems)
        if not self.problems:
            raise ValueError("UserTask needs at least one problem")
        suites = sorted({p.suite for p in self.problems})
        if len(suites) != 1:
            raise ValueError(f"UserTask problems must share one suite, got {suites}")
        self.name = suites[0]  # an instance attribute: each dataset names its own suite
        self.verifier = answers_match if verifier is None else verifier
        self._splits = {
            split: tuple(p for p in self.problems if is_eval_prompt(p.prompt) == (split == "eval"))
            for split in ("train", "eval")
        }

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], suite: str = "user") -> UserTask:
        return cls(load_user_dataset(path, suite))

    def draw(self, rng: np.random.Generator) -> Problem:
        return self.problems[int(rng.integers(len(self.problems)))]

    def sample(self, rng: np.random.Generator, split: str = "train") -> Problem:
        check_split(split)
        pool = self._splits[split]
        if not pool:
            raise ValueError(
                f"{self.name}: none of its {len(self.problems)} problems falls in the {split} split"
            )
        return pool[int(rng.integers(len(pool)))]

    def held_out(self, n: int) -> list[Problem]:
        """The first ``n`` held-out problems in file order (fixed: the split is a hash of the prompt)."""
        return list(self._splits["eval"][:n])

    def extract_answer(self, response: str) -> str | None:
        """The text after the single ``#``, stripped; None when malformed, empty or huge."""
        return extract_final(response, MAX_USER_ANSWER_CHARS)

    def evaluate(self, problem: Problem, response: str) -> bool:
        self.check_problem(problem)
        predicted = self.extract_answer(response)
        return predicted is not None and bool(self.verifier(problem.answer, predicted))


def load_user_dataset(path: str | os.PathLike[str], suite: str = "user") -> list[Problem]:
    """Problems from a ``.jsonl`` / ``.ndjson`` or ``.parquet`` / ``.pq`` file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        records = _jsonl_records(path)
    elif suffix in PARQUET_SUFFIXES:
        records = _parquet_records(path)
    else:
        raise ValueError(
            f"{path}: unknown extension {suffix or '(none)'!r}; expected one of {JSONL_SUFFIXES + PARQUET_SUFFIXES}"
        )
    problems = [
        _to_problem(record, path, where, suite, index) for index, (where, record) in enumerate(records)
    ]
    if not problems:
        raise ValueError(f"{path}: empty file, no records")
    return problems


def _jsonl_records(path: Path) -> list[tuple[str, Any]]:
    records = []
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}, line {lineno}: not UTF-8 text ({err.reason})") from None
            if not line.strip():
                continue
            try:
                records.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}, line {lineno}: not valid JSON ({err.msg} at column {err.colno})"
                ) from None
    return records


def _parquet_records(path: Path) -> list[tuple[str, Any]]:
    import pandas as pd  # lazy: only Parquet users pay for the import

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        frame = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise ValueError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from None
    for column in ("prompt", "answer"):
        if column not in frame.columns:
            raise ValueError(f"{path}: missing column {column!r} (columns: {list(frame.columns)})")
    return [(f"row {index}", row) for index, row in enumerate(frame.to_dict("records"))]


def _to_problem(record: Any, path: Path, line: str, suite: str, index: int) -> Problem:
    where = f"{path}, {line}"
    if not isinstance(record, dict):
        raise ValueError(
            f"{where}: expected an object with 'prompt' and 'answer', got {type(record).__name__}"
        )
    for key in ("prompt", "answer"):
        if key not in record:
            raise ValueError(f"{where}: missing field {key!r}")
    prompt, target = record["prompt"], record.get("target")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: field 'prompt' must be a non-empty string, got {_describe(prompt)}")
    answer = _answer_text(record["answer"], where)
    if target is not None and not isinstance(target, str):
        raise ValueError(f"{where}: field 'target' must be a string when given, got {_describe(target)}")
    return Problem(
        prompt=prompt,
        answer=answer,
        target=f"{ANSWER_MARK}{answer}" if target is None else target,
        suite=suite,
        meta={"source": str(path), "index": index, "where": line},
    )


def _answer_text(value: Any, where: str) -> str:
    """Answers are non-empty strings without ``#`` or finite numbers (written with ``str``)."""
    if isinstance(value, str) and value.strip():
        if ANSWER_MARK in value or len(value.strip()) > MAX_USER_ANSWER_CHARS:
            raise ValueError(
                f"{where}: field 'answer' must not contain {ANSWER_MARK!r} (it marks the answer in a "
                f"response) nor exceed {MAX_USER_ANSWER_CHARS} characters, got {_describe(value)}"
            )
        return value.strip()
    if isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_) and math.isfinite(value):
        return str(value.item() if isinstance(value, np.generic) else value)
    raise ValueError(
        f"{where}: field 'answer' must be a non-empty string or a finite number, got {_describe(value)}"
    )


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"
