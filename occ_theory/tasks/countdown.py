"""Suite ``countdown``: reach a target by combining given numbers with ``+ - * /``.

Prompt ``3,5,7>56?``: the numbers (sorted) and the target. Target ``5+3=8,8*7=56#(5+3)*7``: the
generator's steps, left to right, then ``#`` and an expression. The generator combines all
``n_numbers`` numbers (default 3, each in ``[1, max_number]``, default 10) in a random order with
random operators, keeping every intermediate value an integer in ``[1, max_target]`` (default 99);
``*1`` and ``/1`` are never drawn.

Any correct expression scores, not only the generator's: the text after ``#`` is evaluated by the
safe evaluator in ``expression.py`` (no ``eval``), which requires exact division and each given
number used at most as often as it is given, and must equal the target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np

from occ_theory.tasks.base import MAX_DRAWS, Problem, Task, check_int, check_lengths, extract_final
from occ_theory.tasks.expression import try_evaluate

OPERATORS = "+-*/"


def _step(value: int, op: str, n: int) -> int | None:
    """``value op n`` when exact, else None."""
    if op == "+":
        return value + n
    if op == "-":
        return value - n
    if op == "*":
        return value * n
    return value // n if n != 0 and value % n == 0 else None


def countdown_problem(order: Sequence[int], ops: str, suite: str = "countdown") -> Problem:
    """The problem solved by combining ``order`` left to right with ``ops`` (``len(ops) == len(order) - 1``)."""
    if len(order) < 2 or len(ops) != len(order) - 1 or any(op not in OPERATORS for op in ops):
        raise ValueError(
            f"countdown needs n >= 2 numbers and n - 1 operators from {OPERATORS!r}, got {order}, {ops!r}"
        )
    value, expr, top, steps = int(order[0]), str(order[0]), "", []
    for op, n in zip(ops, order[1:]):
        new = _step(value, op, int(n))
        if new is None:
            raise ValueError(f"{value}{op}{n} is not an exact integer step")
        steps.append(f"{value}{op}{n}={new}")
        if op in "*/" and top in ("+", "-"):
            expr = f"({expr})"
        expr, top, value = f"{expr}{op}{n}", op, new
    numbers = sorted(int(n) for n in order)
    return Problem(
        prompt=",".join(map(str, numbers)) + f">{value}?",
        answer=expr,
        target=",".join(steps) + "#" + expr,
        suite=suite,
        meta={"numbers": numbers, "target": value},
    )


def _worst_lengths(n: int, max_number: int, max_target: int) -> tuple[int, int]:
    """Longest prompt and target the settings allow (at most (n-1)//2 bracket pairs)."""
    dn, dt = len(str(max_number)), len(str(max_target))
    prompt = n * dn + (n - 1) + 1 + dt + 1
    steps = (n - 1) * (dt + 1 + dn + 1 + dt) + (n - 2)
    expression = n * dn + (n - 1) + 2 * ((n - 1) // 2)
    return prompt, steps + 1 + expression


@dataclass(frozen=True)
class Countdown(Task):
    """Reach a target in ``[1, max_target]`` from ``n_numbers`` numbers in ``[1, max_number]``."""

    n_numbers: int = 3
    max_number: int = 10
    max_target: int = 99
    name: ClassVar[str] = "countdown"

    def __post_init__(self) -> None:
        check_int(self.name, "n_numbers", self.n_numbers, 2, 8)
        check_int(self.name, "max_number", self.max_number, 1, 10**6)
        check_int(self.name, "max_target", self.max_target, self.max_number, 10**6)
        check_lengths(
            self.name, asdict(self), *_worst_lengths(self.n_numbers, self.max_number, self.max_target)
        )

    def draw(self, rng: np.random.Generator) -> Problem:
        for _ in range(MAX_DRAWS):
            order = [int(n) for n in rng.integers(1, self.max_number + 1, size=self.n_numbers)]
            value, ops = order[0], ""
            for n in order[1:]:
                options = [op for op in OPERATORS if self._allowed(value, op, n)]
                if not options:
                    break
                op = options[int(rng.integers(len(options)))]
                value, ops = _step(value, op, n), ops + op
            else:
                return self.tag(countdown_problem(order, ops, self.name))
        raise ValueError(
            f"{self.name}: no solvable problem in {MAX_DRAWS} draws with settings {asdict(self)}"
        )

    def _allowed(self, value: int, op: str, n: int) -> bool:
        if op in "*/" and n == 1:
            return False
        new = _step(value, op, n)
        return new is not None and 1 <= new <= self.max_target

    def extract_answer(self, response: str) -> str | None:
        """The expression after the single ``#`` when it is safe integer arithmetic, else None."""
        final = extract_final(response)
        return final if final is not None and try_evaluate(final) is not None else None

    def evaluate(self, problem: Problem, response: str) -> bool:
        self.check_problem(problem)
        expr = self.extract_answer(response)
        if expr is None:
            return False
        value = try_evaluate(expr, problem.meta["numbers"])
        return value is not None and value == problem.meta["target"]
