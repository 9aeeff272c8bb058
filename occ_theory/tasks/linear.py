"""Suite ``linear``: solve ``a·x + b = c`` for the integer ``x``.

Prompt ``3x+5=20?`` (coefficient 1 is written ``x``, -1 ``-x``, a zero constant is left out);
target ``3x=15,x=15/3#5``: move the constant, divide by the coefficient, then ``#`` and ``x``.
Defaults: ``a`` nonzero in ``[-9, 9]``, ``x`` in ``[-9, 9]``, ``b`` in ``[-20, 20]``. The solution
is unique, so verification is exact match of the canonical integer after ``#``.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np

from occ_theory.tasks.base import Problem, Task, check_int, check_lengths


def _coefficient(a: int) -> str:
    return {1: "", -1: "-"}.get(a, str(a))


def linear_problem(a: int, x: int, b: int, suite: str = "linear") -> Problem:
    """The equation ``a·x + b = a·x₀ + b`` with solution ``x₀ = x``."""
    if a == 0:
        raise ValueError("the coefficient a of a linear problem must be nonzero")
    c = a * x + b
    constant = "" if b == 0 else f"+{b}" if b > 0 else f"-{-b}"
    lhs = f"{_coefficient(a)}x"
    return Problem(
        prompt=f"{lhs}{constant}={c}?",
        answer=str(x),
        target=f"{lhs}={c - b},x={c - b}/{a}#{x}",
        suite=suite,
        meta={"a": a, "x": x, "b": b, "c": c},
    )


@dataclass(frozen=True)
class Linear(Task):
    """Equations with ``a`` nonzero in ``[-max_coef, max_coef]``, ``|x| <= max_x``, ``|b| <= max_const``."""

    max_coef: int = 9
    max_x: int = 9
    max_const: int = 20
    name: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        check_int(self.name, "max_coef", self.max_coef, 1, 10**6)
        check_int(self.name, "max_x", self.max_x, 1, 10**6)
        check_int(self.name, "max_const", self.max_const, 0, 10**6)
        corners = itertools.product((-1, 1), repeat=3)  # the longest strings sit at the extremes
        worst = [
            linear_problem(sa * self.max_coef, sx * self.max_x, sb * self.max_const) for sa, sx, sb in corners
        ]
        check_lengths(
            self.name,
            asdict(self),
            max(len(p.prompt) for p in worst),
            max(len(p.target) for p in worst),
        )

    def draw(self, rng: np.random.Generator) -> Problem:
        k = int(rng.integers(0, 2 * self.max_coef))  # nonzero a: k -> -max..-1, 1..max
        a = k - self.max_coef if k < self.max_coef else k - self.max_coef + 1
        x = int(rng.integers(-self.max_x, self.max_x + 1))
        b = int(rng.integers(-self.max_const, self.max_const + 1))
        return self.tag(linear_problem(a, x, b, self.name))
