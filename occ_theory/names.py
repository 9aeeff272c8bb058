"""Names shared by the package and ``analysis/``: regimes, proxies, suites, the files of a run directory.

Torch-free and dependency-free, so ``analysis/`` (which never imports torch) and the trainer spell
them from one place.
"""

from __future__ import annotations

from typing import Literal, get_args

Regime = Literal["off", "detach", "detach_encoder", "ce", "policy", "occ", "real", "adam_step", "cosine",
                 "cosine_weighted", "pcgrad", "upgrad"]
"""MTP regimes (docs/theory.md sections 1 and 4), in display order: what M is, how it is cut, and which rule
sets its coefficient (``occ_theory.rl.coef``)."""
REGIMES: tuple[str, ...] = get_args(Regime)
RENAMED_REGIMES: dict[str, str] = {"oracle": "adam_step"}
"""Regimes renamed for what they are, old name -> new: ``oracle`` was the plug-in λ* of the unclipped, v̂-frozen
``adam_step`` model, not an oracle (docs/theory.md section 4)."""

Proxy = Literal["reference", "least_squares", "fisher"]
"""OCC proxies of λ* (docs/theory.md section 4), in display order."""
PROXY_NAMES: tuple[str, ...] = get_args(Proxy)

Parse = Literal["stated", "lenient"]
"""How a pretrained model's final answer is read (``occ_theory.tasks.chat``): only as stated, or also from
the last line when none is stated."""
PARSES: tuple[str, ...] = get_args(Parse)

SUITES: tuple[str, ...] = ("addition", "signed", "multiplication", "linear", "countdown", "length_gen")
"""The six suites in display order (``occ_theory.tasks.SUITES`` registers them in this order)."""

CONFIG_FILE = "config.yaml"
"""A run's fully resolved config."""
METRICS_FILE = "metrics.jsonl"
"""A run's per-step log."""
PROBES_FILE = "probes.parquet"
"""``occ probe``'s recomputed probes (one row per probe step)."""
EVAL_FILE = "eval.json"
"""Held-out evaluation of a run or checkpoint."""
ONLINE_FILE = "online.json"
"""The values a probe bundle's step computed online (``probes/step_N/online.json``)."""
SUMMARY_FILE = "summary.md"
"""``occ figures``: the claim table."""
SUMMARY_JSON = "summary.json"
"""``occ figures``: the claim verdicts, machine-readable."""
