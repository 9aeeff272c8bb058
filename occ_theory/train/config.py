"""The one config loader: YAML file → ``--set key=value`` overrides → validated dataclasses.

Every section is a frozen dataclass whose field docstrings are the documentation; values are
never mutated after parsing (derived values are properties). Unknown keys and invalid values are
rejected before any work with a ``ValueError`` that names the key, e.g. ``rl.minibatches``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..models.config import ModelConfig

REGIMES = ("off", "detach", "detach_encoder", "ce", "policy", "occ")
PROXY_NAMES = ("reference", "least_squares", "fisher")


def _fail(key: str, msg: str) -> None:
    raise ValueError(f"config key '{key}': {msg}")


@dataclass(frozen=True)
class TaskConfig:
    suites: tuple[str, ...] = ("addition", "signed", "multiplication", "linear", "countdown")
    """Training suites (the mixture RL and SFT draw prompts from); length_gen is evaluation only."""
    weights: tuple[float, ...] | None = None
    """Mixture weights of the training suites (None: uniform)."""
    difficulty: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-suite difficulty settings passed to ``get_task(name, **settings)``."""
    user_data: str | None = None
    """A JSONL/Parquet file of {prompt, answer} records to train and evaluate on instead of the suites."""

    def validate(self, key: str) -> None:
        from ..tasks import SUITES

        if not self.suites and self.user_data is None:
            _fail(f"{key}.suites", "needs at least one suite")
        for s in self.suites:
            if s not in SUITES:
                _fail(f"{key}.suites", f"unknown suite {s!r}; choose from {list(SUITES)}")
        if self.weights is not None and (len(self.weights) != len(self.suites) or min(self.weights) < 0
                                         or sum(self.weights) <= 0):
            _fail(f"{key}.weights", "needs one non-negative weight per suite, not all zero")
        for s in self.difficulty:
            if s not in SUITES:
                _fail(f"{key}.difficulty", f"unknown suite {s!r}")


@dataclass(frozen=True)
class SFTConfig:
    steps: int = 1500
    """Optimizer steps of supervised warm-up."""
    batch_size: int = 64
    """Sequences per step."""
    lr: float = 3e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay to lr_min_ratio·lr)."""
    warmup: int = 50
    """Warm-up steps."""
    lr_min_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    mtp_coef: float = 0.3
    """Coefficient of the MTP cross-entropy (every depth) added to next-token cross-entropy."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    eval_every: int = 500
    """Greedy evaluation every this many steps (0: only at the end)."""
    eval_size: int = 64
    """Held-out problems per suite at periodic evaluation."""

    def validate(self, key: str) -> None:
        _positive(self, key, "steps", "batch_size", "lr")
        _non_negative(self, key, "warmup", "weight_decay", "mtp_coef", "grad_clip", "eval_every", "lr_min_ratio")
        _positive(self, key, "eval_size")


@dataclass(frozen=True)
class RLConfig:
    init: str | None = None
    """The checkpoint directory RL starts from (an `occ sft` checkpoint); required by `occ rl`."""
    regime: str = "occ"
    """MTP regime: off | detach | detach_encoder | ce | policy | occ (THEORY.md section 1)."""
    mtp_coef: float = 0.1
    """λ for detach/ce/policy; the base coefficient c multiplying the proxy for occ."""
    proxy: str = "reference"
    """OCC proxy: reference | least_squares | fisher (THEORY.md section 4)."""
    coef_ema: float = 0.0
    """EMA factor of the OCC coefficient (0: none)."""
    coef_clip: tuple[float, float] | None = None
    """Clip range [lo, hi] of the OCC coefficient (None: no clip)."""
    occ_convention: str = "objective"
    """How λ enters for occ: 'objective' multiplies M by λ; 'advantages' folds λ into the MTP advantages."""
    detach_mtp_loss: str = "ce"
    """The loss that trains θ_M under detach/detach_encoder: ce | policy."""
    steps: int = 40
    """Optimizer steps (each rollout batch gives `minibatches` of them)."""
    prompts_per_rollout: int = 8
    """Prompts per rollout batch."""
    group_size: int = 8
    """G: sampled responses per prompt."""
    minibatches: int = 4
    """Optimizer steps per rollout batch (policy drifts from the sampling policy between them)."""
    max_new_tokens: int = 40
    """Longest response."""
    temperature: float = 1.0
    """Sampling temperature (log-probs are of the temperature-scaled policy)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    lr: float = 1e-5
    """AdamW learning rate (constant)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0: none)."""
    eps_lo: float = 0.2
    """Lower clip of the ratio: 1 − eps_lo."""
    eps_hi: float = 0.28
    """Upper clip of the ratio: 1 + eps_hi (DAPO clip-higher)."""
    adv_scale: str = "group"
    """Advantage scaling: 'group' ((r − mean)/(std + eps)) or 'none' (r − mean)."""
    kl_coef: float = 0.0
    """Coefficient of the k3 KL penalty to the initial policy (0: off)."""
    eval_every: int = 0
    """Held-out greedy accuracy every this many optimizer steps (0: only at the end)."""
    eval_size: int = 32
    """Held-out problems per suite for the periodic evaluation."""
    checkpoint_every: int = 0
    """Checkpoint every this many rollout batches (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many of the latest checkpoints to keep."""
    max_bad_steps: int = 5
    """Stop (with a checkpoint) after this many consecutive steps with a non-finite loss or gradient."""

    def validate(self, key: str) -> None:
        if self.regime not in REGIMES:
            _fail(f"{key}.regime", f"unknown regime {self.regime!r}; choose from {list(REGIMES)}")
        if self.proxy not in PROXY_NAMES:
            _fail(f"{key}.proxy", f"unknown proxy {self.proxy!r}; choose from {list(PROXY_NAMES)}")
        if self.occ_convention not in ("objective", "advantages"):
            _fail(f"{key}.occ_convention", "must be 'objective' or 'advantages'")
        if self.detach_mtp_loss not in ("ce", "policy"):
            _fail(f"{key}.detach_mtp_loss", "must be 'ce' or 'policy'")
        if self.adv_scale not in ("group", "none"):
            _fail(f"{key}.adv_scale", "must be 'group' or 'none'")
        _positive(self, key, "steps", "prompts_per_rollout", "minibatches", "max_new_tokens", "temperature", "lr",
                  "eval_size", "keep_checkpoints", "max_bad_steps")
        _non_negative(self, key, "grad_clip", "eps_lo", "eps_hi", "kl_coef", "weight_decay", "eval_every",
                      "checkpoint_every", "adam_eps")
        if self.group_size < 2:
            _fail(f"{key}.group_size", "must be at least 2 (group advantages need a group)")
        if (self.prompts_per_rollout * self.group_size) % self.minibatches:
            _fail(f"{key}.minibatches", f"must divide prompts_per_rollout × group_size = "
                  f"{self.prompts_per_rollout * self.group_size}")
        if not 0 < self.top_p <= 1:
            _fail(f"{key}.top_p", "must be in (0, 1]")
        if not 0 <= self.coef_ema < 1:
            _fail(f"{key}.coef_ema", "must be in [0, 1)")
        if self.coef_clip is not None and not (len(self.coef_clip) == 2 and self.coef_clip[0] <= self.coef_clip[1]):
            _fail(f"{key}.coef_clip", "must be [lo, hi] with lo <= hi")
        if not math.isfinite(self.mtp_coef):
            _fail(f"{key}.mtp_coef", "must be finite")
        if not all(0 <= b < 1 for b in self.betas):
            _fail(f"{key}.betas", "must be two numbers in [0, 1)")

    @property
    def batch_size(self) -> int:
        return self.prompts_per_rollout * self.group_size

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.minibatches


@dataclass(frozen=True)
class DiagConfig:
    every: int = 10
    """Run the scheduled diagnostics every this many optimizer steps (0: never)."""
    at: tuple[int, ...] = ()
    """Extra explicit optimizer steps to diagnose."""
    log_spaced: int = 0
    """Also diagnose this many log-spaced steps over the run (0: none)."""
    first: bool = True
    """Diagnose step 1 too."""
    probes: bool = True
    """Save a probe bundle (what `occ probe` needs) on every diagnosed step."""
    dtype: str = "float32"
    """Precision of the curvature computations: float32 | float64."""
    hvp_method: str = "rev-rev"
    """rev-rev | fwd-rev (rev-rev is the faster of the two on CPU: see `occ bench hvp`)."""
    curve_points: int = 9
    """λ-grid points of the measured curve (0: no curve)."""
    curve_span: float = 3.0
    """The grid spans ±curve_span·|predicted λ*|."""
    curve_default: float = 1.0
    """Grid half-width when neither a finite λ* nor the step sizes are known."""
    grid_cap: float = 0.0
    """0 (default): the grid of THEORY.md section 5, out to curve_span × |λ*|. > 0: the grid stops where the MTP
    step reaches grid_cap × the RL step (‖λ·Pu‖ = cap·‖Pg‖), and spans exactly that without a finite λ*."""
    curve_real_step: bool = False
    """Also measure the curve with the real optimizer step from a copy of the optimizer state."""
    curve_heldout: bool = False
    """Also evaluate the curve on a held-out batch of fresh rollouts."""
    bootstrap: int = 100
    """Bootstrap resamples (over sequences) for the fit's intervals (0: none)."""
    taylor_halvings: int = 3
    """Identity 2 on the live model: measure the Taylor residual at η, η/2, ... (this many halvings; 0: off)."""

    def validate(self, key: str) -> None:
        if self.dtype not in ("float32", "float64"):
            _fail(f"{key}.dtype", "must be float32 or float64")
        if self.hvp_method not in ("fwd-rev", "rev-rev"):
            _fail(f"{key}.hvp_method", "must be fwd-rev or rev-rev")
        _non_negative(self, key, "every", "log_spaced", "curve_points", "bootstrap", "taylor_halvings")
        _positive(self, key, "curve_span", "curve_default")
        _non_negative(self, key, "grid_cap")
        if 0 < self.curve_points < 3:
            _fail(f"{key}.curve_points", "needs at least 3 points (or 0 for no curve)")
        if any(s < 1 for s in self.at):
            _fail(f"{key}.at", "steps are counted from 1")


@dataclass(frozen=True)
class EvalConfig:
    size: int = 128
    """Held-out problems per suite (multiplication's default held-out pool holds about 200)."""
    samples: int = 4
    """k for sampled mean@k."""
    temperature: float = 1.0
    """Temperature of the sampled evaluation."""
    max_new_tokens: int = 48
    """Longest response at evaluation."""
    seed: int = 1234
    """Seed of the fixed held-out sets."""

    def validate(self, key: str) -> None:
        _positive(self, key, "size", "samples", "temperature", "max_new_tokens")


@dataclass(frozen=True)
class Config:
    name: str = "run"
    """Run name prefix; runs are named {name}__{regime}__{seed}__{time}."""
    out_dir: str = "runs"
    """Where run directories are created."""
    seed: int = 0
    """Seed of everything (model init, sampling, task streams)."""
    device: str = "auto"
    """auto | cpu | cuda."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""
    model: ModelConfig = field(default_factory=ModelConfig.tiny)
    """The model; keys given override the tiny model's, unless init_from is given (then it stands alone)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    diag: DiagConfig = field(default_factory=DiagConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> Config:
        if self.device not in ("auto", "cpu", "cuda"):
            _fail("device", "must be auto, cpu or cuda")
        if self.threads < 0:
            _fail("threads", "must be >= 0")
        for f in ("task", "sft", "rl", "diag", "eval"):
            getattr(self, f).validate(f)
        return self

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _positive(obj: Any, key: str, *names: str) -> None:
    for n in names:
        if not getattr(obj, n) > 0:
            _fail(f"{key}.{n}", f"must be > 0, got {getattr(obj, n)!r}")


def _non_negative(obj: Any, key: str, *names: str) -> None:
    for n in names:
        if not getattr(obj, n) >= 0:
            _fail(f"{key}.{n}", f"must be >= 0, got {getattr(obj, n)!r}")


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


# ---------------------------------------------------------------- parsing


class _Raw(str):
    """The text of a ``--set`` value: a string where the field is a string, else parsed as YAML."""


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (coercing lists to tuples, ints to floats)."""
    if isinstance(value, _Raw):
        if tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp)
                         and str(value) not in ("null", "~")):
            return str(value)
        try:
            value = yaml.safe_load(str(value))
        except yaml.YAMLError as e:
            _fail(key, f"value {str(value)!r} is not valid YAML: {e}")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ValueError:
                pass
        _fail(key, f"invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is Any:
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            _fail(key, f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            _fail(key, f"expected {len(args)} values, got {len(value)}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            _fail(key, f"expected a mapping, got {value!r}")
        return {str(k): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                _fail(key, f"expected a number, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):
            _fail(key, f"expected a string, got {value!r} (YAML reads off/on/no/yes as booleans: quote it)")
        if not isinstance(value, str):
            _fail(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")


def from_dict(cls: type, data: Any, key: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and ill-typed values."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        _fail(key or "<root>", f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls) if f.init}
    for k in data:
        if k not in names:
            where = f"{key}.{k}" if key else str(k)
            _fail(where, f"unknown key; valid keys here: {sorted(names)}")
    if cls is Config and isinstance(data.get("model"), dict) and "init_from" not in data["model"]:
        # a model section overrides the default tiny model key by key (with init_from it stands alone)
        data = {**data, "model": {**ModelConfig.tiny().to_dict(), **data["model"]}}
    kwargs = {k: _convert(v, hints[k], f"{key}.{k}" if key else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"config section '{key or '<root>'}': {e}") from e


def _set(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            _fail(dotted, f"'{p}' is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults), apply ``key=value`` overrides, validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. rl.mtp_coef=0.1)")
        k, v = item.split("=", 1)
        _set(tree, k.strip(), _Raw(v.strip()))
    return from_dict(Config, tree).validate()


def dump_config(cfg: Config, path: str | Path) -> None:
    from ..atomic import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
