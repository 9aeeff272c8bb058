"""The protocol every task family implements: ``Problem``, ``Task``, the held-out split rule, answer parsing.

A problem's ``prompt`` ends with its family's separator (``=`` or ``?``); the supervised ``target``
is a few short worked steps, then ``#`` and the final answer (``12,13,06#632``). A response scores
only when it holds exactly one ``#`` and the text after it is the answer; whitespace around the
answer is ignored, anything else around it is not. The whole response is judged, so a sampler must
cut responses at its end-of-sequence token before scoring them.

Held-out split: ``is_eval_prompt`` hashes the canonical prompt (BLAKE2b), so whether a problem is
held out is a fixed property of its prompt, the same in every suite, seed and process.
``Task.sample(rng, "train")`` rejects held-out prompts and ``Task.sample(rng, "eval")`` keeps only
them, which makes the evaluation sets disjoint from training data by construction.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

ANSWER_MARK = "#"
SPLITS = ("train", "eval")
EVAL_FRACTION = 0.2  # share of all prompts that are held out
MAX_PROMPT_CHARS = 24
MAX_TARGET_CHARS = 40
MAX_DRAWS = 10_000  # rejection-sampling budget for one problem of a split
MAX_ANSWER_CHARS = 64  # longer "answers" are garbage, never parsed

_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)")


@dataclass(frozen=True)
class Problem:
    """One verifiable problem. ``meta`` is JSON-serialisable and excluded from the hash."""

    prompt: str  # ends with the separator after which the response starts
    answer: str  # canonical final answer
    target: str  # supervised response: worked steps, then "#" and the answer
    suite: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def text(self) -> str:
        """The supervised sequence: prompt followed by target."""
        return self.prompt + self.target


def is_eval_prompt(prompt: str) -> bool:
    """Whether a prompt belongs to the held-out split: a fixed hash of the prompt, below EVAL_FRACTION."""
    digest = hashlib.blake2b(prompt.encode("utf-8", "surrogatepass"), digest_size=8, person=b"occ-split")
    return int.from_bytes(digest.digest(), "big") < EVAL_FRACTION * 2**64


def check_split(split: str) -> bool:
    """Validate a split name; True for "eval"."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split == "eval"


def extract_final(response: str, max_chars: int = MAX_ANSWER_CHARS) -> str | None:
    """The text after the response's single ``#``, stripped; None without exactly one ``#``, or when
    that text is empty or longer than ``max_chars``."""
    if response.count(ANSWER_MARK) != 1:
        return None
    final = response.split(ANSWER_MARK, 1)[1].strip()
    if not final or len(final) > max_chars:
        return None
    return final


def extract_integer(response: str) -> str | None:
    """A canonical decimal integer after the single ``#`` (no sign but ``-``, no leading zeros), else None."""
    final = extract_final(response)
    if final is None or not _INTEGER.fullmatch(final) or final == "-0":
        return None
    return final


def check_int(owner: str, name: str, value: object, lo: int, hi: int) -> None:
    """Raise a ValueError naming the setting unless ``value`` is an int in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}: {name} must be an int, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{owner}: {name} must be in [{lo}, {hi}], got {value}")


def check_lengths(owner: str, settings: dict[str, int], prompt_chars: int, target_chars: int) -> None:
    """Reject settings whose longest prompt or target exceeds the tiny-model limits."""
    for what, chars, limit in (
        ("prompts", prompt_chars, MAX_PROMPT_CHARS),
        ("targets", target_chars, MAX_TARGET_CHARS),
    ):
        if chars > limit:
            raise ValueError(
                f"{owner}: settings {settings} give {what} of up to {chars} characters "
                f"(limit {limit}); choose smaller settings"
            )


def draw_operand(rng: np.random.Generator, digits: int) -> int:
    """A uniform integer with exactly ``digits`` decimal digits (0-9 when ``digits`` is 1)."""
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return int(rng.integers(low, 10**digits))


class Task(ABC):
    """A family of verifiable problems. A task owns its reward, and ``reward`` reuses ``evaluate``.

    Subclasses implement ``draw`` (one problem from the whole distribution, either split) and may
    override ``extract_answer``; the default reads a canonical integer after ``#``.
    """

    name: ClassVar[str]
    eval_only: ClassVar[bool] = False

    @abstractmethod
    def draw(self, rng: np.random.Generator) -> Problem:
        """One problem from the family's distribution, ignoring the split."""

    def sample(self, rng: np.random.Generator, split: str = "train") -> Problem:
        """One problem of ``split``: draws until the prompt's held-out membership matches."""
        want_eval = check_split(split)
        for _ in range(MAX_DRAWS):
            problem = self.draw(rng)
            if is_eval_prompt(problem.prompt) == want_eval:
                return problem
        raise ValueError(
            f"{self.name}: no {split} problem in {MAX_DRAWS} draws; these settings leave the split (almost) empty"
        )

    def extract_answer(self, response: str) -> str | None:
        return extract_integer(response)

    def evaluate(self, problem: Problem, response: str) -> bool:
        self.check_problem(problem)
        answer = self.extract_answer(response)
        return answer is not None and answer == problem.answer

    def reward(self, problem: Problem, response: str) -> float:
        """1.0 when ``evaluate`` accepts the response, else 0.0."""
        return float(self.evaluate(problem, response))

    def check_problem(self, problem: Problem) -> None:
        if problem.suite != self.name:
            raise ValueError(f"task {self.name!r} cannot score a problem of suite {problem.suite!r}")

    def tag(self, problem: Problem) -> Problem:
        """Record the task's difficulty settings (its dataclass fields) in the problem's meta."""
        return replace(problem, meta={**problem.meta, "difficulty": asdict(self)})
