"""Pure math over parameter dicts: HVPs, the decomposition, the measured curve, the proxies.

Knows nothing of models or trainers; point it at any PyTorch model through closures over
``torch.func.functional_call``. See THEORY.md for every symbol.
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
from .fit import QuadFit, bootstrap_quadratic, effective_smoothness, fit_quadratic, lambda_grid
from .hvp import HVP_METHODS, eager_attention, grad, grad_and_hvp, grad_and_hvps, hessian, hvp, jvp

__all__ = [
    "HVP_METHODS",
    "Decomposition",
    "QuadFit",
    "bootstrap_quadratic",
    "decompose",
    "decompose_geometries",
    "directions",
    "eager_attention",
    "effective_smoothness",
    "fisher_curvature",
    "fit_quadratic",
    "grad",
    "grad_and_hvp",
    "grad_and_hvps",
    "hessian",
    "hvp",
    "jvp",
    "lambda_grid",
    "measure_delta",
    "proxies",
]
