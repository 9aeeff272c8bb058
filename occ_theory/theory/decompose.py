"""The per-step effect of an MTP loss on the RL objective (docs/theory.md section 2).

The update is modelled as ``θ⁺(λ) = θ + η·P·(g + λ·u)`` with ``g = ∇J`` [g_rl], ``u = ∇M``
[g_mtp] and a fixed diagonal preconditioner ``P`` [precond]. Then

    Δ(λ) = J(θ⁺(λ)) − J(θ⁺(0)) = η·λ·(C + η·X) + ½·η²·λ²·Q + O(η³)

with ``C = gᵀPu`` [corr], ``X = (Pg)ᵀH(Pu)`` [cross] and ``Q = (Pu)ᵀH(Pu)`` [curv]. ``decompose``
measures C, X, Q with one gradient of M and one gradient-and-HVP of J; ``measure_delta`` evaluates
Δ(λ) directly so the two can be compared. The same step in the general form ``θ + s + λ·a`` of
every optimizer geometry (``s = ηPg``, ``a = ηPu`` here) is ``step.decompose_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torch import Tensor

from .common import NAN, Reduce, check_lr, check_precond, fisher_curvature
from .hvp import GradGraph, ScalarFn, grad
from .params import Params, axpy, check_alike, check_params, dot, mul, sq_norm
from .step import StepDecomposition, decompose_steps, fixed_precond_directions

__all__ = ["REASON_NOT_CONCAVE", "REASON_U_ZERO", "Decomposition", "Reduce", "check_precond", "decompose",
           "decompose_geometries", "directions", "fisher_curvature", "measure_delta"]

REASON_U_ZERO = "u = 0: the MTP loss sends no gradient to the shared parameters, Δ ≡ 0"
REASON_NOT_CONCAVE = "Q >= 0: Δ(λ) is not concave, there is no finite optimum"


@dataclass(frozen=True)
class Decomposition:
    """C, X, Q at one step and everything derived from them. Undefined values are NaN + ``reason``."""

    lr: float
    corr: float  # C = gᵀPu
    cross: float  # X = (Pg)ᵀH(Pu)
    curv: float  # Q = (Pu)ᵀH(Pu)
    g_norm: float  # ‖g‖
    u_norm: float  # ‖u‖
    cosine: float  # gᵀu / (‖g‖‖u‖)
    pu_norm_sq: float  # ‖Pu‖²
    pg_norm: float = NAN  # ‖Pg‖, the size of the RL step per unit η
    curv_fisher: float = NAN  # Q_F = −Σ m·δ² / Σ m, δ = ∇l·Pu
    geometry: str = "sgd"  # the caller's label: "sgd" (P = I), "adam" (P = 1/(sqrt(v̂)+ε)), ...
    method: str = "fwd-rev"
    dlogp: Tensor | None = field(default=None, repr=False, compare=False)  # δ, (B, T)
    grad_rl: Params | None = field(default=None, repr=False, compare=False)  # g, for measuring the curve

    @property
    def u_zero(self) -> bool:
        return self.u_norm == 0.0

    @property
    def concave(self) -> bool:
        return not self.u_zero and self.curv < 0

    @property
    def reason(self) -> str:
        """Why ``lambda_star`` is undefined ('' when it is defined)."""
        if self.u_zero:
            return REASON_U_ZERO
        if not self.curv < 0:
            return REASON_NOT_CONCAVE
        return ""

    @property
    def slope(self) -> float:
        """C + η·X, the coefficient of η·λ in Δ(λ)."""
        return self.corr + self.lr * self.cross

    @property
    def lambda_star(self) -> float:
        """λ* = −(C + η·X) / (η·Q) when Q < 0."""
        return -self.slope / (self.lr * self.curv) if self.concave else NAN

    @property
    def lambda_star_first_order(self) -> float:
        """λ*₁ = −C / (η·Q), the optimum without the cross term."""
        return -self.corr / (self.lr * self.curv) if self.concave else NAN

    @property
    def gain_at_optimum(self) -> float:
        """Δ(λ*) = (C + η·X)² / (2·|Q|)."""
        return self.slope**2 / (2 * abs(self.curv)) if self.concave else NAN

    @property
    def proj(self) -> float:
        """κ = C / ‖Pu‖², the projection coefficient of the smoothness model."""
        return self.corr / self.pu_norm_sq if self.pu_norm_sq > 0 else NAN

    @property
    def lambda_bal(self) -> float:
        """λ_bal = ‖Pg‖ / ‖Pu‖ = ‖s‖/‖a‖: the λ at which the MTP step is as long as the RL step."""
        return self.pg_norm / math.sqrt(self.pu_norm_sq) if self.pu_norm_sq > 0 else NAN

    @property
    def lambda_star_fisher(self) -> float:
        """λ*_F = −C / (η·Q_F): the optimum when the penalty is the Fisher (trust-region) one."""
        if self.u_zero or not self.curv_fisher < 0:
            return NAN
        return -self.corr / (self.lr * self.curv_fisher)

    def predicted_delta(self, lams: Sequence[float] | np.ndarray) -> np.ndarray:
        """Δ_model(λ) = η·λ·(C + η·X) + ½·η²·λ²·Q."""
        lam = np.asarray(lams, dtype=np.float64)
        return self.lr * lam * self.slope + 0.5 * self.lr**2 * lam**2 * self.curv

    def as_dict(self) -> dict[str, float | bool | str]:
        """Flat record of every field and derived quantity (no tensors), for logs and tables."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("dlogp", "grad_rl")}
        for name in ("concave", "reason", "lambda_star", "lambda_star_first_order", "gain_at_optimum",
                     "proj", "lambda_star_fisher", "lambda_bal"):
            out[name] = getattr(self, name)
        return out

    @classmethod
    def from_step(cls, step: StepDecomposition, lr: float, g: Mapping[str, Tensor], u: Mapping[str, Tensor]
                  ) -> Decomposition:
        """C, X, Q of a fixed-P geometry (s = ηPg, a = ηPu) from its step form (``step.decompose_steps``): C = gᵀa/η,
        X = (α_m − gᵀa)/η², Q = β_m/η², Q_F = β_F/η², δ = ∇l·Pu = (∇l·a)/η. The one home of C, X, Q: the user API
        (``decompose``) and the probe both read them off the step form."""
        g_norm, u_norm = float(sq_norm(g)) ** 0.5, float(sq_norm(u)) ** 0.5
        gu = float(dot(g, u))
        return cls(
            lr=lr, corr=step.alpha_first_order / lr, cross=(step.alpha_model - step.alpha_first_order) / lr**2,
            curv=step.beta_model / lr**2, g_norm=g_norm, u_norm=u_norm,
            cosine=gu / (g_norm * u_norm) if g_norm > 0 and u_norm > 0 else NAN, pu_norm_sq=(step.a_norm / lr) ** 2,
            pg_norm=step.s_norm / lr, curv_fisher=step.beta_fisher / lr**2, geometry=step.geometry,
            method=step.method, dlogp=None if step.dlogp is None else step.dlogp / lr, grad_rl=step.grad_rl)


def directions(rl_objective: ScalarFn, mtp_objective: ScalarFn, params: Mapping[str, Tensor]) -> tuple[Params, Params]:
    """``(g, u) = (∇J, ∇M)`` on ``params``."""
    return grad(rl_objective, params)[1], grad(mtp_objective, params)[1]


def decompose(
    rl_objective: ScalarFn,
    mtp_objective: ScalarFn,
    params: Mapping[str, Tensor],
    lr: float,
    precond: Mapping[str, Tensor] | None = None,
    method: str = "fwd-rev",
    logp_fn: Callable[[Params], Tensor] | None = None,
    mask: Tensor | None = None,
    mtp_grad: Mapping[str, Tensor] | None = None,
    reduce: Reduce | None = None,
) -> Decomposition:
    """Measure C, X, Q (and Q_F when ``logp_fn`` and ``mask`` are given) at ``params``.

    ``rl_objective`` is J and ``mtp_objective`` is M, both to maximise, both functions of the
    shared parameters only. ``precond`` is a dict of diagonal preconditioner entries alike
    ``params`` (``None``: SGD geometry, P = I). ``mtp_grad`` may pass a precomputed (reduced) ``u``.
    ``reduce`` sums gradients, HVPs and Fisher sums over processes (data parallelism), so every
    quantity is the one of the global batch. Cost: one gradient of M, one gradient-and-HVP of J,
    and one JVP of ``logp_fn``. The result's ``geometry`` is ``"sgd"`` without ``precond``, else ``"adam"``.
    """
    name = "sgd" if precond is None else "adam"
    return decompose_geometries(rl_objective, mtp_objective, params, lr, {name: precond}, method, logp_fn,
                                mask, mtp_grad, reduce)[name]


def decompose_geometries(
    rl_objective: ScalarFn,
    mtp_objective: ScalarFn,
    params: Mapping[str, Tensor],
    lr: float,
    preconds: Mapping[str, Mapping[str, Tensor] | None],
    method: str = "fwd-rev",
    logp_fn: Callable[[Params], Tensor] | None = None,
    mask: Tensor | None = None,
    mtp_grad: Mapping[str, Tensor] | None = None,
    reduce: Reduce | None = None,
    batched: bool = False,
) -> dict[str, Decomposition]:
    """``decompose`` in several geometries at once (e.g. ``{"sgd": None, "adam": P}``), sharing u, g and
    the gradient graph of J across the HVPs (``batched``: one vectorised call, see ``grad_and_hvps``);
    the Fisher JVPs are one vectorised ``jvps`` call. Each result carries its key as ``geometry`` and g in
    ``grad_rl``. Computed as the step form θ + ηPg + λ·ηPu (``step.decompose_steps``) read back as C, X, Q
    (``Decomposition.from_step``)."""
    red = reduce or (lambda d: d)
    check_params(params)
    lr = check_lr(lr)
    for p in preconds.values():
        check_precond(params, p)
    if (logp_fn is None) != (mask is None):
        raise ValueError("pass logp_fn and mask together (the Fisher curvature needs both)")
    u = dict(mtp_grad) if mtp_grad is not None else red(grad(mtp_objective, params)[1])
    check_alike(params, u, "mtp_grad")
    # s = ηPg needs g before the HVPs: rev-rev keeps g's graph for them (one forward, one backward), the other
    # methods take g from a pass of its own
    graph = GradGraph.of(rl_objective, params) if method == "rev-rev" and not batched else None
    g = red(graph.grad if graph is not None else grad(rl_objective, params)[1])
    steps = {name: fixed_precond_directions(g, u, lr, p) for name, p in preconds.items()}
    decs = decompose_steps(rl_objective, params, steps, method, reduce, logp_fn, mask, batched, grad_rl=g,
                           graph=graph)
    return {name: Decomposition.from_step(decs[name], lr, g, u) for name in preconds}


def measure_delta(
    rl_objective: ScalarFn,
    mtp_objective: ScalarFn,
    params: Mapping[str, Tensor],
    lr: float,
    lams: Sequence[float] | np.ndarray,
    precond: Mapping[str, Tensor] | None = None,
    eval_objective: Callable[[Params], Tensor] | None = None,
    grads: tuple[Mapping[str, Tensor], Mapping[str, Tensor]] | None = None,
    reduce: Reduce | None = None,
) -> np.ndarray:
    """Measured Δ(λ) = J(θ + ηP(g + λu)) − J(θ + ηPg) for each λ in ``lams``.

    ``eval_objective`` evaluates something else at the updated points: J on a held-out batch, or
    per-sequence terms of J (any tensor shape; the result is then (len(lams), *shape)).
    ``grads=(g, u)`` skips recomputing the directions (pass reduced ones in data parallelism).
    ``reduce`` combines each evaluation over processes (``{"value": tensor}`` in and out): a sum for
    J, a gather for per-sequence terms.
    """
    check_params(params)
    lr = check_lr(lr)
    check_precond(params, precond)
    red = reduce or (lambda d: d)
    if grads is not None:
        g, u = grads
    else:
        g, u = (red(d) for d in directions(rl_objective, mtp_objective, params))
    check_alike(params, g, "g")
    check_alike(params, u, "u")
    evaluate = eval_objective or rl_objective
    base = axpy(lr, mul(g, precond), {k: t.detach() for k, t in params.items()})
    step = mul(u, precond)
    def value(p: Params) -> np.ndarray:
        return red({"value": evaluate(p).detach()})["value"].to(torch.float64).cpu().numpy()

    with torch.no_grad():
        j0 = value(base)
        out = [value(axpy(lr * float(lam), step, base)) - j0 for lam in lams]
    return np.stack(out) if out else np.zeros((0, *j0.shape))
