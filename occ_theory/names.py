"""Names shared by the package and ``analysis/``: regimes, proxies, suites, the files of a run directory.

Torch-free and dependency-free, so ``analysis/`` (which never imports torch) and the trainer spell
them from one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args


@dataclass(frozen=True)
class RegimeSpec:
    """One regime: its MTP loss, how that loss is cut from θ_S, the rule that sets its coefficient, how a run of it
    is named in an analysis, and what the rule needs at each step. Read by the objectives
    (``rl.batch.ObjectiveSpec.for_regime``), the coefficient rules (``rl.coef.CoefficientRule``), the trainer, the
    config's validation, the optional-dependency checks and the analysis's arm names."""

    name: str
    mtp_loss: str | None
    """None (no MTP loss: θ_M frozen), ``ce``, ``policy``, or ``config`` (``rl.detach_mtp_loss`` chooses)."""
    grad_cut: str
    """How M reaches θ_S: ``full``, ``detach`` (nowhere) or ``detach_encoder`` (the shared head only)."""
    rule: str
    """The coefficient rule (``rl/coef.py``): ``off``, ``fixed`` (``rl.mtp_coef``), ``proxy`` (occ: ``rl.proxy``),
    ``real``, ``adam_step``, ``cosine``, ``cosine_weighted``, ``pcgrad``, ``upgrad``."""
    arm: str
    """How its runs are told apart in an analysis: ``regime``, ``coef`` (``<regime>@<mtp_coef>``), ``proxy``
    (``occ/<proxy>``)."""
    needs_u: bool = False
    """The rule needs u = ∇M on θ_S from the live step (an extra backward pass; ``fisher`` decides at run time)."""
    step_model: bool = False
    """The rule's λ is a model optimum of the next step (a gradient and an HVP of J, every ``rl.coef_every`` steps)."""
    edits_shared: bool = False
    """The rule replaces the update on θ_S after the backward pass (``rl.coef.shared_update``)."""
    extra: str | None = None
    """The optional dependency it needs (``pip install ".[<extra>]"``)."""
    doc: str = ""


REGIME_TABLE: dict[str, RegimeSpec] = {r.name: r for r in (
    RegimeSpec("off", None, "full", "off", "regime", doc="no MTP loss, θ_M frozen"),
    RegimeSpec("detach", "config", "detach", "fixed", "regime", doc="θ_M trains; nothing reaches θ_S (u = 0)"),
    RegimeSpec("detach_encoder", "config", "detach_encoder", "fixed", "regime",
               doc="as the public code's detach_encoder: the shared head still learns from M"),
    RegimeSpec("ce", "ce", "full", "fixed", "coef", doc="M = mean q (imitate every sampled token), fixed λ"),
    RegimeSpec("policy", "policy", "full", "fixed", "coef", doc="clipped surrogate with ρ = exp(q − l_old), fixed λ"),
    RegimeSpec("occ", "policy", "full", "proxy", "proxy", doc="policy loss, λ from an OCC proxy (rl.proxy)"),
    RegimeSpec("real", "policy", "full", "real", "regime", needs_u=True, step_model=True,
               doc="policy loss, λ = the real, clipped AdamW step's second-order optimum (adam_real)"),
    RegimeSpec("adam_step", "policy", "full", "adam_step", "regime", needs_u=True, step_model=True,
               doc="policy loss, λ = λ*_m of the unclipped, v̂-frozen adam_step model (formerly oracle)"),
    RegimeSpec("cosine", "policy", "full", "cosine", "regime", needs_u=True, edits_shared=True,
               doc="u counts on θ_S only when cos(g, u) > 0 (Du et al. 2018)"),
    RegimeSpec("cosine_weighted", "policy", "full", "cosine_weighted", "regime", needs_u=True, edits_shared=True,
               doc="u weighted by max(0, cos(g, u)) on θ_S"),
    RegimeSpec("pcgrad", "policy", "full", "pcgrad", "regime", needs_u=True, edits_shared=True, extra="surgery",
               doc="torchjd's PCGrad of the RL and MTP gradients (Yu et al. 2020)"),
    RegimeSpec("upgrad", "policy", "full", "upgrad", "regime", needs_u=True, edits_shared=True, extra="surgery",
               doc="torchjd's UPGrad of the RL and MTP gradients (Quinton & Rey 2024)"),
)}
"""Every regime, in display order (docs/theory.md sections 1 and 4): a new one is a row here and, when it brings a
new rule, that rule in ``rl/coef.py``."""
REGIMES: tuple[str, ...] = tuple(REGIME_TABLE)
Regime = Literal[REGIMES]  # type: ignore[valid-type]
"""A regime name (validated by the config)."""
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
