"""Suite ``signed``: signed mixed addition and subtraction, evaluated left to right.

Prompt ``-7+9-5=``: ``n_terms`` signed summands (default 3) of magnitude at most ``max_abs``
(default 9; 20 or more makes a harder suite); the first is written with its sign, the others as
``+m`` or ``-m``. Target ``-7+9=2,2-5=-3#-3``: the running total after each term, then ``#`` and
the result. Verified by exact match of the canonical integer after ``#``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np

from occ_theory.tasks.base import Problem, Task, check_int, check_lengths


def _signed_term(value: int) -> str:
    return f"+{value}" if value >= 0 else f"-{-value}"


def signed_problem(terms: Sequence[int], suite: str = "signed") -> Problem:
    """The problem summing ``terms`` left to right, with its running totals as worked steps."""
    if len(terms) < 2:
        raise ValueError(f"signed problems need at least 2 terms, got {len(terms)}")
    terms = [int(t) for t in terms]
    steps, total = [], terms[0]
    for term in terms[1:]:
        steps.append(f"{total}{_signed_term(term)}={total + term}")
        total += term
    answer = str(total)
    return Problem(
        prompt=str(terms[0]) + "".join(_signed_term(t) for t in terms[1:]) + "=",
        answer=answer,
        target=",".join(steps) + "#" + answer,
        suite=suite,
        meta={"terms": terms},
    )


@dataclass(frozen=True)
class Signed(Task):
    """Sums of ``n_terms`` integers drawn uniformly from ``[-max_abs, max_abs]``."""

    n_terms: int = 3
    max_abs: int = 9
    name: ClassVar[str] = "signed"

    def __post_init__(self) -> None:
        check_int(self.name, "n_terms", self.n_terms, 2, 8)
        check_int(self.name, "max_abs", self.max_abs, 1, 10**6)
        worst = signed_problem([-self.max_abs] * self.n_terms)  # the most negative running totals
        check_lengths(self.name, asdict(self), len(worst.prompt), len(worst.target))

    def draw(self, rng: np.random.Generator) -> Problem:
        terms = rng.integers(-self.max_abs, self.max_abs + 1, size=self.n_terms)
        return self.tag(signed_problem([int(t) for t in terms], self.name))
