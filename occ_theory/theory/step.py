"""The optimizer's real step (docs/theory.md section 2): every geometry in one form.

A step is written ``θ⁺(λ) = θ + s + λ·a``: ``s`` [the λ-free part] and ``a`` [its λ-direction]. Then

    Δ(λ) = J(θ + s + λ·a) − J(θ + s) = λ·α_m + ½·λ²·β_m + O(‖a‖³)
    α_m = (g + H s)ᵀ a,   β_m = aᵀ H a,   λ*_m = −α_m / β_m  (when β_m < 0)

with ``g = ∇J`` and ``H = ∇²J`` at θ. The named geometries [geometry] and their (s, a):

* ``sgd``: ``s = η·g``, ``a = η·u``                      (``fixed_precond_directions(g, u, lr)``)
* ``adam``: ``s = η·P·g``, ``a = η·P·u``, ``P = 1/(sqrt(v̂)+ε)`` held fixed (same function, ``precond=P``)
* ``adam_stationary``: ``s = η·P·m_g``, ``a = η·P·m_u``   (same function with the momentum buffers)
* ``adam_step``: the next ``torch.optim.AdamW`` step, linearised in λ with ``v̂`` frozen
  (``adamw_step_directions``).

``decompose_steps`` measures α_m and β_m of several geometries from one gradient of J and one
batched HVP (by the symmetry of H, ``α_m = gᵀa + sᵀ(H a)``: one HVP per geometry, none for ``s``).
``clip_interval`` is the λ range [lambda_clip] in which the gradient clip leaves the step alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .common import Reduce, check_lr, check_precond, fisher_curvature
from .hvp import GradGraph, ScalarFn, grad, grad_and_hvps, jvps
from .params import Params, check_alike, check_params, dot, is_zero, mul, sq_norm

NAN = float("nan")
REASON_A_ZERO = "a = 0: the step has no λ-direction (u = 0 on the shared parameters), Δ ≡ 0"
REASON_NOT_CONCAVE = "β_m >= 0: Δ(λ) is not concave along a, there is no finite optimum"
Directions = tuple[Mapping[str, Tensor], Mapping[str, Tensor]]


@dataclass(frozen=True)
class StepDecomposition:
    """α_m, β_m of one step ``θ + s + λ·a`` and what follows from them. Undefined values are NaN + ``reason``."""

    geometry: str  # "sgd" | "adam" | "adam_step" | "adam_stationary" (the caller's label)
    alpha_model: float  # α_m = (g + H s)ᵀa
    beta_model: float  # β_m = aᵀHa
    alpha_first_order: float  # gᵀa: α_m without the curvature along s
    s_norm: float  # ‖s‖
    a_norm: float  # ‖a‖
    beta_fisher: float = NAN  # β_F = −Σ m·δ² / Σ m, δ = ∇l·a (the Fisher model of β_m)
    method: str = "rev-rev"
    dlogp: Tensor | None = field(default=None, repr=False, compare=False)  # δ = ∇l·a, (B, T)
    grad_rl: Params | None = field(default=None, repr=False, compare=False)  # g, for measuring the curve

    @property
    def a_zero(self) -> bool:
        return self.a_norm == 0.0

    @property
    def concave(self) -> bool:
        return not self.a_zero and self.beta_model < 0

    @property
    def reason(self) -> str:
        """Why ``lambda_star`` is undefined ('' when it is defined)."""
        if self.a_zero:
            return REASON_A_ZERO
        return "" if self.beta_model < 0 else REASON_NOT_CONCAVE

    @property
    def lambda_star(self) -> float:
        """λ*_m = −α_m / β_m when β_m < 0."""
        return -self.alpha_model / self.beta_model if self.concave else NAN

    @property
    def lambda_star_first_order(self) -> float:
        """−gᵀa / β_m: the optimum without the curvature along s."""
        return -self.alpha_first_order / self.beta_model if self.concave else NAN

    @property
    def lambda_star_fisher(self) -> float:
        """−gᵀa / β_F: the optimum when the penalty is the Fisher (trust-region) one."""
        if self.a_zero or not self.beta_fisher < 0:
            return NAN
        return -self.alpha_first_order / self.beta_fisher

    @property
    def lambda_bal(self) -> float:
        """λ_bal = ‖s‖ / ‖a‖: the λ at which the MTP part of the step is as large as the rest of it."""
        return self.s_norm / self.a_norm if self.a_norm > 0 else NAN

    def predicted_delta(self, lams: Sequence[float] | np.ndarray) -> np.ndarray:
        """Δ_m(λ) = λ·α_m + ½·λ²·β_m."""
        lam = np.asarray(lams, dtype=np.float64)
        return lam * self.alpha_model + 0.5 * lam**2 * self.beta_model

    def as_dict(self) -> dict[str, float | bool | str]:
        """Flat record of every field and derived quantity (no tensors), for logs and tables."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("dlogp", "grad_rl")}
        for name in ("concave", "reason", "lambda_star", "lambda_star_first_order", "lambda_star_fisher",
                     "lambda_bal"):
            out[name] = getattr(self, name)
        return out


def fixed_precond_directions(g: Mapping[str, Tensor], u: Mapping[str, Tensor], lr: float,
                             precond: Mapping[str, Tensor] | None = None) -> tuple[Params, Params]:
    """``(s, a) = (η·P·g, η·P·u)``: ``sgd`` (``precond=None``, P = I), ``adam`` (P = 1/(sqrt(v̂)+ε)) and,
    given the momentum buffers ``m_g``, ``m_u`` in place of ``g``, ``u``, ``adam_stationary``."""
    lr = check_lr(lr)
    check_alike(g, u, "u")
    check_precond(g, precond)
    return {k: lr * t for k, t in mul(g, precond).items()}, {k: lr * t for k, t in mul(u, precond).items()}


def _adamw_args(params, g, u, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    """Validated ``(lr, (β₁, β₂), m, v, t)`` of an AdamW step: the buffers (zeros before the first step) and
    ``t = step + 1``, the step count torch's bias corrections use."""
    check_params(params)
    check_alike(params, g, "g")
    check_alike(params, u, "u")
    lr = check_lr(lr)
    beta1, beta2 = (float(b) for b in betas)
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"betas must lie in [0, 1), got {tuple(betas)}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and non-negative, got {eps}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be finite and non-negative, got {weight_decay}")
    step_f = float(step)
    if not (step_f >= 0 and step_f == int(step_f)):
        raise ValueError(f"step must be a non-negative integer (AdamW's state['step']), got {step}")
    if step_f > 0 and (exp_avg is None or exp_avg_sq is None):
        raise ValueError(f"step = {int(step_f)} > 0 needs the exp_avg and exp_avg_sq buffers")
    zeros = {k: torch.zeros_like(t) for k, t in params.items()}
    m = zeros if exp_avg is None else exp_avg
    v = zeros if exp_avg_sq is None else exp_avg_sq
    check_alike(params, m, "exp_avg")
    check_alike(params, v, "exp_avg_sq")
    return lr, (beta1, beta2), m, v, step_f + 1


def adamw_step_directions(
    params: Mapping[str, Tensor],
    g: Mapping[str, Tensor],
    u: Mapping[str, Tensor],
    exp_avg: Mapping[str, Tensor] | None,
    exp_avg_sq: Mapping[str, Tensor] | None,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> tuple[Params, Params]:
    """``(s, a)`` of the ``adam_step`` geometry: the next ``torch.optim.AdamW`` step on the loss
    ``L = −J − λ·M`` (loss gradient ``−(g + λu)``), linearised in λ with ``v̂`` frozen at λ = 0.

    ``exp_avg`` (m) and ``exp_avg_sq`` (v) are AdamW's buffers, which hold *loss* gradients, and
    ``step`` the number of steps already taken (``state["step"]``; 0, with buffers ``None``, before
    the first). With ``t = step + 1``, ``v' = β₂·v + (1−β₂)·g²`` and, as torch computes it,
    ``P = 1 / (sqrt(v')/sqrt(1−β₂ᵗ) + ε)``:

        s = −η·wd·θ − η·P·(β₁·m − (1−β₁)·g) / (1−β₁ᵗ),    a = η·c₁·P·u,   c₁ = (1−β₁)/(1−β₁ᵗ)

    so ``θ + s`` is exactly AdamW's step at λ = 0 and ``θ + s + λ·a`` is exactly AdamW's step with
    ``v'`` held at its λ = 0 value, for every λ. The real step differs through
    ``v'(λ) = β₂·v + (1−β₂)·(g + λu)²``, and already at first order: ``∂θ⁺/∂λ = a + d_v`` with, per
    coordinate, ``d_v / a = (1−β₂)/(1−β₁) · m'·g / v'`` (``m' = β₁·m − (1−β₁)·g``, ε neglected): about
    1% late in training with betas (0.9, 0.999), but exactly −1 at t = 1, where AdamW's step is
    ``η·sign(g + λu)`` and does not move with λ. The measured real-step curve carries this effect
    (``tests/test_step_geometry.py`` checks both statements against torch). The gradient clip is not
    modelled either: it leaves the step alone for λ inside ``clip_interval``. ``amsgrad`` and
    ``maximize`` are not supported.
    """
    lr, (beta1, beta2), m, v, t = _adamw_args(params, g, u, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay)
    bc1, bc2_sqrt = 1 - beta1**t, math.sqrt(1 - beta2**t)
    s, a = {}, {}
    for k, theta in params.items():
        gk, uk = g[k].to(theta.dtype), u[k].to(theta.dtype)
        v_new = beta2 * v[k].to(theta.dtype) + (1 - beta2) * gk * gk  # the λ = 0 gradient, frozen
        p = 1.0 / (v_new.sqrt() / bc2_sqrt + eps)
        s[k] = -lr * weight_decay * theta.detach() - (lr / bc1) * p * (beta1 * m[k].to(theta.dtype) - (1 - beta1) * gk)
        a[k] = (lr * (1 - beta1) / bc1) * p * uk
    return s, a


def adamw_state_buffers(params: Mapping[str, Tensor], state: Mapping[str, Mapping[str, Any]]
                        ) -> tuple[Params | None, Params | None, int]:
    """``(exp_avg, exp_avg_sq, step)`` for ``adamw_step_directions`` from Adam state keyed like ``params``
    (``optimizer.state`` by name); ``(None, None, 0)`` before the first step, when any parameter has none."""
    if not state or not all("exp_avg" in state.get(k, {}) for k in params):
        return None, None, 0
    return ({k: state[k]["exp_avg"] for k in params}, {k: state[k]["exp_avg_sq"] for k in params},
            int(state[next(iter(params))]["step"]))


def decompose_steps(
    rl_objective: ScalarFn | Sequence[ScalarFn],
    params: Mapping[str, Tensor],
    steps: Mapping[str, Directions],
    method: str = "rev-rev",
    reduce: Reduce | None = None,
    logp_fn: Callable[[Params], Tensor] | Sequence[Callable[[Params], Tensor]] | None = None,
    mask: Tensor | None = None,
    batched: bool = False,
    jvp_batch: int = 0,
    grad_rl: Mapping[str, Tensor] | None = None,
    graph: GradGraph | None = None,
    fisher: Sequence[str] | None = None,
) -> dict[str, StepDecomposition]:
    """α_m, β_m (and β_F when ``logp_fn`` and ``mask`` are given) of each geometry ``name: (s, a)``.

    One gradient graph of J gives ``g`` and ``H·a`` for every geometry (``batched``: in one
    vectorised call, see ``grad_and_hvps``); ``α_m = gᵀa + sᵀ(H a)`` by the symmetry of H, and each
    HVP is reduced to ``sᵀ(H a)`` and ``aᵀ(H a)`` as soon as it exists. The Fisher products
    ``δ = ∇l·a`` of all geometries are vectorised ``jvps`` calls (at most ``jvp_batch`` tangents per
    pass when > 0). ``reduce`` sums g, those dot products and the Fisher sums over processes (data
    parallelism); ``s`` and ``a`` must already be the global ones. Each result keeps g in ``grad_rl``.

    ``rl_objective`` and ``logp_fn`` may be sequences of equal length, the terms of row chunks of one
    batch: J is the sum of the objective terms (each normalised by the whole batch's token count) and
    the log-probs are the terms' rows concatenated in order. Each term gets its own gradient graph, so
    the peak activation memory is one chunk's; the numbers are those of one call on the whole batch.
    ``grad_rl``: g = ∇J (reduced) when the caller has it already; the graph's own copy is then dropped.
    ``graph``: a kept gradient graph of J at ``params`` (``GradGraph``, one term), whose HVPs serve instead of a new
    forward and backward pass. ``fisher``: the geometries whose β_F is computed (default: every one).
    """
    check_params(params)
    if (logp_fn is None) != (mask is None):
        raise ValueError("pass logp_fn and mask together (the Fisher curvature needs both)")
    terms = [rl_objective] if callable(rl_objective) else list(rl_objective)
    logp_terms = None if logp_fn is None else [logp_fn] if callable(logp_fn) else list(logp_fn)
    if not terms or (logp_terms is not None and len(logp_terms) != len(terms)):
        raise ValueError(f"rl_objective and logp_fn must give the same, non-zero number of row-chunk terms, got "
                         f"{len(terms)} and {len(logp_terms) if logp_terms is not None else 'none'}")
    for name, (s, a) in steps.items():
        check_alike(params, s, f"s[{name!r}]")
        check_alike(params, a, f"a[{name!r}]")
    if grad_rl is not None:
        check_alike(params, grad_rl, "grad_rl")
    red = reduce or (lambda d: d)
    active = [name for name, (_, a) in steps.items() if not is_zero(a)]
    vs = [steps[n][1] for n in active]

    def curvature(i: int, hv: Params) -> Tensor:  # (sᵀHa, aᵀHa) of direction i; the HVP itself is dropped
        s, a = steps[active[i]]
        return torch.stack([dot(s, hv), dot(a, hv)])

    g: Params | None = None  # Σ of the terms' gradients, the graphs' by-product (unless the caller gave g)
    curv = None  # (K, 2): sᵀHa, aᵀHa per active geometry, summed over terms
    if graph is not None:
        if len(terms) != 1:
            raise ValueError("a kept gradient graph serves one term of J, not row chunks")
        g = dict(graph.grad)
        if active:
            curv = torch.stack([curvature(i, graph.hvp(v)) for i, v in enumerate(vs)])
        terms = []
    for term in terms:
        g_c = None
        if active:
            g_c, dots = grad_and_hvps(term, params, vs, method, batched=batched, project=curvature)
            c = torch.stack(dots)
            curv = c if curv is None else curv + c
        elif grad_rl is None:
            g_c = grad(term, params)[1]
        if grad_rl is None:
            # out of place: autograd may return one tensor (or a broadcast view) for several inputs
            g = g_c if g is None else {k: t + g_c[k] for k, t in g.items()}
        del g_c
    g = red(g) if grad_rl is None else dict(grad_rl)
    if active:
        curv = red({"curv": curv})["curv"]
    dlogps = dict.fromkeys(active)
    fisher_active = [n for n in active if fisher is None or n in fisher]
    if logp_terms is not None and fisher_active:
        fvs = [steps[n][1] for n in fisher_active]
        parts = [jvps(fn, params, fvs, max_batch=jvp_batch)[1] for fn in logp_terms]
        dlogps |= {n: torch.cat([p[i] for p in parts]) for i, n in enumerate(fisher_active)}  # (B, T): rows in order
    out = {}
    for name, (s, a) in steps.items():
        alpha = alpha1 = beta = 0.0
        beta_f, dlogp = NAN, None
        if name in dlogps:
            i = active.index(name)
            alpha1 = float(dot(g, a))
            alpha = alpha1 + float(curv[i, 0])
            beta = float(curv[i, 1])
            dlogp = dlogps[name]
            if dlogp is not None:
                beta_f = fisher_curvature(dlogp, mask, reduce)
        out[name] = StepDecomposition(
            geometry=name, alpha_model=alpha, beta_model=beta, alpha_first_order=alpha1,
            s_norm=float(sq_norm(s)) ** 0.5, a_norm=float(sq_norm(a)) ** 0.5, beta_fisher=beta_f, method=method,
            dlogp=dlogp, grad_rl=g,
        )
    return out


def decompose_step(
    rl_objective: ScalarFn,
    params: Mapping[str, Tensor],
    s: Mapping[str, Tensor],
    a: Mapping[str, Tensor],
    method: str = "rev-rev",
    reduce: Reduce | None = None,
    geometry: str = "",
) -> StepDecomposition:
    """α_m = (g + H s)ᵀa and β_m = aᵀHa of the step ``θ + s + λ·a`` (one gradient-and-HVP of J).
    Several geometries at once share the gradient graph: ``decompose_steps``."""
    return decompose_steps(rl_objective, params, {geometry: (s, a)}, method, reduce)[geometry]


def clip_interval(g_all: Mapping[str, Tensor], u_all: Mapping[str, Tensor], max_norm: float) -> tuple[float, float]:
    """``(lo, hi)`` [lambda_clip]: the λ for which ``‖g_all + λ·u_all‖ ≤ max_norm``, i.e. the gradient
    clip (``torch.nn.utils.clip_grad_norm_``) leaves the step alone. The loss gradient is
    ``−(g + λu)``; the norm is the same.

    ``g_all`` and ``u_all`` span every trainable parameter (θ_S and θ_M); a key present in only one
    of them counts as zero in the other. The condition is the quadratic
    ``‖u‖²λ² + 2·gᵀu·λ + ‖g‖² − max_norm² ≤ 0``. Returns ``(-inf, inf)`` when there is no clip
    (``max_norm <= 0`` or infinite) or when ``u_all = 0`` and ``‖g_all‖ ≤ max_norm``, and
    ``(nan, nan)`` when the clip is active for every λ (use ``clip_active`` to mark grid points).
    torch rescales by ``max_norm / (‖·‖ + 1e-6)`` and so already, by less than 1e-6 relative, a hair
    inside ``hi`` and ``lo``.
    """
    g, u = _union(g_all, "g_all", u_all), _union(u_all, "u_all", g_all)
    return clip_interval_of_norms(float(sq_norm(g)), float(dot(g, u)), float(sq_norm(u)), max_norm)


def clip_interval_of_norms(gg: float, gu: float, uu: float, max_norm: float) -> tuple[float, float]:
    """``clip_interval`` from ``‖g‖²``, ``gᵀu`` and ``‖u‖²`` over the parameters the clip sees."""
    max_norm = float(max_norm)
    if math.isnan(max_norm):
        raise ValueError("max_norm (the grad_clip setting) must not be NaN")
    if max_norm <= 0 or math.isinf(max_norm):
        return -math.inf, math.inf
    c = gg - max_norm**2
    if uu == 0.0:
        return (-math.inf, math.inf) if c <= 0 else (NAN, NAN)
    disc = gu * gu - uu * c
    if disc < 0:
        return NAN, NAN
    q = -(gu + math.copysign(math.sqrt(disc), gu))  # the roots q/uu and c/q, without cancellation
    r1 = q / uu
    r2 = c / q if q != 0 else -r1
    return min(r1, r2), max(r1, r2)


def _union(x: Mapping[str, Tensor], what: str, other: Mapping[str, Tensor]) -> Params:
    """``x`` over the keys of both dicts, zeros where only ``other`` has a key."""
    keys = list(dict.fromkeys([*x, *other]))
    if not keys:
        raise ValueError("g_all and u_all are both empty")
    for k in keys:
        if k in x and k in other and x[k].shape != other[k].shape:
            raise ValueError(f"{what}[{k!r}] has shape {tuple(x[k].shape)}, the other has {tuple(other[k].shape)}")
    return {k: x[k] if k in x else torch.zeros_like(other[k]) for k in keys}


def clip_active(lams: Sequence[float] | np.ndarray, interval: tuple[float, float]) -> np.ndarray:
    """For each λ, whether the gradient clip rescales the step (λ outside ``clip_interval``'s result;
    every λ when the interval is empty, ``(nan, nan)``)."""
    lam = np.asarray(lams, dtype=np.float64)
    lo, hi = interval
    if math.isnan(lo) or math.isnan(hi):
        return np.ones(lam.shape, dtype=bool)
    return (lam < lo) | (lam > hi)


# ---------------------------------------------------------------- the real step as a function of λ (adam_real)

CLIP_SCOPES = ("global", "shared", "separate")
"""What the gradient clip sees [clip_scope]: ``global``, one norm over θ_S and θ_M (``clip_grad_norm_`` over every
trainable parameter); ``shared``, θ_S alone (θ_M unclipped); ``separate``, θ_S and θ_M each by its own norm. On θ_S,
``shared`` and ``separate`` are the same step: θ_M's gradient no longer enters θ_S's clip factor."""
CLIP_EPS = 1e-6
"""``torch.nn.utils.clip_grad_norm_`` rescales by ``max_norm / (total_norm + 1e-6)``."""


def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` whose derivatives (of every order) are 0 where ``x = 0``: a coordinate with no gradient and no
    second moment at λ = 0, whose sqrt could only move at second order through a kink (|λ|) no Taylor series sees."""
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


class RealStep:
    """θ⁺(λ) on θ_S: the next ``torch.optim.AdamW`` step on the clipped loss gradient (docs/theory.md section 2,
    "The real step as a function of λ").

    With the loss ``L = −J − λ·M`` the gradient on θ_S is ``−(g + λu)`` and on θ_M ``−λ·∇_{θ_M}M``
    (``mtp_grad_sq`` = ‖∇_{θ_M}M‖²). The clip factor is ``clip_grad_norm_``'s,
    ``f(λ) = min(1, grad_clip / (N(λ) + 1e-6))`` with ``N² = ‖g + λu‖² + λ²·mtp_grad_sq`` for ``clip_scope="global"``
    and ``N = ‖g + λu‖`` otherwise; ``grad_clip <= 0`` means no clip. Then, per coordinate, with ``G = −f·(g + λu)``,
    ``t = step + 1``:

        m' = β₁m + (1−β₁)G,   v' = β₂v + (1−β₂)G²,   θ⁺ = θ(1 − η·wd) − η/(1−β₁ᵗ) · m' / (sqrt(v')/sqrt(1−β₂ᵗ) + ε)

    ``at(λ)`` is differentiable in a 0-d tensor λ (reverse or forward mode); ``derivatives`` gives θ⁺(0), θ⁺'(0)
    and θ⁺''(0) by the chain rule through each coordinate (checked against torch's nested forward mode). The
    scalars ‖g‖², gᵀu, ‖u‖² are computed once, so evaluating many λ costs one pass over θ each."""

    def __init__(self, params: Mapping[str, Tensor], g: Mapping[str, Tensor], u: Mapping[str, Tensor],
                 exp_avg: Mapping[str, Tensor] | None, exp_avg_sq: Mapping[str, Tensor] | None, step: int, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float, grad_clip: float,
                 mtp_grad_sq: float = 0.0, clip_scope: str = "global"):
        self.lr, (self.beta1, self.beta2), m, v, t = _adamw_args(params, g, u, exp_avg, exp_avg_sq, step, lr, betas,
                                                                 eps, weight_decay)
        if clip_scope not in CLIP_SCOPES:
            raise ValueError(f"clip_scope must be one of {CLIP_SCOPES}, got {clip_scope!r}")
        grad_clip, mtp_grad_sq = float(grad_clip), float(mtp_grad_sq)
        if math.isnan(grad_clip):
            raise ValueError("grad_clip must not be NaN (0 or less: no clip)")
        if not (math.isfinite(mtp_grad_sq) and mtp_grad_sq >= 0):
            raise ValueError(f"mtp_grad_sq (‖∇_θ_M M‖²) must be finite and non-negative, got {mtp_grad_sq}")
        self.params = {k: p.detach() for k, p in params.items()}
        self.g = {k: g[k].detach().to(p.dtype) for k, p in self.params.items()}
        self.u = {k: u[k].detach().to(p.dtype) for k, p in self.params.items()}
        self.m = {k: m[k].detach().to(p.dtype) for k, p in self.params.items()}
        self.v = {k: v[k].detach().to(p.dtype) for k, p in self.params.items()}
        self.eps, self.weight_decay, self.clip_scope = float(eps), float(weight_decay), clip_scope
        self.bc1, self.bc2_sqrt = 1 - self.beta1**t, math.sqrt(1 - self.beta2**t)
        self.grad_clip = grad_clip if 0 < grad_clip < math.inf else 0.0
        self.gg, self.gu, self.uu = float(sq_norm(self.g)), float(dot(self.g, self.u)), float(sq_norm(self.u))
        self.mtp_grad_sq = mtp_grad_sq if clip_scope == "global" else 0.0

    @property
    def lambda_clip(self) -> tuple[float, float]:
        """[lambda_clip]: the λ for which the clip leaves the step alone (``clip_interval``)."""
        return clip_interval_of_norms(self.gg, self.gu, self.uu + self.mtp_grad_sq, self.grad_clip)

    def clip_factor(self, lam: float | Tensor) -> Tensor:
        """f(λ) as a float64 0-d tensor (differentiable in a tensor λ)."""
        lam = _as_lambda(lam)
        if not self.grad_clip:
            return torch.ones((), dtype=torch.float64)
        norm_sq = self.gg + 2 * lam * self.gu + lam * lam * (self.uu + self.mtp_grad_sq)
        return torch.clamp(self.grad_clip / (_safe_sqrt(norm_sq) + CLIP_EPS), max=1.0)

    def at(self, lam: float | Tensor) -> Params:
        """θ⁺(λ) on θ_S."""
        lam = _as_lambda(lam)
        f = self.clip_factor(lam)
        out = {}
        for k, theta in self.params.items():
            dt = theta.dtype
            grad = -f.to(dt) * (self.g[k] + lam.to(dt) * self.u[k])
            m = self.beta1 * self.m[k] + (1 - self.beta1) * grad
            v = self.beta2 * self.v[k] + (1 - self.beta2) * grad * grad
            out[k] = theta * (1 - self.lr * self.weight_decay) - (self.lr / self.bc1) * m / (
                _safe_sqrt(v) / self.bc2_sqrt + self.eps)
        return out

    def clip_derivatives(self) -> tuple[float, float, float]:
        """``(f(0), f'(0), f''(0))`` of the clip factor (the derivatives are 0 where the clip does not act)."""
        f0 = float(self.clip_factor(0.0))
        if f0 >= 1.0:
            return f0, 0.0, 0.0
        uu = self.uu + self.mtp_grad_sq
        n = math.sqrt(self.gg)  # N(0); q = N² = gg + 2λ·gu + λ²·uu
        n1 = self.gu / n  # N' = q'/(2N), q'(0) = 2·gu
        n2 = uu / n - self.gu**2 / n**3  # N'' = q''/(2N) − q'²/(4N³), q'' = 2·uu
        den = n + CLIP_EPS
        return f0, -self.grad_clip * n1 / den**2, -self.grad_clip * n2 / den**2 + 2 * self.grad_clip * n1**2 / den**3

    def derivatives(self) -> tuple[Params, Params, Params]:
        """``(θ⁺(0), θ⁺'(0), θ⁺''(0))``, exact: the chain rule through each coordinate's step with the clip factor's
        derivatives (``clip_derivatives``); where v' = 0 the square root's derivatives are 0, as in ``at``."""
        f, f1, f2 = self.clip_derivatives()
        b1, b2, c = self.beta1, self.beta2, self.lr / self.bc1
        theta0, d1, d2 = {}, {}, {}
        for k, theta in self.params.items():
            w, u = self.g[k], self.u[k]
            grad, grad1, grad2 = -f * w, -(f1 * w + f * u), -(f2 * w + 2 * f1 * u)  # G, G', G''
            m = b1 * self.m[k] + (1 - b1) * grad
            m1, m2 = (1 - b1) * grad1, (1 - b1) * grad2
            v = b2 * self.v[k] + (1 - b2) * grad * grad
            v1, v2 = 2 * (1 - b2) * grad * grad1, 2 * (1 - b2) * (grad1 * grad1 + grad * grad2)
            r = _safe_sqrt(v)
            inv = torch.where(r > 0, 1 / torch.where(r > 0, r, torch.ones_like(r)), torch.zeros_like(r))
            r1 = v1 * inv / 2
            r2 = v2 * inv / 2 - v1 * v1 * inv**3 / 4
            den = r / self.bc2_sqrt + self.eps
            den1, den2 = r1 / self.bc2_sqrt, r2 / self.bc2_sqrt
            q = m / den  # the normalised step m'/D and its derivatives
            q1 = m1 / den - m * den1 / den**2
            q2 = m2 / den - 2 * m1 * den1 / den**2 - m * den2 / den**2 + 2 * m * den1**2 / den**3
            theta0[k] = theta * (1 - self.lr * self.weight_decay) - c * q
            d1[k], d2[k] = -c * q1, -c * q2
        return theta0, d1, d2


def _as_lambda(lam: float | Tensor) -> Tensor:
    if isinstance(lam, Tensor):
        if lam.numel() != 1:
            raise ValueError(f"lam must be a scalar, got shape {tuple(lam.shape)}")
        return lam.reshape(()).to(torch.float64)
    lam = float(lam)
    if not math.isfinite(lam):
        raise ValueError(f"lam must be finite, got {lam}")
    return torch.tensor(lam, dtype=torch.float64)


def adamw_real_step(params: Mapping[str, Tensor], g: Mapping[str, Tensor], u: Mapping[str, Tensor],
                    exp_avg: Mapping[str, Tensor] | None, exp_avg_sq: Mapping[str, Tensor] | None, step: int,
                    lr: float, betas: tuple[float, float], eps: float, weight_decay: float, grad_clip: float,
                    mtp_grad_sq: float, lam: float | Tensor, clip_scope: str = "global") -> dict[str, Tensor]:
    """θ⁺(λ) on θ_S: torch's AdamW step on the clipped loss gradient ``G = −f(λ)·(g + λu)`` (``RealStep``).

    Arguments as in ``adamw_step_directions`` (buffers ``None`` and step 0 before the first step), plus the clip
    threshold ``grad_clip`` (<= 0: none), ``mtp_grad_sq`` = ‖∇_{θ_M}M‖² (θ_M's share of the global norm is
    λ²·mtp_grad_sq) and the clip's scope. ``lam`` is a float or a 0-d tensor; the result is differentiable in it."""
    return RealStep(params, g, u, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay, grad_clip, mtp_grad_sq,
                    clip_scope).at(lam)


def curve_taylor(objective: ScalarFn | Sequence[ScalarFn], point: Mapping[str, Tensor],
                 curves: Sequence[tuple[Mapping[str, Tensor], Mapping[str, Tensor]]], method: str = "rev-rev",
                 reduce: Reduce | None = None) -> list[tuple[float, float]]:
    """``[(dJ/dt, d²J/dt²)]`` at t = 0 of ``J(x(t))`` for curves through ``point`` with ``x'(0) = d1``,
    ``x''(0) = d2``: ``(∇Jᵀd1, d1ᵀH d1 + ∇Jᵀd2)``, from one gradient graph of J at ``point`` (one HVP per curve).

    ``objective`` may be a sequence of row-chunk terms whose sum is J (as ``decompose_steps`` takes them); ``reduce``
    sums the gradient and the quadratic forms over processes."""
    check_params(point)
    terms = [objective] if callable(objective) else list(objective)
    if not terms:
        raise ValueError("objective must be a function or a non-empty sequence of row-chunk terms")
    for i, (d1, d2) in enumerate(curves):
        check_alike(point, d1, f"curves[{i}][0]")
        check_alike(point, d2, f"curves[{i}][1]")
    if all(is_zero(d1) and is_zero(d2) for d1, d2 in curves):
        return [(0.0, 0.0) for _ in curves]
    live = [i for i, (d1, _) in enumerate(curves) if not is_zero(d1)]
    vs = [curves[i][0] for i in live]
    g, quad = None, None
    for term in terms:
        g_c, dots = grad_and_hvps(term, point, vs, method, project=lambda i, hv: dot(vs[i], hv))
        q = torch.stack(dots) if dots else torch.zeros(0, dtype=torch.float64)
        g = g_c if g is None else {k: t + g_c[k] for k, t in g.items()}  # out of place: autograd may alias
        quad = q if quad is None else quad + q
    if reduce is not None:
        g, quad = reduce(g), reduce({"quad": quad})["quad"]
    out = []
    for i, (d1, d2) in enumerate(curves):
        q = float(quad[live.index(i)]) if i in live else 0.0
        out.append((float(dot(g, d1)), q + float(dot(g, d2))))
    return out


@dataclass(frozen=True)
class RealStepTaylor:
    """α = dΔ/dλ and β = d²Δ/dλ² at λ = 0 of Δ(λ) = J(θ⁺(λ)) − J(θ⁺(0)) for AdamW's real, clipped step
    [geometry ``adam_real``]. Undefined values are NaN."""

    alpha: float
    beta: float
    clip_active: bool
    """The clip rescales the step at λ = 0 (f(0) < 1)."""
    lambda_clip: tuple[float, float]
    """[lambda_clip] over the parameters the clip sees (θ_S and θ_M for the global scope)."""
    clip_factor: float = 1.0
    """f(0)."""
    step_norm: float = NAN
    """‖θ⁺(0) − θ‖: the step at λ = 0."""
    slope_norm: float = NAN
    """‖θ⁺'(0)‖: how fast the step moves with λ."""
    clip_scope: str = "global"

    @property
    def lambda_star(self) -> float:
        """λ*_real = −α/β when β < 0 (NaN otherwise)."""
        return -self.alpha / self.beta if self.beta < 0 else NAN

    @property
    def lambda_star_clamped(self) -> float:
        """When the clip is inactive at λ = 0 the real curve has a kink at each end of ``lambda_clip``: λ*_real
        clamped to it, or, when β ≥ 0, the end α's sign points to (NaN when that end is infinite or α = 0).
        When the clip is active at λ = 0: λ*_real."""
        lam = self.lambda_star
        if self.clip_active:
            return lam
        lo, hi = self.lambda_clip
        if math.isnan(lo):
            return lam
        if math.isfinite(lam):
            return min(max(lam, lo), hi)
        end = hi if self.alpha > 0 else lo if self.alpha < 0 else NAN
        return end if math.isfinite(end) else NAN

    @property
    def lambda_bal(self) -> float:
        """‖θ⁺(0) − θ‖ / ‖θ⁺'(0)‖: the λ at which the MTP part of the real step is as large as the rest."""
        return self.step_norm / self.slope_norm if self.slope_norm > 0 else NAN

    def as_dict(self) -> dict[str, float | bool | str]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "lambda_clip"}
        lo, hi = self.lambda_clip
        return out | {"lambda_clip_lo": lo, "lambda_clip_hi": hi, "lambda_star": self.lambda_star,
                      "lambda_star_clamped": self.lambda_star_clamped, "lambda_bal": self.lambda_bal}


def real_step_taylor(rl_objective: ScalarFn | Sequence[ScalarFn], params: Mapping[str, Tensor],
                     g: Mapping[str, Tensor], u: Mapping[str, Tensor], exp_avg: Mapping[str, Tensor] | None,
                     exp_avg_sq: Mapping[str, Tensor] | None, step: int, lr: float, betas: tuple[float, float],
                     eps: float, weight_decay: float, grad_clip: float, mtp_grad_sq: float, *,
                     clip_scope: str = "global", method: str = "rev-rev", reduce: Reduce | None = None
                     ) -> RealStepTaylor:
    """The exact second-order Taylor coefficients of λ ↦ J(θ⁺(λ)) at λ = 0 for AdamW's real step (``RealStep``):
    θ⁺(0), θ⁺'(0), θ⁺''(0) by the chain rule (``RealStep.derivatives``), then one gradient and one HVP of J at θ⁺(0)
    (``curve_taylor``): α = ∇J⁺ᵀθ⁺', β = θ⁺'ᵀH⁺θ⁺' + ∇J⁺ᵀθ⁺''. The clip and v̂(λ) enter through θ⁺''.
    ``rl_objective`` is a function of a parameter dict (or its row-chunk terms); ``reduce`` sums over processes."""
    rs = RealStep(params, g, u, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay, grad_clip, mtp_grad_sq,
                  clip_scope)
    theta0, d1, d2 = rs.derivatives()
    ((alpha, beta),) = curve_taylor(rl_objective, theta0, [(d1, d2)], method, reduce)
    f0 = float(rs.clip_factor(0.0))
    step_norm = float(sq_norm({k: theta0[k] - rs.params[k] for k in theta0})) ** 0.5
    return RealStepTaylor(alpha, beta, f0 < 1.0, rs.lambda_clip, f0, step_norm, float(sq_norm(d1)) ** 0.5, clip_scope)
