"""The suites in natural language, for pretrained models with their own tokenizer.

A character-level model reads ``347+285=`` and answers ``12,13,06#632``. A pretrained model is asked
a question in words and told the format of its final answer (``ANSWER_FORMAT``):

    addition        "What is 347+285?"
    linear          "Solve 3x+5=20 for x."
    countdown       "Using each of the numbers 3, 5, 7 exactly once, with + - * / and parentheses,
                     write an expression equal to 56."
    user data       the record's prompt verbatim

each followed by ``INSTRUCTION``. ``ChatTask(task)`` wraps any ``Task``: it samples the wrapped
task's problems (so the held-out split is the symbolic prompt's, the same problems as the
character-level path) and rewrites them with ``natural_problem``; its reward reads the final
answer out of free text with ``extract_answer`` and hands it to the wrapped task's own verifier
(``#<answer>``, spaces removed), else accepts it when ``answers_match`` does (normalised equality,
and ``math_verify`` equivalence where it is installed); not for countdown, whose answers are not
unique. ``task.parse: lenient`` also scores an answer that is not stated in the asked format: the
last line's (``last_line_answer``: "6 + 9 = 15" reads 15), for models too small to follow the format
(SmolLM2-135M states it almost never). The chat template, when the model
has one, is applied by the trainers (``occ_theory.train.evaluate.prompt_ids``), not here.
"""

from __future__ import annotations

import re

import numpy as np

from occ_theory.names import PARSES
from occ_theory.tasks.base import ANSWER_MARK, Problem, Task
from occ_theory.tasks.user import MAX_USER_ANSWER_CHARS, answers_match, normalise_answer

ANSWER_FORMAT = "Answer: <answer>"
INSTRUCTION = f'Give your final answer on the last line, in the form "{ANSWER_FORMAT}".'

_BOXED = "\\boxed{"
_ANSWER_LINE = re.compile(r"\banswer(?:\s+is)?\s*:?[ \t]*([^\n]*)", re.IGNORECASE)
_WRAPPERS = "*_` \t"


def question(problem: Problem) -> str:
    """The problem asked in words (without the answer-format instruction)."""
    suite, prompt = problem.suite, problem.prompt
    if suite in ("addition", "signed", "multiplication", "length_gen"):
        return f"What is {prompt.removesuffix('=')}?"
    if suite == "linear":
        return f"Solve {prompt.removesuffix('?')} for x."
    if suite == "countdown":
        numbers = ", ".join(map(str, problem.meta["numbers"]))
        return (f"Using each of the numbers {numbers} exactly once, with + - * / and parentheses, "
                f"write an expression equal to {problem.meta['target']}.")
    return prompt


def natural_problem(problem: Problem) -> Problem:
    """``problem`` with its question in words plus ``INSTRUCTION`` as prompt and ``Answer: <final>`` as
    target; the symbolic prompt is kept in ``meta["symbolic_prompt"]``."""
    final = problem.target.rsplit(ANSWER_MARK, 1)[1] if ANSWER_MARK in problem.target else problem.answer
    return Problem(prompt=f"{question(problem)}\n{INSTRUCTION}", answer=problem.answer, target=f"Answer: {final}",
                   suite=problem.suite, meta={**problem.meta, "symbolic_prompt": problem.prompt})


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), None when it is not closed."""
    start = text.rfind(_BOXED) + len(_BOXED)
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_EXPRESSION = re.compile(r"[\d\s+\-*/().,]+")


def last_line_answer(text: str, max_chars: int = MAX_USER_ANSWER_CHARS) -> str | None:
    """An unstated final answer: the last non-empty line when it is an equation or an arithmetic expression
    (a number included), else that line's last number; None when the text has no line with a digit."""
    lines = [ln.strip(_WRAPPERS).removesuffix(".").strip(_WRAPPERS) for ln in text.splitlines()]
    lines = [ln for ln in lines if _NUMBER.search(ln)]  # str.isdigit would also take "²", which \d does not
    if not lines:
        return None
    last = lines[-1].strip("$ ").strip()
    if "=" in last or _EXPRESSION.fullmatch(last):
        final = last
    else:
        final = _NUMBER.findall(last)[-1]
    return final if len(final) <= max_chars else None


def extract_answer(text: str, max_chars: int = MAX_USER_ANSWER_CHARS) -> str | None:
    """The final answer stated in free text, or None.

    The last ``\\boxed{...}`` when there is one; else the rest of the line after the last
    ``Answer:`` / ``answer is`` (any case), without markdown emphasis, surrounding ``$`` and a
    trailing full stop. None when nothing is stated, the result is empty or longer than ``max_chars``.
    """
    if _BOXED in text:
        final = _last_boxed(text)
    else:
        matches = list(_ANSWER_LINE.finditer(text))
        final = matches[-1].group(1) if matches else None
        if final is not None:
            final = final.strip(_WRAPPERS).removesuffix(".").strip(_WRAPPERS)
            while len(final) >= 2 and final[0] == final[-1] == "$":
                final = final[1:-1].strip()
    if final is None:
        return None
    final = final.strip()
    return final if final and len(final) <= max_chars else None


class ChatTask(Task):
    """``task`` asked in natural language and scored on free text (see the module docstring)."""

    def __init__(self, task: Task, parse: str = "stated"):
        if isinstance(task, ChatTask):
            raise ValueError(f"task {task.name!r} is already in natural language")
        if parse not in PARSES:
            raise ValueError(f"answer parse {parse!r}: choose from {list(PARSES)}")
        self.task, self.parse = task, parse
        self.name = task.name  # instance attributes, as UserTask: the wrapped task's
        self.eval_only = task.eval_only

    def draw(self, rng: np.random.Generator) -> Problem:
        return natural_problem(self.task.draw(rng))

    def sample(self, rng: np.random.Generator, split: str = "train") -> Problem:
        return natural_problem(self.task.sample(rng, split))

    def extract_answer(self, response: str) -> str | None:
        """The stated final answer (``parse="lenient"``: else the last line's, ``last_line_answer``); of an
        equation ``lhs = rhs`` the right side (countdown: the left)."""
        final = extract_answer(response)
        if final is None and self.parse == "lenient":
            final = last_line_answer(response)
        if final is None or "=" not in final:
            return final
        sides = final.split("=")
        return (sides[0] if self.name == "countdown" else sides[-1]).strip() or None

    def evaluate(self, problem: Problem, response: str) -> bool:
        self.check_problem(problem)
        final = self.extract_answer(response)
        if final is None:
            return False
        compact = "".join(normalise_answer(final).split())  # "1,234.0" -> "1234", "(5 + 3) * 7" -> "(5+3)*7"
        if self.task.evaluate(problem, ANSWER_MARK + compact):
            return True
        return self.name != "countdown" and answers_match(problem.answer, final)
