"""The probe settings, defined once: ``ProbeFields`` (what a config's ``diag`` section and ``occ
probe --set diag.KEY=VALUE`` set) and ``ProbeSettings`` (those plus the per-probe bootstrap seed),
which ``run_probe`` takes and a probe bundle stores (``model_dump()``; ``ProbeSettings(**d)`` reads
it back, also from bundles written when it was a dataclass: the keys are the same).

Torch-free; nothing here imports ``train/``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from ..validated import (
    FieldError,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Settings,
    apply_override,
    validate,
)


class ProbeFields(Settings):
    """The probe settings a config sets (every ``ProbeSettings`` field but the per-probe ``seed``)."""

    dtype: Literal["float32", "float64"] = "float32"
    """Precision of the curvature computations: float32 | float64."""
    hvp_method: Literal["rev-rev", "fwd-rev"] = "rev-rev"
    """rev-rev | fwd-rev (rev-rev is the faster of the two on CPU: see `occ bench hvp`)."""
    curve_points: NonNegativeInt = 9
    """λ-grid points of the measured curve Δ(λ) (0: no curve; else at least 3)."""
    curve_span: PositiveFloat = 3.0
    """The grid spans ±curve_span·|predicted λ*|."""
    curve_default: PositiveFloat = 1.0
    """Grid half-width when neither a finite λ* nor the step sizes are known."""
    curve_real_step: bool = False
    """Also measure the ground truth: the real optimizer step's curve from a copy of the optimizer state (clip and v̂(λ)
    included) on the local grid, its maximum on a fine log grid (the real optimum, with and without the clip), every
    geometry's λ* against it, and the exact split of the real curvature into clip, v̂(λ) and the rest."""
    optimum_per_decade: PositiveInt = 5
    """Points per decade of |λ| (each sign) of the fine grid on which the real optimum is found, before it is refined
    in its bracketing cell."""
    bootstrap: NonNegativeInt = 100
    """Bootstrap resamples (over sequences) for the fit's intervals (0: none)."""
    taylor_halvings: NonNegativeInt = 3
    """Identity 2 on the live model: measure the Taylor residual at η, η/2, ... (this many halvings; 0: off)."""
    row_chunk: NonNegativeInt = 0
    """Rows per backward pass of the probe's g, u, HVPs and JVPs (0: the whole minibatch in one pass). J and M are sums
    over rows normalised by the minibatch's token counts, so chunks give the same numbers with one chunk's activations
    in memory (with a large vocabulary, logits of rows × tokens × vocab, differentiated twice)."""
    jvp_batch: NonNegativeInt = 0
    """Directions per vectorised JVP (the Fisher's δ = ∇l·a of each geometry; 0: every geometry in one pass, the
    fastest). Each direction in a pass is a stacked copy of θ_S and of every activation's tangent: 1 holds one."""
    fisher_all_geometries: bool = False
    """Compute the Fisher curvature β_F (one forward-mode pass each) of every geometry; by default only of adam (sgd
    before Adam has state), the paper's fixed-P form, whose δ the fisher proxy and the model curve read."""
    geometries_per_pass: NonNegativeInt = 0
    """Geometries whose directions (s, a) are built and decomposed together (0: all four, sharing one gradient graph
    per row chunk). Each geometry holds two copies of θ_S: 1 builds one at a time, with one more gradient graph per
    geometry; the numbers are the same."""
    grid_cap: NonNegativeFloat = 0.0
    """0 (default): the grid of docs/theory.md section 5, out to curve_span × |λ*|. > 0: the grid stops where the MTP
    step reaches grid_cap × the RL step (‖λ·Pu‖ = cap·‖Pg‖), and spans exactly that without a finite λ*."""

    @model_validator(mode="after")
    def _curve_needs_points(self) -> ProbeFields:
        if 0 < self.curve_points < 3:
            raise FieldError("curve_points", "needs at least 3 points (or 0 for no curve)")
        return self


class ProbeSettings(ProbeFields):
    """What ``run_probe`` needs besides its tensors: the probe fields and the bootstrap seed."""

    seed: int = 0
    """Seed of the bootstrap resamples (each probe its own: the trainer derives it from the run seed and step)."""

    @classmethod
    def from_diag(cls, diag: ProbeFields, seed: int = 0) -> ProbeSettings:
        """The probe settings of a config's ``diag`` section, with the bootstrap ``seed``."""
        return cls(**{name: getattr(diag, name) for name in ProbeFields.model_fields}, seed=seed)

    @staticmethod
    def parse_overrides(overrides: list[str]) -> dict[str, Any]:
        """``diag.<field>=value`` strings (``occ probe --set``) as validated ``{field: value}``, read as
        ``--set`` reads them; a bad value or a key that is not a probe field is a ``ValueError`` naming it."""
        tree: dict[str, Any] = {}
        for item in overrides:
            key = item.split("=", 1)[0].strip()
            if key.removeprefix("diag.") not in ProbeFields.model_fields or not key.startswith("diag."):
                raise ValueError(f"--set {key}: only the probe settings can change offline: "
                                 + ", ".join(f"diag.{f}" for f in sorted(ProbeFields.model_fields)))
            apply_override(tree, item, ProbeFields, prefix="diag")
        valid = validate(ProbeFields, tree, prefix="diag")
        return {name: getattr(valid, name) for name in tree}
