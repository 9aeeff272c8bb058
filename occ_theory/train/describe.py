"""``occ config [NAME] [--set KEY=VALUE ...]``: the resolved config, each key with its description and default.

The output is valid YAML (the descriptions and defaults are comments), so it can be saved and edited into a config
of one's own. The descriptions are the field docstrings (``train/config.py``, ``diagnostics/settings.py``,
``models/config.py``): the same text the documentation points to.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import textwrap
from typing import Any

import yaml
from pydantic import BaseModel

from ..models.config import ModelConfig
from .config import Config

WIDTH = 110


@functools.cache
def dataclass_docstrings(cls: type) -> dict[str, str]:
    """The attribute docstrings of dataclass ``cls`` (the string literal after each field), by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def flow(value: Any) -> str:
    """``value`` as one line of YAML (``[linear, countdown]``, ``null``, ``1.0e-05``)."""
    return yaml.safe_dump([value], default_flow_style=True, width=10**6).strip()[1:-1]


def _comment(text: str, indent: str) -> list[str]:
    words = " ".join(text.split())
    return [f"{indent}# {line}" for line in textwrap.wrap(words, WIDTH - len(indent) - 2)]


def _entries(section: Any, defaults: Any) -> list[tuple[str, Any, Any, str]]:
    """``(key, value, default, description)`` of every field of a config section."""
    if isinstance(section, BaseModel):
        fields = type(section).model_fields
        return [(k, getattr(section, k), getattr(defaults, k), f.description or "") for k, f in fields.items()]
    docs = dataclass_docstrings(type(section))
    return [(f.name, getattr(section, f.name), getattr(defaults, f.name), docs.get(f.name, ""))
            for f in dataclasses.fields(section)]


def _lines(section: Any, defaults: Any, indent: str = "") -> list[str]:
    out = []
    for key, value, default, doc in _entries(section, defaults):
        if isinstance(value, BaseModel | ModelConfig):
            described = Config.model_fields[key].description if indent == "" else None
            out += _comment(described, indent) if described else []
            out.append(f"{indent}{key}:")
            out += _lines(value, default, indent + "  ")
            continue
        plain = value.to_dict() if hasattr(value, "to_dict") else value
        out += _comment(doc, indent)
        mark = "default" if _same(value, default) else f"default: {flow(_plain(default))}"
        out.append(f"{indent}{key}: {flow(_plain(plain))}  # {mark}")
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _same(a: Any, b: Any) -> bool:
    return _plain(a) == _plain(b)


def describe_config(cfg: Config, source: str) -> str:
    """``cfg`` as commented YAML: each key's description above it, its default beside it (``# default`` when it is
    the default). ``source`` says where the config came from (the first line). The model section's defaults are
    the tiny preset's (``ModelConfig.tiny()``), or, with ``init_from``, the checkpoint's own (shown as null)."""
    defaults = Config()
    if cfg.model.init_from is not None:
        defaults = defaults.model_copy(update={"model": ModelConfig(init_from=cfg.model.init_from)})
    head = [f"# {source}",
            "# every key: its description above it, its default beside it; `occ config NAME > my.yaml` gives a "
            "config to edit"]
    if cfg.pretrained and cfg.model.init_from is None:
        head += _comment("pretrained: the model's architecture comes from --model DIR (the tiny preset's below is "
                         "not used); model.mtp_depths and model.mtp_init apply", "")
    return "\n".join(head + _lines(cfg, defaults)) + "\n"
