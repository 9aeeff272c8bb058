"""Safe evaluation of countdown answers: exact integer arithmetic over ``+ - * /`` and parentheses.

The text is screened (length, characters, bracket depth), parsed with ``ast.parse`` (which only
parses: nothing is compiled or run; ``eval``/``exec`` are never used), and the tree is walked by
hand. Only integer literals written in plain decimal digits and the binary operators ``+ - * /``
are accepted. ``/`` must divide exactly; intermediate values stay bounded. Names, attributes,
calls, ``**``, ``//``, ``%``, unary signs, huge literals, deep nesting and division by zero are
refused with an ``ExpressionError`` (a ``ValueError``) saying why; ``try_evaluate`` returns None
instead. When ``numbers`` is given, each literal must be one of them, used at most as many times
as it is given.
"""

from __future__ import annotations

import ast
from collections import Counter
from collections.abc import Sequence

MAX_EXPRESSION_CHARS = 200
MAX_BRACKET_DEPTH = 16
MAX_NODE_DEPTH = 120  # a 200-character expression cannot nest deeper than this without brackets
MAX_LITERAL = 10**6
MAX_MAGNITUDE = 10**12

_ALLOWED_CHARS = frozenset("0123456789+-*/() \t")
_REFUSED_OPERATORS = {
    ast.Pow: "'**' (power)",
    ast.FloorDiv: "'//' (use '/', which must divide exactly)",
    ast.Mod: "'%'",
    ast.MatMult: "'@'",
}


class ExpressionError(ValueError):
    """An answer expression that is not safe, exact integer arithmetic over the given numbers."""


def evaluate_expression(expr: str, numbers: Sequence[int] | None = None) -> int:
    """The exact integer value of ``expr``; raises ``ExpressionError`` saying why it is refused."""
    if not isinstance(expr, str):
        raise ExpressionError(f"the expression must be a string, got {type(expr).__name__}")
    text = expr.strip()
    _screen(text)
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as err:
        raise ExpressionError(f"not a valid arithmetic expression ({err.msg})") from None
    except (ValueError, RecursionError, MemoryError) as err:
        raise ExpressionError(f"not a valid arithmetic expression ({type(err).__name__})") from None
    used: list[int] = []
    value = _evaluate(tree.body, text, used, depth=0)
    if numbers is not None:
        _check_usage(used, numbers)
    return value


def try_evaluate(expr: str, numbers: Sequence[int] | None = None) -> int | None:
    """``evaluate_expression``, with None for any refused expression."""
    try:
        return evaluate_expression(expr, numbers)
    except ExpressionError:
        return None


def _screen(text: str) -> None:
    if not text:
        raise ExpressionError("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    depth = 0
    for i, ch in enumerate(text):
        if ch not in _ALLOWED_CHARS:
            if ch.isalpha() or ch == "_":
                why = "names, attributes and function calls are not allowed"
            elif ch == ".":
                why = "attributes and decimals are not allowed"
            else:
                why = "only digits, + - * / and parentheses are allowed"
            raise ExpressionError(f"character {ch!r} at position {i}: {why}")
        depth += (ch == "(") - (ch == ")")
        if depth > MAX_BRACKET_DEPTH:
            raise ExpressionError(f"brackets nested deeper than {MAX_BRACKET_DEPTH}")


def _evaluate(node: ast.AST, text: str, used: list[int], depth: int) -> int:
    if depth > MAX_NODE_DEPTH:
        raise ExpressionError(f"expression nested deeper than {MAX_NODE_DEPTH}")
    if isinstance(node, ast.Constant):
        return _literal(node, text, used)
    if isinstance(node, ast.BinOp):
        refused = _REFUSED_OPERATORS.get(type(node.op))
        if refused is not None:
            raise ExpressionError(f"operator {refused} is not allowed")
        if not isinstance(node.op, ast.Add | ast.Sub | ast.Mult | ast.Div):
            raise ExpressionError(f"operator {type(node.op).__name__} is not allowed")
        left = _evaluate(node.left, text, used, depth + 1)
        right = _evaluate(node.right, text, used, depth + 1)
        value = _apply(node.op, left, right)
        if abs(value) > MAX_MAGNITUDE:
            raise ExpressionError(f"intermediate value exceeds {MAX_MAGNITUDE}")
        return value
    if isinstance(node, ast.UnaryOp):
        raise ExpressionError("unary signs are not allowed: combine the given numbers with binary operators")
    if isinstance(node, ast.Call):
        raise ExpressionError("function calls are not allowed")
    if isinstance(node, ast.Name | ast.Attribute):
        raise ExpressionError("names and attributes are not allowed")
    raise ExpressionError(f"{type(node).__name__} is not allowed: only + - * / and parentheses")


def _literal(node: ast.Constant, text: str, used: list[int]) -> int:
    if type(node.value) is not int:
        raise ExpressionError(f"only integer literals are allowed, got {node.value!r}")
    source = ast.get_source_segment(text, node)
    if source is None or not (source.isascii() and source.isdigit()):
        raise ExpressionError(f"integer literals must be plain decimal digits, got {source!r}")
    if node.value > MAX_LITERAL:
        raise ExpressionError(f"literal {source[:12]}... exceeds {MAX_LITERAL}")
    used.append(node.value)
    return node.value


def _apply(op: ast.operator, left: int, right: int) -> int:
    if isinstance(op, ast.Add):
        return left + right
    if isinstance(op, ast.Sub):
        return left - right
    if isinstance(op, ast.Mult):
        return left * right
    if right == 0:
        raise ExpressionError("division by zero")
    if left % right:
        raise ExpressionError(f"{left}/{right} is not an exact division")
    return left // right


def _check_usage(used: list[int], numbers: Sequence[int]) -> None:
    given = Counter(int(n) for n in numbers)
    for value, count in Counter(used).items():
        if given[value] == 0:
            raise ExpressionError(f"{value} is not one of the given numbers {sorted(given.elements())}")
        if count > given[value]:
            raise ExpressionError(f"{value} is used {count} times but given {given[value]} time(s)")
