"""Verifiable-reward math tasks for tiny character-level models: six suites and user datasets.

Suites (``SUITES``, in this order), each a ``Task`` with ``sample`` / ``extract_answer`` /
``evaluate`` / ``reward``; prompts ≤ 24 and targets ≤ 40 printable ASCII characters:

    addition        347+285=      ->  12,13,06#632
    signed          -7+9-5=       ->  -7+9=2,2-5=-3#-3
    multiplication  47*8=         ->  56+320#376
    linear          3x+5=20?      ->  3x=15,x=15/3#5
    countdown       3,5,7>56?     ->  5+3=8,8*7=56#(5+3)*7
    length_gen      1234+56789=   ->  13,12,10,08,05#58023   (evaluation only)

Held-out problems are those whose prompt hashes into the eval split (``is_eval_prompt``), so
``eval_set`` and ``train_stream`` never share a problem. Pure Python and numpy: no torch here.
"""

from occ_theory.tasks.addition import Addition, LengthGen, addition_problem
from occ_theory.tasks.base import (
    ANSWER_MARK,
    EVAL_FRACTION,
    MAX_PROMPT_CHARS,
    MAX_TARGET_CHARS,
    SPLITS,
    Problem,
    Task,
    extract_final,
    extract_integer,
    is_eval_prompt,
)
from occ_theory.tasks.countdown import Countdown, countdown_problem
from occ_theory.tasks.expression import ExpressionError, evaluate_expression, try_evaluate
from occ_theory.tasks.linear import Linear, linear_problem
from occ_theory.tasks.multiplication import Multiplication, multiplication_problem
from occ_theory.tasks.registry import SUITES, TRAIN_SUITES, eval_set, get_task, train_stream
from occ_theory.tasks.signed import Signed, signed_problem
from occ_theory.tasks.user import UserTask, answers_match, load_user_dataset, normalise_answer

__all__ = [
    "ANSWER_MARK",
    "EVAL_FRACTION",
    "MAX_PROMPT_CHARS",
    "MAX_TARGET_CHARS",
    "SPLITS",
    "SUITES",
    "TRAIN_SUITES",
    "Addition",
    "Countdown",
    "ExpressionError",
    "LengthGen",
    "Linear",
    "Multiplication",
    "Problem",
    "Signed",
    "Task",
    "UserTask",
    "addition_problem",
    "answers_match",
    "countdown_problem",
    "eval_set",
    "evaluate_expression",
    "extract_final",
    "extract_integer",
    "get_task",
    "is_eval_prompt",
    "linear_problem",
    "load_user_dataset",
    "multiplication_problem",
    "normalise_answer",
    "signed_problem",
    "train_stream",
    "try_evaluate",
]
