"""Tests of occ_theory.tasks: verifiers, generators, held-out splits, the countdown evaluator, user data."""

from __future__ import annotations

import ast
import json
import string
import subprocess
import sys
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from occ_theory.tasks import (
    MAX_PROMPT_CHARS,
    MAX_TARGET_CHARS,
    SUITES,
    TRAIN_SUITES,
    Addition,
    Countdown,
    ExpressionError,
    LengthGen,
    Linear,
    Multiplication,
    Problem,
    Signed,
    UserTask,
    addition_problem,
    answers_match,
    countdown_problem,
    eval_set,
    evaluate_expression,
    get_task,
    is_eval_prompt,
    linear_problem,
    load_user_dataset,
    multiplication_problem,
    normalise_answer,
    signed_problem,
    train_stream,
    try_evaluate,
)
from occ_theory.tasks import user as user_module
from occ_theory.tasks.expression import MAX_MAGNITUDE

DATA = Path(__file__).parent / "data"
PRINTABLE = set(string.printable) - set("\t\n\r\x0b\x0c")

# suite -> (problem, right responses, wrong responses, malformed responses)
CASES: dict[str, tuple[Problem, list[str], list[str], list[str]]] = {
    "addition": (
        addition_problem(347, 285),
        ["12,13,06#632", "#632", "  #632\n", "# 632 ", "junk steps #632"],
        ["#633", "#-632", "12,13,06#623"],
        [
            "",
            "632",
            "#",
            "#632#632",
            "##632",
            "#six",
            "#632 junk",
            "#6 32",
            "#+632",
            "#0632",
            "#632.0",
            "#٦٣٢",
        ],
    ),
    "signed": (
        signed_problem([-7, 12, -25]),
        ["-7+12=5,5-25=-20#-20", "#-20", "\t#-20  "],
        ["#20", "#-21", "#0"],
        ["-20", "#--20", "#- 20", "#-20-", "#(-20)", "#-020", "#−20"],
    ),
    "multiplication": (
        multiplication_problem(47, 8),
        ["56+320#376", "#376", "#376\n"],
        ["#375", "#56", "56+320#0"],
        ["376", "#3 76", "#376#", "#3.76e2", "#0x178"],
    ),
    "linear": (
        linear_problem(-4, -5, -7),
        ["-4x=20,x=20/-4#-5", "#-5", " # -5 "],
        ["#5", "#-4", "#20"],
        ["x=-5", "#x=-5", "#-5.0", "#-0", "#--5"],
    ),
    "countdown": (
        countdown_problem([5, 3, 7], "+*"),
        ["5+3=8,8*7=56#(5+3)*7", "#7*(3+5)", "# 7 * (5 + 3) ", "#(3+5)*7\n"],
        ["#5*7+3", "#(5+3)*7*1", "#(5+3)*7+5-5", "#56", "#8*7", "#5+3+7"],
        ["(5+3)*7", "#", "#(5+3)*7)", "#__import__('os')", "#(5+3)*7#", "#2**5", "#7/0", "#5/3", "#x"],
    ),
    "length_gen": (
        addition_problem(1234, 56789, suite="length_gen"),
        ["13,12,10,08,05#58023", "#58023"],
        ["#58024", "#5802"],
        ["58023", "#58,023", "#58023 #", "#5802 3"],
    ),
}


def _task_and_problem(name: str):
    problem = CASES[name][0]
    return get_task(name), problem


# ---------------------------------------------------------------- verifiers


@pytest.mark.parametrize("name", SUITES)
def test_verifier_accepts_right_answers_and_rejects_wrong_and_malformed_ones(name):
    task, problem = _task_and_problem(name)
    _, right, wrong, malformed = CASES[name]
    for response in right:
        assert task.evaluate(problem, response), response
    for response in wrong + malformed:
        assert not task.evaluate(problem, response), response
    for response in malformed:
        assert task.extract_answer(response) is None, response
    for response in right + wrong + malformed:
        assert task.reward(problem, response) == float(task.evaluate(problem, response))


@pytest.mark.parametrize("name", SUITES)
def test_integer_suites_extract_the_canonical_answer(name):
    task, problem = _task_and_problem(name)
    if name == "countdown":
        assert task.extract_answer("#  (5+3)*7 ") == "(5+3)*7"
        assert task.extract_answer("#x+1") is None
    else:
        assert task.extract_answer(problem.target) == problem.answer
        assert task.extract_answer(f"  #{problem.answer}\n") == problem.answer


def test_task_refuses_to_score_another_suites_problem():
    with pytest.raises(ValueError, match="cannot score a problem of suite 'signed'"):
        get_task("addition").evaluate(signed_problem([1, 2]), "#3")


@pytest.mark.parametrize("name", SUITES)
def test_supervised_target_always_earns_full_reward(name):
    task = get_task(name)
    split = "eval" if task.eval_only else "train"
    for seed in range(20):
        rng = np.random.default_rng(seed)
        for _ in range(50):
            problem = task.sample(rng, split)
            assert task.reward(problem, problem.target) == 1.0, problem


@pytest.mark.parametrize("name", SUITES)
def test_targets_end_with_the_answer_after_a_single_mark(name):
    task = get_task(name)
    rng = np.random.default_rng(3)
    for _ in range(200):
        problem = task.sample(rng, "eval")
        steps, answer = problem.target.split("#")
        assert answer == problem.answer and steps


# ---------------------------------------------------------------- generators


@pytest.mark.parametrize("name", SUITES)
def test_generators_are_deterministic_for_a_seed(name):
    task = get_task(name)
    rng_a, rng_b = np.random.default_rng(42), np.random.default_rng(42)
    assert [task.draw(rng_a) for _ in range(100)] == [task.draw(rng_b) for _ in range(100)]
    assert [task.sample(rng_a, "eval") for _ in range(20)] == [task.sample(rng_b, "eval") for _ in range(20)]
    other = np.random.default_rng(43)
    assert [task.draw(rng_a) for _ in range(100)] != [task.draw(other) for _ in range(100)]


def _digits(n: int) -> int:
    return len(str(abs(n)))


def test_generators_respect_difficulty_settings():
    rng = np.random.default_rng(0)
    additions = [Addition(min_digits=2, max_digits=4).draw(rng) for _ in range(300)]
    assert {_digits(p.meta[k]) for p in additions for k in "ab"} == {2, 3, 4}
    assert all(p.meta["difficulty"] == {"min_digits": 2, "max_digits": 4} for p in additions)
    assert any(
        int(column) >= 10 for p in additions for column in p.target.split("#")[0].split(",")
    )  # carries
    for p in (Signed(n_terms=4, max_abs=5).draw(rng) for _ in range(300)):
        assert len(p.meta["terms"]) == 4 and all(abs(t) <= 5 for t in p.meta["terms"])
    for p in (Multiplication(digits_a=3, digits_b=2).draw(rng) for _ in range(300)):
        assert _digits(p.meta["a"]) == 3 and _digits(p.meta["b"]) == 2
    for p in (Linear(max_coef=3, max_x=4, max_const=0).draw(rng) for _ in range(300)):
        assert 1 <= abs(p.meta["a"]) <= 3 and abs(p.meta["x"]) <= 4 and p.meta["b"] == 0
    for p in (Countdown(n_numbers=4, max_number=6, max_target=50).draw(rng) for _ in range(300)):
        assert len(p.meta["numbers"]) == 4 and all(1 <= n <= 6 for n in p.meta["numbers"])
        assert 1 <= p.meta["target"] <= 50
    for p in (LengthGen(min_digits=6, max_digits=6, train_max_digits=5).draw(rng) for _ in range(300)):
        assert _digits(p.meta["a"]) == 6 and _digits(p.meta["b"]) == 6


def _worst_cases() -> list[Problem]:
    """The longest problems the default and the extreme allowed settings can produce."""
    return [
        addition_problem(999, 999),
        addition_problem(99999, 99999, "length_gen"),
        addition_problem(10**9 - 1, 10**9 - 1),
        signed_problem([-9, -9, -9]),
        signed_problem([-20, -20, -20]),
        signed_problem([-20] * 4),
        multiplication_problem(99, 9),
        multiplication_problem(999, 99),
        *(linear_problem(a, x, b) for a in (-9, 9) for x in (-9, 9) for b in (-20, 20)),
        countdown_problem([10, 9, 9, 10], "*+-"),
        countdown_problem([4, 5, 9, 10], "+*-"),
    ]


@pytest.mark.parametrize("name", SUITES)
def test_prompts_and_targets_fit_the_length_limits_in_printable_ascii(name):
    task = get_task(name)
    rng = np.random.default_rng(7)
    for problem in [task.sample(rng, "eval") for _ in range(300)] + _worst_cases():
        assert len(problem.prompt) <= MAX_PROMPT_CHARS and len(problem.target) <= MAX_TARGET_CHARS, problem
        assert set(problem.prompt + problem.target + problem.answer) <= PRINTABLE, problem
        assert problem.prompt[-1] in "=?"
        json.dumps(problem.meta)


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("addition", {"max_digits": 0}, "max_digits must be in"),
        ("addition", {"min_digits": 3, "max_digits": 2}, "min_digits .3. exceeds max_digits"),
        ("addition", {"max_digits": 2.5}, "max_digits must be an int"),
        ("addition", {"max_digits": True}, "max_digits must be an int"),
        ("signed", {"n_terms": 1}, "n_terms must be in"),
        ("signed", {"n_terms": 4, "max_abs": 99}, "targets of up to 4[0-9] characters"),
        ("multiplication", {"digits_a": 4, "digits_b": 2}, "choose smaller settings"),
        ("linear", {"max_coef": 0}, "max_coef must be in"),
        ("linear", {"max_coef": 10**6, "max_x": 10**6}, "prompts of up to"),
        ("countdown", {"n_numbers": 5}, "targets of up to"),
        ("countdown", {"max_number": 20, "max_target": 10}, "max_target must be in"),
        ("length_gen", {"min_digits": 3}, "must exceed train_max_digits"),
        ("length_gen", {"max_digits": 10}, "max_digits must be in"),
    ],
)
def test_invalid_or_too_long_settings_raise_a_value_error_naming_the_setting(name, settings, message):
    with pytest.raises(ValueError, match=message):
        get_task(name, **settings)


def test_get_task_names_the_unknown_suite_and_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match=r"unknown suite 'adition'; valid suites: addition, signed, .*length_gen"
    ):
        get_task("adition")
    with pytest.raises(ValueError, match=r"unknown difficulty setting\(s\) \['digits'\] .*min_digits"):
        get_task("addition", digits=3)
    assert SUITES == ("addition", "signed", "multiplication", "linear", "countdown", "length_gen")
    assert "length_gen" not in TRAIN_SUITES


# ---------------------------------------------------------------- held-out splits


@pytest.mark.parametrize("name", SUITES)
def test_eval_set_is_fixed_for_a_seed_and_size(name):
    first = eval_set(name, 100, seed=9)
    assert first == eval_set(name, 100, seed=9)
    assert first[:40] == eval_set(name, 40, seed=9)
    assert first != eval_set(name, 100, seed=10)
    assert len({p.prompt for p in first}) == 100


GOLDEN_EVAL_PROMPTS = {  # eval_set(name, 4) at the default seed, recorded: runs stay comparable across machines
    "addition": ["989+442=", "24+6=", "878+978=", "777+53="],
    "signed": ["-2-6+8=", "-8-5-7=", "6-5+5=", "-3+6+9="],
    "multiplication": ["98*3=", "19*2=", "24*6=", "59*0="],
    "linear": ["9x+20=101?", "-8x-15=25?", "-4x+19=-5?", "-2x+5=15?"],
    "countdown": ["2,3,10>9?", "1,7,10>69?", "8,9,9>81?", "6,8,9>62?"],
    "length_gen": ["98914+44217=", "5824+2062=", "80984+8833=", "26063+9799="],
}


def test_eval_sets_match_their_recorded_prompts():
    assert {name: [p.prompt for p in eval_set(name, 4)] for name in SUITES} == GOLDEN_EVAL_PROMPTS


@pytest.mark.parametrize("name", TRAIN_SUITES)
def test_eval_set_is_disjoint_from_a_large_train_sample(name):
    held_out = {p.prompt for p in eval_set(name, 150)}
    rng = np.random.default_rng(0)
    task = get_task(name)
    train = {task.sample(rng, "train").prompt for _ in range(5000)}
    assert held_out.isdisjoint(train)
    assert all(is_eval_prompt(p) for p in held_out) and not any(is_eval_prompt(p) for p in train)


def test_train_stream_never_yields_a_held_out_problem():
    stream = train_stream(TRAIN_SUITES, np.random.default_rng(1))
    assert not any(is_eval_prompt(next(stream).prompt) for _ in range(3000))


def test_length_gen_has_more_digits_than_training_addition():
    rng = np.random.default_rng(0)
    train_digits = max(
        max(_digits(p.meta["a"]), _digits(p.meta["b"])) for p in (Addition().draw(rng) for _ in range(2000))
    )
    assert train_digits == Addition().max_digits
    for p in eval_set("length_gen", 200):
        assert min(_digits(p.meta["a"]), _digits(p.meta["b"])) > train_digits
    with pytest.raises(ValueError, match="evaluation-only"):
        get_task("length_gen").sample(np.random.default_rng(0), "train")


def test_eval_set_raises_when_the_held_out_pool_is_smaller_than_n():
    with pytest.raises(ValueError, match=r"found only \d+ distinct held-out 'addition' problems .* n=60"):
        eval_set("addition", 60, max_digits=1)
    for bad_n in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="n must be a positive int"):
            eval_set("addition", bad_n)
    with pytest.raises(ValueError, match="split must be one of"):
        get_task("addition").sample(np.random.default_rng(0), "test")


def test_train_stream_mixes_suites_by_weight_and_is_deterministic():
    names = ["addition", "linear", "countdown"]
    stream = train_stream(names, np.random.default_rng(3), weights=[2, 1, 0], linear={"max_coef": 2})
    drawn = [next(stream) for _ in range(3000)]
    counts = {name: sum(p.suite == name for p in drawn) for name in names}
    assert counts["countdown"] == 0 and 1800 < counts["addition"] < 2200
    assert all(abs(p.meta["a"]) <= 2 for p in drawn if p.suite == "linear")
    again = train_stream(names, np.random.default_rng(3), weights=[2, 1, 0], linear={"max_coef": 2})
    assert drawn[:200] == [next(again) for _ in range(200)]
    single = train_stream("signed", np.random.default_rng(0))
    assert {next(single).suite for _ in range(20)} == {"signed"}


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (["addition", "length_gen"], {}, "'length_gen' is evaluation-only"),
        (["addition", "nope"], {}, "unknown suite 'nope'"),
        ([], {}, "names is empty"),
        (["addition", "addition"], {}, "given more than once"),
        (["addition"], {"weights": [1, 2]}, "one entry per suite"),
        (["addition", "signed"], {"weights": [1, -1]}, "non-negative"),
        (["addition", "signed"], {"weights": [0, 0]}, "not all zero"),
        (["addition"], {"weights": ["a"]}, "weights must be numbers"),
        (["addition"], {"signed": {"n_terms": 3}}, r"difficulty given for \['signed'\]"),
        (["addition"], {"addition": 3}, "must be a dict of settings"),
        (["addition"], {"addition": {"digits": 3}}, "unknown difficulty setting"),
        ([3], {}, "names must hold suite names or Tasks"),
    ],
)
def test_train_stream_validates_before_drawing(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        train_stream(args, np.random.default_rng(0), **kwargs)


# ---------------------------------------------------------------- countdown evaluator


@pytest.mark.parametrize(
    ("expr", "numbers", "value"),
    [
        ("(5+3)*7", [3, 5, 7], 56),
        ("  10 - 4 / 2 ", [2, 4, 10], 8),
        ("(9-10)*3", [3, 9, 10], -3),
        ("8/4/2", None, 1),
        ("2*3*4", [2, 3, 4, 4], 24),
        ("4+4", [4, 4, 1], 8),
    ],
)
def test_countdown_evaluator_computes_exact_integer_arithmetic(expr, numbers, value):
    assert evaluate_expression(expr, numbers) == value


@pytest.mark.parametrize(
    ("expr", "numbers", "message"),
    [
        ("x+1", None, "names, attributes and function calls are not allowed"),
        ("__import__('os').system('ls')", None, "names, attributes and function calls"),
        ("(1).real", None, "attributes and decimals are not allowed"),
        ("(1)(2)", None, "function calls are not allowed"),
        ("2**10", None, r"'\*\*' \(power\) is not allowed"),
        ("9**9**9**9", None, r"'\*\*' \(power\) is not allowed"),
        ("7//2", None, "'//'"),
        ("7%2", None, "'%'"),
        ("-3+5", None, "unary signs are not allowed"),
        ("1234567+1", None, "exceeds 1000000"),
        ("9" * 300, None, "longer than 200 characters"),
        ("(" * 40 + "1" + ")" * 40, None, "brackets nested deeper than 16"),
        ("5/0", None, "division by zero"),
        ("5/(3-3)", None, "division by zero"),
        ("7/2", None, "not an exact division"),
        ("5+5", [5, 3], r"5 is used 2 times but given 1"),
        ("5+4", [5, 3], r"4 is not one of the given numbers"),
        ("1.5+1", None, "attributes and decimals"),
        ("1,2", None, "only digits"),
        ("", None, "empty expression"),
        ("   ", None, "empty expression"),
        ("(5+3", None, "not a valid arithmetic expression"),
        ("5 3", None, "not a valid arithmetic expression"),
        ("()", None, "Tuple is not allowed"),
        ("1000000*1000000*1000000", None, "intermediate value exceeds"),
        ("5\x00+1", None, "only digits"),
        ("5==5", None, "only digits"),
    ],
)
def test_countdown_evaluator_refuses_unsafe_or_invalid_expressions(expr, numbers, message):
    with pytest.raises(ExpressionError, match=message):
        evaluate_expression(expr, numbers)
    assert try_evaluate(expr, numbers) is None


def test_countdown_evaluator_never_calls_eval_exec_or_compile():
    tree = ast.parse((Path(__file__).parents[1] / "occ_theory" / "tasks" / "expression.py").read_text())
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert not names & {"eval", "exec", "compile", "__import__", "literal_eval"}


# ---------------------------------------------------------------- property-based


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=80))
def test_parsers_and_verifiers_never_raise_on_arbitrary_text(text):
    for name in SUITES:
        task, problem = _task_and_problem(name)
        answer = task.extract_answer(text)
        assert answer is None or isinstance(answer, str)
        assert task.reward(problem, text) in (0.0, 1.0)
        assert task.reward(problem, "#" + text) in (0.0, 1.0)


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(max_size=60), st.text(alphabet="0123456789+-*/() ", max_size=60)))
def test_expression_evaluator_only_returns_an_int_or_refuses(text):
    try:
        value = evaluate_expression(text, [1, 2, 3, 4])
    except ExpressionError:
        value = None
    assert value is None or type(value) is int
    assert try_evaluate(text) is None or type(try_evaluate(text)) is int


def _reference(tree):
    """Brute-force value of a (left, op, right) tree with Fractions; None if a division is not exact
    or an intermediate value leaves the evaluator's bound."""
    if isinstance(tree, int):
        return Fraction(tree)
    left, op, right = tree
    a, b = _reference(left), _reference(right)
    if a is None or b is None or (op == "/" and b == 0):
        return None
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
    return value if value.denominator == 1 and abs(value) <= MAX_MAGNITUDE else None


def _render(tree) -> str:
    if isinstance(tree, int):
        return str(tree)
    left, op, right = tree
    return f"({_render(left)}{op}{_render(right)})"


trees = st.recursive(
    st.integers(0, 50),
    lambda sub: st.tuples(sub, st.sampled_from("+-*/"), sub),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(tree=trees)
def test_expression_evaluator_matches_a_fraction_reference(tree):
    expected = _reference(tree)
    got = try_evaluate(_render(tree))
    if expected is None:
        assert got is None
    else:
        assert got == int(expected)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(-(10**30), 10**30), pad=st.sampled_from(["", " ", "\n", "\t "]))
def test_integer_answers_round_trip_through_extraction(n, pad):
    task = get_task("signed")
    assert task.extract_answer(f"steps{pad}#{pad}{n}{pad}") == str(n)
    assert task.extract_answer(f"#{n}x") is None


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=40))
def test_normalise_answer_is_idempotent_and_never_raises(text):
    once = normalise_answer(text)
    assert normalise_answer(once) == once
    assert answers_match(text, text)


# ---------------------------------------------------------------- user data


def test_load_user_dataset_reads_the_jsonl_fixture():
    problems = load_user_dataset(DATA / "user_tasks.jsonl")
    assert [p.answer for p in problems] == ["42", "1.5", "$1,234$", "Paris", "100"]
    assert problems[0].prompt == "What is 6*7?\n" and problems[0].target == "#42"
    assert problems[2].target == "999+235=1234#1234"
    assert {p.suite for p in problems} == {"user"}
    assert problems[4].meta == {"source": str(DATA / "user_tasks.jsonl"), "index": 4, "where": "line 6"}
    task = UserTask(problems)
    for p in problems:
        assert task.reward(p, p.target) == 1.0


def test_load_user_dataset_reads_parquet(tmp_path):
    path = tmp_path / "tasks.parquet"
    pd.DataFrame({"prompt": ["2+2?", "3*3?"], "answer": ["4", "9"], "extra": [1, 2]}).to_parquet(path)
    problems = load_user_dataset(path, suite="mine")
    assert [(p.prompt, p.answer, p.suite) for p in problems] == [("2+2?", "4", "mine"), ("3*3?", "9", "mine")]
    numeric = tmp_path / "numeric.parquet"
    pd.DataFrame({"prompt": ["a", "b"], "answer": [4, 2.5]}).to_parquet(numeric)
    assert [p.answer for p in load_user_dataset(numeric)] == ["4.0", "2.5"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "a", "answer": "1"}\nnot json\n', r"line 2: not valid JSON"),
        ('{"prompt": "a"}\n', r"line 1: missing field 'answer'"),
        ('{"answer": "1"}\n', r"line 1: missing field 'prompt'"),
        ('\n{"prompt": 3, "answer": "1"}\n', r"line 2: field 'prompt' must be a non-empty string, got int"),
        ('{"prompt": "a", "answer": null}\n', r"line 1: field 'answer' must be .* got NoneType"),
        ('{"prompt": "a", "answer": true}\n', r"line 1: field 'answer' must be .* got bool"),
        ('{"prompt": "a", "answer": ["1"]}\n', r"line 1: field 'answer' must be .* got list"),
        ('{"prompt": "a", "answer": "1", "target": 5}\n', r"line 1: field 'target' must be a string"),
        ('{"prompt": "a", "answer": "C#"}\n', r"line 1: field 'answer' must not contain '#'"),
        ('[{"prompt": "a", "answer": "1"}]\n', r"line 1: expected an object .* got list"),
        ("", r"empty file, no records"),
        ("\n  \n", r"empty file, no records"),
    ],
)
def test_malformed_jsonl_raises_a_value_error_naming_file_line_and_problem(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        load_user_dataset(path)
    assert str(path) in str(err.value)


def test_malformed_user_files_of_other_kinds_raise_value_errors_naming_the_file(tmp_path):
    cases = {
        "tasks.csv": (b"prompt,answer\n", "unknown extension '.csv'"),
        "binary.jsonl": (b'{"prompt": "a", "answer": "\xff"}\n', "line 1: not UTF-8 text"),
        "fake.parquet": (b"not parquet at all", "not a readable Parquet file"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=message) as err:
            load_user_dataset(path)
        assert str(path) in str(err.value)
    no_answer = tmp_path / "no_answer.parquet"
    pd.DataFrame({"prompt": ["a"]}).to_parquet(no_answer)
    with pytest.raises(ValueError, match=r"missing column 'answer'"):
        load_user_dataset(no_answer)
    null_row = tmp_path / "null_row.parquet"
    pd.DataFrame({"prompt": ["a", None], "answer": ["1", "2"]}).to_parquet(null_row)
    with pytest.raises(ValueError, match=r"null_row.parquet, row 1: field 'prompt'"):
        load_user_dataset(null_row)
    with pytest.raises(FileNotFoundError):
        load_user_dataset(tmp_path / "missing.jsonl")


def test_user_task_reward_is_normalised_exact_match_without_math_verify(monkeypatch):
    monkeypatch.setattr(user_module, "HAVE_MATH_VERIFY", False)
    problem = Problem(prompt="q?", answer="$1,234.0$", target="#1234", suite="user")
    task = UserTask([problem])
    for response in ("#1234", "# 1,234 ", "#$1234$", "steps#1234.00"):
        assert task.reward(problem, response) == 1.0, response
    for response in ("1234", "#1235", "#", "#12345", "#1,23,4", "#1234#1234"):
        assert task.reward(problem, response) == 0.0, response
    assert normalise_answer("  $$Paris$$ ") == "paris"


def test_user_task_uses_math_verify_when_importable(monkeypatch):
    calls = []

    class FakeMathVerify:
        @staticmethod
        def parse(text):
            return text.replace(" ", "")

        @staticmethod
        def verify(gold, predicted):
            calls.append((gold, predicted))
            if predicted == "boom":
                raise RuntimeError("verifier failure")
            return {gold, predicted} == {"1/2", "0.5"}

    monkeypatch.setitem(sys.modules, "math_verify", FakeMathVerify)
    monkeypatch.setattr(user_module, "HAVE_MATH_VERIFY", True)
    problem = Problem(prompt="half?", answer="1/2", target="#1/2", suite="user")
    task = UserTask([problem])
    assert task.evaluate(problem, "#0.5") and calls == [("1/2", "0.5")]
    assert not task.evaluate(problem, "#boom")
    assert task.evaluate(problem, "#1/2") and len(calls) == 2  # exact match needs no verifier


def test_user_task_samples_only_its_split_and_takes_a_custom_verifier():
    problems = [Problem(prompt=f"q{i}?", answer=str(i), target=f"#{i}", suite="user") for i in range(200)]
    task = UserTask(problems, verifier=lambda gold, predicted: predicted == gold + "!")
    rng = np.random.default_rng(0)
    assert all(is_eval_prompt(task.sample(rng, "eval").prompt) for _ in range(100))
    assert not any(is_eval_prompt(task.sample(rng, "train").prompt) for _ in range(100))
    assert task.evaluate(problems[3], "#3!") and not task.evaluate(problems[3], "#3")
    tiny = UserTask([problems[0]])
    missing = "eval" if not is_eval_prompt(problems[0].prompt) else "train"
    with pytest.raises(ValueError, match=f"falls in the {missing} split"):
        tiny.sample(rng, missing)
    with pytest.raises(ValueError, match="share one suite"):
        UserTask([problems[0], replace(problems[1], suite="other")])
    stream = train_stream(["addition", task], rng)
    assert {next(stream).suite for _ in range(100)} == {"addition", "user"}


def test_tasks_package_does_not_import_torch_or_pandas():
    code = "import sys, occ_theory.tasks; print(sorted({'torch', 'pandas'} & set(sys.modules)))"
    root = Path(__file__).parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"
