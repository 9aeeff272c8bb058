"""The one config loader: YAML file → ``--set key=value`` overrides → validated, frozen settings.

Every section is a frozen pydantic model (``validated.Settings``) whose field docstrings are the
documentation; values are never mutated after parsing (derived values are properties). Unknown
keys and invalid values (wrong type, out of range, inf or nan) are rejected before any work with a
``ValueError`` that names the full key, e.g. ``config key 'rl.minibatches': ...``.

``--config`` takes a path or the name of a config shipped with the package (``tiny``, ``tiny_rl``,
``small``, ``reference``, ``paper_sketch``, ``smollm2``, ...; see ``config_path``); a packaged config holds only
what differs from the defaults, and ``occ config NAME`` prints it resolved, every key described
(``train/describe.py``).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, InstanceOf, ValidationError, create_model, field_validator, model_validator

from ..diagnostics.settings import ProbeFields
from ..models.config import ModelConfig
from ..names import PROXY_NAMES, REGIMES, RENAMED_REGIMES, SUITES, Parse, Proxy, Regime
from ..validated import (
    FieldError,
    Float,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Settings,
    apply_override,
    describe,
    validate,
    yaml_problem,
)

__all__ = ["PACKAGED_CONFIGS", "PRETRAINED_MODEL_KEYS", "PROXY_NAMES", "REGIMES", "Config", "DiagConfig", "DistConfig", "EvalConfig", "RLConfig",
           "SFTConfig", "TaskConfig", "config_path", "dump_config", "load_config"]

PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
"""The configs shipped with the package (``--config tiny`` reads ``tiny.yaml`` from here)."""


class TaskConfig(Settings):
    suites: tuple[str, ...] = ("addition", "signed", "multiplication", "linear", "countdown")
    """Training suites (the mixture RL and SFT draw prompts from); length_gen is evaluation only."""
    weights: tuple[NonNegativeFloat, ...] | None = None
    """Mixture weights of the training suites (None: uniform)."""
    difficulty: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per-suite difficulty settings passed to ``get_task(name, **settings)``."""
    user_data: str | None = None
    """A JSONL/Parquet file of {prompt, answer} records to train and evaluate on instead of the suites."""
    parse: Parse = "stated"
    """A pretrained model's answers: scored only when stated as asked ("Answer: N" or \\boxed{}), or
    ("lenient") else read from the last line (an equation's right side, an expression, or its last number)."""

    @model_validator(mode="after")
    def _check(self) -> TaskConfig:
        if not self.suites and self.user_data is None:
            raise FieldError("suites", "needs at least one suite")
        for key, names in (("suites", self.suites), ("difficulty", self.difficulty)):
            unknown = [s for s in names if s not in SUITES]
            if unknown:
                raise FieldError(key, f"unknown suite {unknown[0]!r}; choose from {list(SUITES)}")
        if self.weights is not None and (len(self.weights) != len(self.suites) or sum(self.weights) <= 0):
            raise FieldError("weights", "needs one non-negative weight per suite, not all zero")
        return self


class SFTConfig(Settings):
    steps: PositiveInt = 1500
    """Optimizer steps of supervised warm-up."""
    batch_size: PositiveInt = 64
    """Sequences per step."""
    lr: PositiveFloat = 3e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay to lr_min_ratio·lr)."""
    warmup: NonNegativeInt = 50
    """Warm-up steps."""
    lr_min_ratio: NonNegativeFloat = 0.1
    """Final learning rate as a fraction of the peak."""
    weight_decay: NonNegativeFloat = 0.01
    """AdamW weight decay."""
    mtp_coef: NonNegativeFloat = 0.3
    """Coefficient of the MTP cross-entropy (every depth) added to next-token cross-entropy."""
    grad_clip: NonNegativeFloat = 1.0
    """Global gradient-norm clip."""
    eval_every: NonNegativeInt = 500
    """Greedy evaluation every this many steps (0: only at the end)."""
    eval_size: PositiveInt = 64
    """Held-out problems per suite at periodic evaluation."""
    max_bad_steps: PositiveInt = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient (such steps are skipped)."""
    train: Literal["all", "mtp"] = "all"
    """What is trained: all (trunk + MTP) | mtp (θ_M alone, trunk frozen: the MTP warm-up of a pretrained model)."""
    data: Literal["task", "self"] = "task"
    """Targets: task (the suites' answers) | self (the model's own sampled responses; needs train=mtp)."""


Beta = typing.Annotated[Float, Field(ge=0, lt=1)]


class RLConfig(Settings):
    init: str | None = None
    """The checkpoint directory RL starts from (an `occ sft` checkpoint); required by `occ rl`."""
    regime: Regime = "occ"
    """MTP regime: off | detach | detach_encoder | ce | policy | occ | real | adam_step | cosine | cosine_weighted |
    pcgrad | upgrad (docs/theory.md sections 1 and 4)."""
    mtp_coef: Float = 0.1
    """λ for detach/ce/policy; the base coefficient c multiplying the proxy for occ; the coefficient that cosine,
    cosine_weighted, pcgrad and upgrad gate, weigh or aggregate (real and adam_step ignore it)."""
    proxy: Proxy = "reference"
    """OCC proxy: reference | least_squares | fisher (docs/theory.md section 4)."""
    coef_ema: typing.Annotated[Float, Field(ge=0, lt=1)] = 0.0
    """EMA factor of the calibrated coefficients (occ, real, adam_step), in [0, 1) (0: none)."""
    coef_clip: tuple[Float, Float] | None = None
    """Clip range [lo, hi] of the calibrated coefficients (occ, real, adam_step), lo <= hi (None: no clip)."""
    coef_max: NonNegativeFloat = 10.0
    """Bound on |λ| of the calibrated coefficients (occ, real, adam_step), applied after coef_clip (0: none): a
    coefficient from an unscaled model, such as the fisher proxy's λ*_F, can reach 1e5 on a step where its curvature
    is tiny."""
    coef_every: PositiveInt = 1
    """real and adam_step: recompute λ (an HVP of J) every this many optimizer steps and hold it in between."""
    clip_scope: Literal["global", "shared", "separate"] = "global"
    """What the gradient clip sees: global (one norm over θ_S and θ_M, as verl and Megatron clip), shared (θ_S alone;
    θ_M unclipped) or separate (θ_S and θ_M each by its own norm). Under global the MTP modules' gradient λ·∇_{θ_M}M
    enters θ_S's clip factor even under detach."""
    occ_convention: Literal["objective", "advantages"] = "objective"
    """How λ enters for occ: 'objective' multiplies M by λ; 'advantages' folds λ into the MTP advantages."""
    detach_mtp_loss: Literal["ce", "policy"] = "ce"
    """The loss that trains θ_M under detach/detach_encoder: ce | policy."""
    steps: PositiveInt = 40
    """Optimizer steps (each rollout batch gives `minibatches` of them)."""
    prompts_per_rollout: PositiveInt = 8
    """Prompts per rollout batch."""
    group_size: typing.Annotated[int, Field(ge=2)] = 8
    """G: sampled responses per prompt (at least 2: group advantages need a group)."""
    minibatches: PositiveInt = 4
    """Optimizer steps per rollout batch (policy drifts from the sampling policy between them); divides
    prompts_per_rollout × group_size."""
    max_new_tokens: PositiveInt = 40
    """Longest response."""
    old_logp_rows: NonNegativeInt = 0
    """Rows per forward pass when l_old is recomputed once per rollout (0: the whole rollout batch in one pass; set it
    to bound the memory of the logits, rows × tokens × vocabulary)."""
    temperature: PositiveFloat = 1.0
    """Sampling temperature (log-probs are of the temperature-scaled policy)."""
    top_p: typing.Annotated[Float, Field(gt=0, le=1)] = 1.0
    """Nucleus sampling threshold, in (0, 1]."""
    lr: PositiveFloat = 1e-5
    """AdamW learning rate (constant after the warm-up)."""
    warmup_steps: NonNegativeInt = 0
    """Linear learning-rate warm-up over this many optimizer steps, from lr/warmup_steps to lr (0: none): Adam's
    first steps are sign-like, so a warm-up keeps them from undoing SFT."""
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    """AdamW betas, each in [0, 1)."""
    adam_eps: NonNegativeFloat = 1e-8
    """AdamW epsilon."""
    weight_decay: NonNegativeFloat = 0.0
    """AdamW weight decay."""
    grad_clip: NonNegativeFloat = 1.0
    """Global gradient-norm clip (0: none)."""
    eps_lo: NonNegativeFloat = 0.2
    """Lower clip of the ratio: 1 − eps_lo."""
    eps_hi: NonNegativeFloat = 0.28
    """Upper clip of the ratio: 1 + eps_hi (DAPO clip-higher)."""
    adv_scale: Literal["group", "none"] = "group"
    """Advantage scaling: 'group' ((r − mean)/(std + eps)) or 'none' (r − mean)."""
    kl_coef: NonNegativeFloat = 0.0
    """Coefficient of the k3 KL penalty to the initial policy (0: off)."""
    eval_every: NonNegativeInt = 0
    """Held-out greedy accuracy every this many optimizer steps (0: only at the end)."""
    eval_size: PositiveInt = 32
    """Held-out problems per suite for the periodic evaluation."""
    checkpoint_every: NonNegativeInt = 0
    """Checkpoint every this many rollout batches (0: only at the end)."""
    keep_checkpoints: PositiveInt = 2
    """How many of the latest checkpoints to keep."""
    max_bad_steps: PositiveInt = 5
    """Stop (with a checkpoint) after this many consecutive steps with a non-finite loss or gradient."""

    @field_validator("regime", mode="before")
    @classmethod
    def _renamed(cls, value: Any) -> Any:
        if isinstance(value, str) and value in RENAMED_REGIMES:
            raise ValueError(f"{value!r} is now {RENAMED_REGIMES[value]!r}: the plug-in λ* of the unclipped, "
                             "v̂-frozen adam_step model, not an oracle; the λ* of the real, clipped step is 'real'")
        return value

    @model_validator(mode="after")
    def _check(self) -> RLConfig:
        if self.batch_size % self.minibatches:
            raise FieldError("minibatches", f"must divide prompts_per_rollout × group_size = {self.batch_size}")
        if self.coef_clip is not None and self.coef_clip[0] > self.coef_clip[1]:
            raise FieldError("coef_clip", "must be [lo, hi] with lo <= hi")
        return self

    @property
    def batch_size(self) -> int:
        return self.prompts_per_rollout * self.group_size

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.minibatches


class DiagConfig(ProbeFields):
    """When to diagnose, and the probe settings (``ProbeFields``: dtype, HVP method, λ grid, bootstrap, ...)."""

    every: NonNegativeInt = 10
    """Run the scheduled diagnostics every this many optimizer steps (0: never)."""
    at: tuple[typing.Annotated[int, Field(ge=1)], ...] = ()
    """Extra explicit optimizer steps to diagnose (counted from 1)."""
    log_spaced: NonNegativeInt = 0
    """Also diagnose this many log-spaced steps over the run (0: none)."""
    first: bool = True
    """Diagnose step 1 too."""
    defer_degenerate: bool = False
    """A diagnosis due on a minibatch without a nonzero advantage (and no KL term: J ≡ 0 there, so C = Q = 0
    and λ* is undefined) moves to the next step whose minibatch has one."""
    probes: bool = True
    """Save a probe bundle (what `occ probe` needs) on every diagnosed step."""
    curve_heldout: bool = False
    """Also evaluate the curve on a held-out batch of fresh rollouts."""
    stationary: bool = False
    """Track the momentum buffers of g and u on every step for the ``adam_stationary`` geometry. It needs u = ∇M on θ_S
    on every step, probed or not: one more backward of M through the trunk, about 1.6× the plain step of a regime
    whose MTP gradient stops at the trunk (``occ bench step``). Off, the probe has the other four geometries and runs
    pay only at probed steps."""
    bundle_only: bool = False
    """On a diagnosed step write the probe bundle but skip the online probe (and so identity 3 and the diag/…
    record): for a run whose probe does not fit its devices (the probe holds the whole θ_S and its directions on
    every process); `occ probe RUN` then recomputes every bundle on one large device. Needs diag.probes."""

    @model_validator(mode="after")
    def _bundle_only_needs_bundles(self) -> DiagConfig:
        if self.bundle_only and not self.probes:
            raise FieldError("bundle_only", "skips the online probe in favour of the bundle: it needs diag.probes")
        return self


class EvalConfig(Settings):
    size: PositiveInt = 128
    """Held-out problems per suite (multiplication's default held-out pool holds about 200)."""
    samples: PositiveInt = 4
    """k for sampled mean@k."""
    temperature: PositiveFloat = 1.0
    """Temperature of the sampled evaluation."""
    max_new_tokens: PositiveInt = 48
    """Longest response at evaluation."""
    seed: int = 1234
    """Seed of the fixed held-out sets."""


class DistConfig(Settings):
    """How several processes (``torchrun --nproc_per_node N``) share the model; one process ignores it."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every process holds the whole model and optimizer state, gradients are summed by all-reduce; fsdp: the
    model is sharded with PyTorch's FSDP2 (fully_shard on each decoder layer, each MTP block and the root), so
    weights, gradients and optimizer state are split over the processes. The trainer's numbers are the same."""


def _section_of(dc: type) -> type[Settings]:
    """A ``Settings`` model with the fields of dataclass ``dc``: their types checked strictly, floats
    finite (YAML 1.1 number text accepted), unknown keys refused, each error naming its field."""
    hints = typing.get_type_hints(dc)
    return create_model(f"{dc.__name__}Section", __base__=Settings, **{
        f.name: (Float if hints[f.name] is float else hints[f.name], f.default) for f in dataclasses.fields(dc)})


_ModelSection = _section_of(ModelConfig)


class Config(Settings):
    name: str = "run"
    """Run name prefix; runs are named {name}__{regime}__{seed}__{time}."""
    out_dir: str = "runs"
    """Where run directories are created."""
    seed: int = 0
    """Seed of everything (model init, sampling, task streams)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto | cpu | cuda."""
    threads: NonNegativeInt = 1
    """torch CPU threads (0: torch's default, one per core). 1 by default: on a shared 2-core machine 10 SFT
    steps of the tiny config took 5-45 s with 1 thread, 26-232 s with torch's default, 63-202 s with 2."""
    pretrained: bool = False
    """The config is written for a pretrained trunk (its sft settings suit one: smollm2, smollm2_gpu, paper_sketch).
    `occ sft` then needs the model (--model DIR or model.init_from; `occ models fetch smollm2` gives one), and refuses
    a pretrained model with a config without it, whose settings are the fresh tiny model's (sft.lr 3e-3 for
    1500 steps)."""
    model: InstanceOf[ModelConfig] = Field(default_factory=ModelConfig.tiny)
    """The model; keys given override the tiny preset's (ModelConfig.tiny()), unless init_from is given (then it
    stands alone: the architecture is the checkpoint's)."""
    task: TaskConfig = TaskConfig()
    sft: SFTConfig = SFTConfig()
    rl: RLConfig = RLConfig()
    diag: DiagConfig = DiagConfig()
    eval: EvalConfig = EvalConfig()
    dist: DistConfig = DistConfig()

    @field_validator("model", mode="before")
    @classmethod
    def _model_section(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        base = {} if "init_from" in value else ModelConfig.tiny().to_dict()
        try:
            section = _ModelSection.model_validate({**base, **value})
        except ValidationError as err:
            raise FieldError(*describe(err, _ModelSection)) from None
        return ModelConfig(**dict(section))

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON data (lists for tuples) that ``load_config`` reads back to an equal config."""
        return self.model_dump(mode="json")


def config_path(name: str | Path) -> Path:
    """The config file ``name`` names: a path that exists, else a config shipped with the package by
    its name (``tiny`` or ``tiny.yaml``). ``FileNotFoundError`` naming it and the packaged names otherwise."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = PACKAGED_CONFIGS / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.parent == Path(".") and packaged.is_file():
        return packaged
    names = ", ".join(sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")))
    raise FileNotFoundError(f"config file not found: {name} (packaged configs, usable by name: {names})")


PRETRAINED_MODEL_KEYS = ("mtp_depths", "mtp_init")
"""The model keys that apply to a pretrained model (its architecture is its own)."""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                model: str | Path | None = None) -> Config:
    """Read a YAML config (a path or a packaged name; None: the defaults), apply ``key=value``
    overrides, validate. ``model`` (``occ sft --model``: a pretrained model's path) makes the model section
    ``{init_from: model}`` with the config's ``mtp_depths`` and ``mtp_init``; an override of another model key
    is refused, naming it (the architecture is the model's own)."""
    tree: dict = {}
    if path is not None:
        path = config_path(path)
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {yaml_problem(e)}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"config file {path} is not text (UTF-8): {e.reason} at byte {e.start}") from None
        if not isinstance(tree, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
    for item in overrides:
        apply_override(tree, item, Config)
    if model is not None:
        keys = [item.split("=", 1)[0].strip() for item in overrides]
        fixed = [k for k in keys if k.startswith("model.") and k.removeprefix("model.") not in PRETRAINED_MODEL_KEYS]
        if fixed:
            raise ValueError(f"--set {fixed[0]}: --model {model} has its own architecture; of the model keys only "
                             f"{', '.join('model.' + k for k in PRETRAINED_MODEL_KEYS)} apply to it")
        section = tree.get("model") if isinstance(tree.get("model"), dict) else {}
        tree["model"] = {k: v for k, v in section.items() if k in PRETRAINED_MODEL_KEYS} | {"init_from": str(model)}
    return validate(Config, tree)


def dump_config(cfg: Config, path: str | Path) -> None:
    from ..atomic import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
