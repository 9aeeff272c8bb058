"""Suite ``multiplication``: a ``digits_a``-digit number times a ``digits_b``-digit number (default 2 × 1).

Prompt ``47*8=``; target ``56+320#376``: the partial products of every digit pair with its place
value (ones of ``b`` first, within it ones of ``a`` first), joined by ``+``, then ``#`` and the
product. Verified by exact match of the canonical integer after ``#``.

The default 2 × 1 space holds 900 problems, about 180 of them held out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np

from occ_theory.tasks.base import Problem, Task, check_int, check_lengths, draw_operand


def _place_values(n: int) -> list[int]:
    """Each digit times its place value, ones first: 407 -> [7, 0, 400]."""
    return [int(d) * 10**k for k, d in enumerate(reversed(str(n)))]


def multiplication_problem(a: int, b: int, suite: str = "multiplication") -> Problem:
    """The problem ``a*b=`` with its partial products as worked steps."""
    if a < 0 or b < 0:
        raise ValueError(f"multiplication operands must be non-negative, got {a} and {b}")
    partials = [pa * pb for pb in _place_values(b) for pa in _place_values(a)]
    answer = str(a * b)
    return Problem(
        prompt=f"{a}*{b}=",
        answer=answer,
        target="+".join(map(str, partials)) + "#" + answer,
        suite=suite,
        meta={"a": a, "b": b},
    )


@dataclass(frozen=True)
class Multiplication(Task):
    """Products of operands with exactly ``digits_a`` and ``digits_b`` digits."""

    digits_a: int = 2
    digits_b: int = 1
    name: ClassVar[str] = "multiplication"

    def __post_init__(self) -> None:
        check_int(self.name, "digits_a", self.digits_a, 1, 9)
        check_int(self.name, "digits_b", self.digits_b, 1, 9)
        worst = multiplication_problem(10**self.digits_a - 1, 10**self.digits_b - 1)
        check_lengths(self.name, asdict(self), len(worst.prompt), len(worst.target))

    def draw(self, rng: np.random.Generator) -> Problem:
        a, b = draw_operand(rng, self.digits_a), draw_operand(rng, self.digits_b)
        return self.tag(multiplication_problem(a, b, self.name))
