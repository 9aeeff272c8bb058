"""Suites ``addition`` and ``length_gen``: multi-digit addition of two non-negative integers.

Prompt ``347+285=``; target ``12,13,06#632``: one two-digit column sum per column, ones first, each
including the carry in (its tens digit is the carry out), then ``#`` and the sum. Verified by exact
match of the canonical integer after ``#``.

``addition`` draws each operand's digit count uniformly from ``[min_digits, max_digits]`` (default
1 to 3). ``length_gen`` is the same format with longer operands (default 4 to 5 digits, more than
``train_max_digits``); it is evaluation-only, disjoint from ``addition`` training data by its digit
count, and its problems are also held-out members of the prompt-hash split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np

from occ_theory.tasks.base import Problem, Task, check_int, check_lengths, draw_operand

MAX_DIGITS = 9


def addition_problem(a: int, b: int, suite: str = "addition") -> Problem:
    """The problem ``a+b=`` with its column-sum worked steps."""
    if a < 0 or b < 0:
        raise ValueError(f"addition operands must be non-negative, got {a} and {b}")
    columns, carry = [], 0
    for k in range(max(len(str(a)), len(str(b)))):
        total = (a // 10**k) % 10 + (b // 10**k) % 10 + carry
        columns.append(f"{total:02d}")
        carry = total // 10
    answer = str(a + b)
    return Problem(
        prompt=f"{a}+{b}=",
        answer=answer,
        target=",".join(columns) + "#" + answer,
        suite=suite,
        meta={"a": a, "b": b},
    )


def _check_digits(owner: str, min_digits: int, max_digits: int) -> None:
    check_int(owner, "min_digits", min_digits, 1, MAX_DIGITS)
    check_int(owner, "max_digits", max_digits, 1, MAX_DIGITS)
    if min_digits > max_digits:
        raise ValueError(f"{owner}: min_digits ({min_digits}) exceeds max_digits ({max_digits})")
    worst = addition_problem(10**max_digits - 1, 10**max_digits - 1)
    check_lengths(
        owner, {"min_digits": min_digits, "max_digits": max_digits}, len(worst.prompt), len(worst.target)
    )


def _draw_pair(rng: np.random.Generator, min_digits: int, max_digits: int) -> tuple[int, int]:
    da, db = (int(d) for d in rng.integers(min_digits, max_digits + 1, size=2))
    return draw_operand(rng, da), draw_operand(rng, db)


@dataclass(frozen=True)
class Addition(Task):
    """Addition with carries; each operand has ``min_digits`` to ``max_digits`` digits."""

    min_digits: int = 1
    max_digits: int = 3
    name: ClassVar[str] = "addition"

    def __post_init__(self) -> None:
        _check_digits(self.name, self.min_digits, self.max_digits)

    def draw(self, rng: np.random.Generator) -> Problem:
        a, b = _draw_pair(rng, self.min_digits, self.max_digits)
        return self.tag(addition_problem(a, b, self.name))


@dataclass(frozen=True)
class LengthGen(Task):
    """Evaluation-only addition with more digits than training (``min_digits > train_max_digits``)."""

    min_digits: int = 4
    max_digits: int = 5
    train_max_digits: int = Addition.max_digits
    name: ClassVar[str] = "length_gen"
    eval_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_digits(self.name, self.min_digits, self.max_digits)
        check_int(self.name, "train_max_digits", self.train_max_digits, 1, MAX_DIGITS)
        if self.min_digits <= self.train_max_digits:
            raise ValueError(
                f"{self.name}: min_digits ({self.min_digits}) must exceed train_max_digits "
                f"({self.train_max_digits}), or the suite would overlap training addition; settings {asdict(self)}"
            )

    def draw(self, rng: np.random.Generator) -> Problem:
        a, b = _draw_pair(rng, self.min_digits, self.max_digits)
        return self.tag(addition_problem(a, b, self.name))

    def sample(self, rng: np.random.Generator, split: str = "train") -> Problem:
        if split == "train":
            raise ValueError(f"{self.name} is evaluation-only: sample it with split='eval'")
        return super().sample(rng, split)
