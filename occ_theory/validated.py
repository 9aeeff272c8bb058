"""Validated settings: the frozen pydantic base of every config section, ``--set key=value``
parsing, and the one-line ``ValueError`` that names the full key (``config key 'rl.lr': ...``).

Torch-free. ``train/config.py`` (the run config) and ``diagnostics/settings.py`` (the probe
settings) build on it. Values are strict (an int field takes no float or bool, a str field no
bool) and finite (no inf or nan in any float field), with two allowances for YAML: a list fills a
tuple field, and a float field takes YAML 1.1's number text (``1e-3`` has no dot, so YAML 1.1
reads it as a string).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    model_validator,
)
from typing_extensions import Self

__all__ = ["FieldError", "Float", "NonNegativeFloat", "NonNegativeInt", "PositiveFloat", "PositiveInt",
           "Settings", "apply_override", "describe", "validate", "yaml_problem"]


def _number_text(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value  # refused by the float check, naming the key
    return value


Float = Annotated[float, BeforeValidator(_number_text)]
"""A float that also takes YAML 1.1's number text (``1e-3``); finite in every ``Settings``."""
PositiveFloat = Annotated[Float, Field(gt=0)]
NonNegativeFloat = Annotated[Float, Field(ge=0)]


class FieldError(ValueError):
    """Raised by a cross-field check: the bad value is field ``key`` (dotted below the section)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class Settings(BaseModel):
    """Frozen, strict, finite, unknown keys refused; field docstrings are the documentation."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _lists_fill_tuples(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return data

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``, validated like the original (``ValueError`` naming the key)."""
        return validate(type(self), {**dict(self), **changes}, what="setting")


def describe(err: ValidationError, root: type[BaseModel]) -> tuple[str, str]:
    """``(dotted key, message)`` of the first error of ``err``, raised validating ``root``."""
    e = err.errors()[0]
    loc = list(e["loc"])
    cause = (e.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        loc.append(cause.key)
        msg = str(cause)
    elif e["type"] == "value_error":
        msg = e["msg"].removeprefix("Value error, ")
    elif e["type"] == "extra_forbidden":
        msg = f"unknown key; valid keys here: {sorted(_keys(_annotation(root, loc[:-1])))}"
    else:
        msg = f"{e['msg']}, got {e['input']!r}"
        if isinstance(e["input"], bool) and e["type"] in ("string_type", "literal_error"):
            msg += " (YAML reads off/on/no/yes as booleans: quote it)"
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).removeprefix(".")
    more = len(err.errors()) - 1
    return key, msg + (f" (and {more} more error{'s' * (more > 1)})" if more else "")


def validate(cls: type[BaseModel], data: Any, prefix: str = "", what: str = "config key") -> Any:
    """``cls`` built from ``data``; any invalid value is a one-line ``ValueError`` naming its full key
    (``prefix`` is the dotted path of ``cls`` inside the whole config, e.g. ``diag``)."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        key, msg = describe(err, cls)
        full = ".".join(p for p in (prefix, key) if p) or "<root>"
        raise ValueError(f"{what} '{full}': {msg}") from None


def apply_override(tree: dict[str, Any], item: str, root: type, prefix: str = "") -> str:
    """Apply ``key=value`` to ``tree`` (nested dicts) and return the key. The value stays text where
    the field holds text (a str or a choice of strings), else it is read as YAML (``[0, 1]``,
    ``null``, ``1e-3``). ``prefix`` (e.g. ``diag``) is stripped from the key to reach ``root``."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key=value (e.g. rl.mtp_coef=0.1)")
    key, text = (s.strip() for s in item.split("=", 1))
    parts = key.split(".")
    if prefix:
        if parts[0] != prefix:
            raise ValueError(f"config key '{key}': not a {prefix}.* key")
        parts = parts[1:]
    value: Any = text
    if not _holds_text(_annotation(root, parts), text):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"config key '{key}': value {text!r} is not valid YAML: {yaml_problem(e)}") from None
    node = tree
    for i, p in enumerate(parts[:-1]):
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"config key '{key}': '{'.'.join(parts[:i + 1])}' is not a section")
    node[parts[-1]] = value
    return key


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML parser's error as one line: where (line and column, counted from 1) and what (the parser's own
    message spans several lines and quotes the text)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    what = getattr(err, "problem", None) or getattr(err, "context", None) or str(err).strip().splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(what).split())


def _annotation(tp: Any, parts: list[str]) -> Any:
    """The annotation at dotted path ``parts`` below ``tp`` (None when there is no such field)."""
    for p in parts:
        tp = _drop_none(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(p)
            tp = None if field is None else field.annotation
        elif dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp).get(p)
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
    return tp


def _keys(tp: Any) -> list[str]:
    tp = _drop_none(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    if dataclasses.is_dataclass(tp):
        return [f.name for f in dataclasses.fields(tp)]
    return []


def _members(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def _drop_none(tp: Any) -> Any:
    members = [a for a in _members(tp) if a is not type(None)]
    return members[0] if len(members) == 1 else tp


def _holds_text(tp: Any, text: str) -> bool:
    members = _members(tp)
    if type(None) in members and text in ("null", "~"):
        return False
    return any(a is str or (typing.get_origin(a) is Literal and all(isinstance(v, str) for v in typing.get_args(a)))
               for a in members)
