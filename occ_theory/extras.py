"""The optional dependencies (``pyproject.toml``'s extras), checked before any work: what needs one is refused at
once with one line naming the extra to install, never after a download or a run directory was written.

Torch-free: ``importlib.util.find_spec`` looks a module up without importing it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .names import REGIME_TABLE

EXTRAS = {
    "surgery": ("torchjd",),  # the pcgrad and upgrad regimes
    "gguf": ("gguf", "accelerate"),  # reading .gguf files (occ models fetch, a .gguf --model)
    "trl": ("trl",),  # occ bench trainer
    "math": ("math_verify",),  # optional: user answers checked for mathematical equivalence
}
"""Extra name → the modules it installs (``pip install -e ".[NAME]"``)."""

SURGERY_REGIMES = tuple(r.name for r in REGIME_TABLE.values() if r.extra == "surgery")
"""The regimes that need torchjd (their row of ``names.REGIME_TABLE``)."""


def available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module blocked in sys.modules
        return False


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that are not installed."""
    return [m for m in EXTRAS[extra] if not available(m)]


def require(extra: str, what: str) -> None:
    """``ValueError`` (one line) when ``extra`` is not installed: ``what`` needs it, and how to install it."""
    lacking = missing(extra)
    if lacking:
        raise ValueError(f"{what} needs the optional extra '{extra}' ({', '.join(lacking)} not installed): "
                         f'pip install -e ".[{extra}]" in the repository (or pip install "occ-theory[{extra}]")')


def is_gguf(path: Any) -> bool:
    return path is not None and str(path).endswith(".gguf") and Path(str(path)).is_file()


def check_run(cfg: Any, kind: str) -> None:
    """Every extra a run of ``cfg`` needs (``kind``: "sft", "eval" or an RL regime), before anything is written."""
    extra = REGIME_TABLE[cfg.rl.regime].extra if kind not in ("sft", "eval") else None
    if extra is not None:
        require(extra, f"regime {cfg.rl.regime!r} ({REGIME_TABLE[cfg.rl.regime].doc})")
    for key, path in (("model.init_from", cfg.model.init_from), ("rl.init", cfg.rl.init if kind not in ("sft", "eval")
                                                                  else None)):
        if is_gguf(path):
            require("gguf", f"{key} {path} (a .gguf file)")
