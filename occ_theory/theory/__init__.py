"""Pure math over parameter dicts: HVPs, the decomposition, the optimizer's real step, the measured
curve, the proxies.

Knows nothing of models or trainers; point it at any PyTorch model through closures over
``torch.func.functional_call``. See docs/theory.md for every symbol.
"""

from . import proxies
from .decompose import (
    Decomposition,
    decompose,
    decompose_geometries,
    directions,
    fisher_curvature,
    measure_delta,
)
from .fit import (
    Optimum,
    QuadFit,
    bootstrap_quadratic,
    effective_smoothness,
    fit_quadratic,
    lambda_grid,
    locate_maximum,
    optimum_grid,
)
from .hvp import (
    HVP_METHODS,
    check_dropout,
    eager_attention,
    grad,
    grad_and_hvp,
    grad_and_hvps,
    hessian,
    hvp,
    jvp,
    jvps,
)
from .step import (
    CLIP_SCOPES,
    RealStep,
    RealStepTaylor,
    StepDecomposition,
    adamw_real_step,
    adamw_step_directions,
    clip_active,
    clip_interval,
    curve_taylor,
    decompose_step,
    decompose_steps,
    fixed_precond_directions,
    real_step_taylor,
)

__all__ = [
    "CLIP_SCOPES",
    "HVP_METHODS",
    "Decomposition",
    "Optimum",
    "QuadFit",
    "RealStep",
    "RealStepTaylor",
    "StepDecomposition",
    "adamw_real_step",
    "adamw_step_directions",
    "bootstrap_quadratic",
    "check_dropout",
    "clip_active",
    "clip_interval",
    "curve_taylor",
    "decompose",
    "decompose_geometries",
    "decompose_step",
    "decompose_steps",
    "directions",
    "eager_attention",
    "effective_smoothness",
    "fisher_curvature",
    "fit_quadratic",
    "fixed_precond_directions",
    "grad",
    "grad_and_hvp",
    "grad_and_hvps",
    "hessian",
    "hvp",
    "jvp",
    "jvps",
    "lambda_grid",
    "locate_maximum",
    "measure_delta",
    "optimum_grid",
    "proxies",
    "real_step_taylor",
]
