"""When a scheduled quantity runs: every N steps, at log-spaced steps, at explicit steps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class Schedule:
    """Optimizer steps (counted from 1) on which a quantity runs."""

    total: int
    every: int = 0
    at: tuple[int, ...] = ()
    log_spaced: int = 0
    first: bool = True

    @cached_property
    def steps(self) -> frozenset[int]:
        s = set(x for x in self.at if 1 <= x <= self.total)
        if self.every > 0:
            s.update(range(self.every, self.total + 1, self.every))
        if self.log_spaced > 0 and self.total > 0:
            n = self.log_spaced
            s.update(round(math.exp(i * math.log(self.total) / max(n - 1, 1))) for i in range(n))
        if self.first and self.total > 0 and (self.every > 0 or self.at or self.log_spaced > 0):
            s.add(1)
        return frozenset(x for x in s if 1 <= x <= self.total)

    def __contains__(self, step: int) -> bool:
        return step in self.steps
