"""The probe's quantities: each a small class named for what it measures (Cockpit's ``Quantity``).

A quantity says whether the probe settings want it (``wanted``), computes its record from the ``ProbeContext``
(``compute``), and owns the key prefixes it writes (``keys``); ``run_probe`` loops over ``QUANTITIES`` in order,
timing each (``perf/probe/<name>_s``: the probe's cost profile). Intermediates several quantities read (g, u, the
geometries' step forms, the real step's Taylor model) live on the context and are computed once. Offline
(``occ probe``) the same list runs on a bundle's saved state, so each quantity's offline recomputation is its
online one. A new quantity is one class here and one entry in ``QUANTITIES``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from ..rl.coef import CoefficientRule, fisher_proxy, logprob_proxies, proxy_record
from ..theory.decompose import Decomposition
from ..theory.params import dot
from ..theory.step import (
    StepDecomposition,
    adamw_state_buffers,
    adamw_step_directions,
    decompose_steps,
    fixed_precond_directions,
)
from .context import ProbeContext
from .curve import measure_curve, realised_step, taylor_residuals
from .realstep import TAYLOR_KEYS, adam_real_taylor, real_step_curves, taylor_record
from .recorder import module_breakdown

NAN = float("nan")
GEOMETRIES = ("sgd", "adam", "adam_step", "adam_stationary")
"""The affine geometries θ + s + λa a probe measures (docs/theory.md section 2): ``diag/<geometry>/…``."""
FIXED_P = ("sgd", "adam")
"""The geometries of the paper's fixed-P form, with C, X, Q and the Fisher curvature Q_F."""
PAPER_KEYS = ("corr", "cross", "curv", "curv_fisher", "gain_at_optimum", "pu_norm_sq", "pg_norm", "cosine")
"""C, X, Q and the rest of the fixed-P form, for the geometries that have one (``sgd``, ``adam``); ``cosine`` is
cos(g, u) in P's metric, gᵀPu/√(gᵀPg·uᵀPu)."""
STEP_KEYS = ("alpha_model", "beta_model", "alpha_first_order", "beta_fisher", "lambda_star", "lambda_star_first_order",
             "lambda_star_fisher", "lambda_bal", "s_norm", "a_norm", "proj")
"""The general step form θ + s + λ·a, for every geometry (``proj`` = η·gᵀa/‖a‖², which is κ = C/‖Pu‖² for the
fixed-P geometries; ``beta_fisher`` for the curve's geometry, ``adam`` (``sgd`` before Adam has state), and for
every geometry with ``diag.fisher_all_geometries``)."""


def geometry_names(params: dict[str, Tensor], optim: Any) -> list[str]:
    """The geometries the optimizer state allows: ``sgd`` always; ``adam`` once Adam has state; ``adam_step``
    for AdamW (or Adam without weight decay), also on the first step; ``adam_stationary`` when the
    recorder's momentum buffers are in the snapshot too."""
    has_state = optim.kind != "sgd" and bool(params) and all(k in optim.state for k in params)
    names = ["sgd"] + (["adam"] if has_state else [])
    if optim.kind == "adamw" or (optim.kind == "adam" and optim.weight_decay == 0):
        names.append("adam_step")
    if has_state and optim.momentum is not None:
        names.append("adam_stationary")
    return names


def geometry_directions(params: dict[str, Tensor], g: dict[str, Tensor], u: dict[str, Tensor], optim: Any,
                        names: list[str] | None = None) -> dict[str, tuple[dict, dict]]:
    """``(s, a)`` of each geometry in ``names`` (default: every one the optimizer state allows,
    ``geometry_names``); each is two θ_S-sized tensors."""
    lr = optim.lr
    names = geometry_names(params, optim) if names is None else names
    precond = optim.preconditioner(params) if {"adam", "adam_stationary"} & set(names) else None
    out = {}
    if "sgd" in names:
        out["sgd"] = fixed_precond_directions(g, u, lr)
    if "adam" in names and precond is not None:
        out["adam"] = fixed_precond_directions(g, u, lr, precond)
    if "adam_step" in names:
        out["adam_step"] = adamw_step_directions(params, g, u, *adamw_state_buffers(params, optim.state), lr,
                                                 optim.betas, optim.eps,
                                                 optim.weight_decay if optim.kind == "adamw" else 0.0)
    if "adam_stationary" in names and precond is not None and optim.momentum is not None:
        out["adam_stationary"] = fixed_precond_directions(optim.momentum["m_g"], optim.momentum["m_u"], lr, precond)
    return out


def adam_t(optim: Any) -> int:
    """t of the step about to be taken (AdamW's state['step'] + 1): 1 is the first step, a sign step."""
    st = next(iter(optim.state.values()), None)
    return int(float(st["step"])) + 1 if st is not None else 1


def control(grad_cut: str, t: int) -> str:
    """Why a probe is a control rather than evidence about the model of J (docs/theory.md section 6): ``detach``
    (u = 0 on θ_S: its real curve is the clip alone), ``first_step`` (AdamW's first step is a sign step), or ''."""
    if grad_cut == "detach":
        return "detach"
    return "first_step" if t == 1 else ""


def _decomp_record(geometry: str, dec: Decomposition | None, step: StepDecomposition | None, lr: float,
                   metric: tuple[float, float] | None) -> dict[str, Any]:
    prefix = f"diag/{geometry}"
    fixed_p = geometry in FIXED_P
    keys = STEP_KEYS + (PAPER_KEYS if fixed_p else ())
    if step is None:
        why = "no optimizer state yet (first step)" if geometry != "adam_stationary" else "no momentum buffers"
        return {f"{prefix}/{k}": NAN for k in keys} | {f"{prefix}/concave": None, f"{prefix}/reason": why}
    d = step.as_dict() | (dec.as_dict() if dec is not None else {})
    d["proj"] = lr * step.alpha_first_order / step.a_norm**2 if step.a_norm > 0 else NAN
    if fixed_p:  # s = ηPg, a = ηPu: gᵀPg = gᵀs/η, uᵀPu = uᵀa/η
        gpg, upu = metric
        d["cosine"] = step.alpha_first_order / lr / (gpg * upu) ** 0.5 if gpg > 0 and upu > 0 else NAN
    return {f"{prefix}/{k}": d[k] for k in keys} | {f"{prefix}/concave": step.concave, f"{prefix}/reason": step.reason}


def geometries(ctx: ProbeContext) -> dict[str, Any]:
    """The affine geometries' step forms, once per probe: ``steps`` (``StepDecomposition`` by name), ``decs``
    (C, X, Q of the fixed-P ones), ``step_dirs`` (``adam_step``'s (s, a)), the curve's geometry and its P. Each
    group of ``diag.geometries_per_pass`` geometries is built, decomposed and dropped before the next; J's kept
    gradient graph (``ProbeContext.directions``) serves their HVPs."""
    if "geometries" in ctx.cache:
        return ctx.cache["geometries"]
    d, s = ctx.directions(), ctx.settings
    names = geometry_names(ctx.params, ctx.optim)
    per_pass = s.geometries_per_pass or len(names)
    curve_geometry = "adam" if "adam" in names else "sgd"  # the fixed-P geometry of the curve and the fisher proxy
    fisher = None if s.fisher_all_geometries else (curve_geometry,)
    steps, metric, step_dirs = {}, {}, None
    with ctx.timed("geometries"), ctx.curvature():
        for i in range(0, len(names), per_pass):
            dirs = geometry_directions(ctx.params, d.g, d.u, ctx.optim, names[i:i + per_pass])
            steps |= decompose_steps(ctx.J_terms, ctx.params, dirs, s.hvp_method, ctx.reductions.sum,
                                     ctx.logp_terms, ctx.mask, jvp_batch=s.jvp_batch, grad_rl=d.g, graph=d.graph,
                                     fisher=fisher)
            metric |= {k: (float(dot(d.g, v[0])) / ctx.lr, float(dot(d.u, v[1])) / ctx.lr)
                       for k, v in dirs.items() if k in FIXED_P}
            step_dirs = dirs.get("adam_step", step_dirs)
            del dirs
    ctx.release_graph()
    decs = {name: Decomposition.from_step(steps[name], ctx.lr, d.g, d.u) for name in FIXED_P if name in steps}
    precond = ctx.optim.preconditioner(ctx.params) if curve_geometry == "adam" else None
    ctx.cache["geometries"] = {"steps": steps, "decs": decs, "metric": metric, "step_dirs": step_dirs,
                               "curve": curve_geometry, "precond": precond}
    return ctx.cache["geometries"]


class Quantity:
    """One measurement of a probe (see the module docstring)."""

    name: ClassVar[str] = ""
    keys: ClassVar[tuple[str, ...]] = ()
    """The keys this quantity writes, as ``fnmatch`` patterns (no two quantities write one key)."""
    needs_mtp: ClassVar[bool] = True
    """Whether it needs an MTP loss (the regime ``off`` has none: only the proxies' statistics are measured)."""

    def wanted(self, ctx: ProbeContext) -> bool:
        return True

    def compute(self, ctx: ProbeContext) -> dict[str, Any]:
        raise NotImplementedError


class LogprobProxies(Quantity):
    """The log-prob proxies (``reference``, ``least_squares``, as the run's rule would scale them) and the statistics
    of l − l_old and q − l_old, from one forward pass without gradients (docs/theory.md section 4)."""

    name, keys, needs_mtp = "proxies", ("lambda/reference", "lambda/least_squares", "stats/*"), False

    def compute(self, ctx: ProbeContext) -> dict[str, Any]:
        with ctx.curvature():
            obj = ctx.objectives()
        b = ctx.batch
        raw, stats = logprob_proxies(obj.logp, b.old_logp, obj.mtp_logp, ctx.mask, b.prompt_len, b.attention_mask,
                                     ctx.reductions.sum_terms)
        return stats | proxy_record(CoefficientRule("occ", ctx.coef.mtp_coef), raw)


class Geometries(Quantity):
    """α_m, β_m, λ* (and β_F) of the four affine geometries, C, X, Q of the fixed-P ones, whether the probe is a
    control, and AdamW's step count t (docs/theory.md section 2)."""

    name, keys = "geometries", (*(f"diag/{g}/{k}" for g in GEOMETRIES for k in (*STEP_KEYS, *PAPER_KEYS, "concave",
                                                                                "reason")),
                                "diag/adam/momentum_weight", "diag/adam_t", "diag/control")

    def compute(self, ctx: ProbeContext) -> dict[str, Any]:
        geo = geometries(ctx)
        out: dict[str, Any] = {}
        for name in GEOMETRIES:
            out |= _decomp_record(name, geo["decs"].get(name), geo["steps"].get(name), ctx.lr,
                                  geo["metric"].get(name))
        t = adam_t(ctx.optim)
        out |= {"diag/adam_t": t, "diag/control": control(ctx.spec.grad_cut, t)}
        if "adam" in geo["steps"]:  # the model step is η·P·g; Adam's next step weighs the new gradient by this
            out["diag/adam/momentum_weight"] = (1 - ctx.optim.betas[0]) / (1 - ctx.optim.betas[0] ** t)
        return out


class ModuleBreakdown(Quantity):
    """Norms, cosine and C = gᵀu of g and u over θ_S and per module group (``recorder.module_breakdown``)."""

    name, keys = "modules", ("diag/grad/*", "diag/module/*")

    def compute(self, ctx: ProbeContext) -> dict[str, Any]:
        d = ctx.directions()
        return module_breakdown(d.g, d.u)


class AdamReal(Quantity):
    """The fifth geometry, ``adam_real``: the exact Taylor coefficients of J along the real, clipped AdamW step
    (``realstep.adam_real_taylor``), and ‖∇_{θ_M}M‖² and the clip scope it used."""

    name, keys = "adam_real", (*(f"diag/adam_real/{k}" for k in TAYLOR_KEYS), "diag/adam_real/clip_factor_at_used",
                               "diag/mtp_grad_sq", "diag/clip_scope")

    def wanted(self, ctx: ProbeContext) -> bool:
        return "adam_step" in geometry_names(ctx.params, ctx.optim)

    def compute(self, ctx: ProbeContext) -> dict[str, Any]:
        return taylor_record(real_taylor(ctx)) | {"diag/mtp_grad_sq": ctx.directions().mtp_grad_sq,
                                                  "diag/clip_scope": ctx.optim.clip_scope,
                                                  "diag/adam_real/clip_factor_at_used": ctx.cache["f_used"]}


def real_taylor(ctx: ProbeContext) -> Any:
    """``adam_real``'s ``RealStepTaylor``, once per probe (and the clip factor at the λ used, ``f_used``)."""
    if "adam_real" not in ctx.cache:
        d = ctx.directions()
        with ctx.timed("adam_real_taylor"), ctx.curvature():
            ctx.cache["adam_real"], ctx.cache["f_used"] = adam_real_taylor(
                ctx.J_terms, ctx.params, d.g, d.u, ctx.optim, d.mtp_grad_sq, ctx.settings.hvp_method,
                ctx.reductions.sum, ctx.lam_used)
    return ctx.cache["adam_real"]


class FisherProxy(Quantity):
    """The ``fisher`` proxy Σ m·A·δ / (η·Σ m·δ²) from the curve geometry's exact δ = ∇l·Pu (docs/theory.md 4c)."""

    name, keys = "fisher_proxy", ("lambda/fisher",)

    def compute(self, ctx: ProbeContext) -> dict[str, Any]:
        geo = geometries(ctx)
        dec = geo["decs"][geo["curve"]]
        value = fisher_proxy(ctx.batch.advantages, dec.dlogp, ctx.mask, ctx.lr, ctx.reductions.sum) \
            if dec.dlogp is not None else NAN
        return proxy_record(CoefficientRule("occ", ctx.coef.mtp_coef), {"fisher": value})


class ModelCurve(Quantity):
    """The measured curve Δ(λ) along the fixed-P model step, its quadratic fit, bootstrap and held-out curve
    (``curve.measure_curve``; docs/theory.md section 5)."""

    name, keys = "model_curve", ("curve/lams", "curve/deltas", "curve/heldout_*", "diag/curve/*", "diag/curve_heldout/*")

    def wanted(self, ctx: ProbeContext) -> bool:
        return ctx.settings.curve_points > 0

    def compute(self, ctx: ProbeContext) -> dict[str, Any]:
        d, geo = ctx.directions(), geometries(ctx)
        dec = geo["decs"][geo["curve"]]
        with ctx.evaluation():
            out = measure_curve(ctx.J, ctx.M, ctx.seq_terms, ctx.params, d.g, d.u, dec, geo["precond"],
                                ctx.lam_used, ctx.mask, ctx.settings, ctx.heldout, ctx.work, ctx.spec,
                                ctx.reductions.sum, ctx.reductions.gather)
        return out | {"diag/curve/geometry": geo["curve"]}


class RealStepCurves(Quantity):
    """The ground truth: the real step's local curve, its real optimum with and without the clip, every geometry's
    λ* against it, and the exact split of the real curvature (``realstep.real_step_curves``)."""

    name, keys = "real_step", ("curve/real_*", "curve/noclip_*", "diag/curve_real_local/*", "diag/real_optimum*",
                               "diag/real_beta/*", "diag/adam_real_noclip/*", "diag/lambda_clip_*",
                               "diag/*/delta_at_lambda_star*", "diag/*/optimum_ratio*", "diag/*/alpha_rel_err",
                               "diag/*/beta_rel_err")

    def wanted(self, ctx: ProbeContext) -> bool:
        s = ctx.settings
        return s.curve_points > 0 and s.curve_real_step and AdamReal().wanted(ctx)

    def compute(self, ctx: ProbeContext) -> dict[str, Any]:
        d, geo, real = ctx.directions(), geometries(ctx), real_taylor(ctx)
        with ctx.curvature():  # the exact split of β_real differentiates J twice
            return real_step_curves(ctx.J, ctx.J_terms, ctx.params, d.g, d.u, d.mtp_grad_sq, geo["steps"], real,
                                    geo["step_dirs"], ctx.lam_used, ctx.settings, ctx.optim, ctx.reductions.sum)


class Realised(Quantity):
    """A rule's realised update a·g + b·u on θ_S, stepped by the real optimizer, against detach's and the plain
    loss's (``curve.realised_step``)."""

    name, keys = "realised", ("diag/realised/*",)

    def wanted(self, ctx: ProbeContext) -> bool:
        return ctx.realised is not None and ctx.optim.kind in ("adam", "adamw")

    def compute(self, ctx: ProbeContext) -> dict[str, Any]:
        d = ctx.directions()
        with ctx.evaluation():
            return realised_step(ctx.J, ctx.params, d.g, d.u, ctx.realised, ctx.coef.value, ctx.optim, d.mtp_grad_sq,
                                 ctx.reductions.sum)


class TaylorResidual(Quantity):
    """Identity 2 on the live model: the residual of the fixed-P model as η halves (``curve.taylor_residuals``)."""

    name, keys = "taylor", ("taylor/*", "diag/taylor/*")

    def wanted(self, ctx: ProbeContext) -> bool:
        return ctx.settings.taylor_halvings > 0

    def compute(self, ctx: ProbeContext) -> dict[str, Any]:
        d, geo = ctx.directions(), geometries(ctx)
        dec = geo["decs"][geo["curve"]]
        if dec.u_zero:
            return {}
        with ctx.evaluation():
            return taylor_residuals(ctx.J, ctx.M, ctx.params, d.g, d.u, dec, geo["precond"], ctx.lam_used,
                                    ctx.settings, ctx.reductions.sum)


QUANTITIES: tuple[Quantity, ...] = (Geometries(), LogprobProxies(), ModuleBreakdown(), AdamReal(), FisherProxy(),
                                    ModelCurve(), RealStepCurves(), Realised(), TaylorResidual())
"""Every quantity a probe measures, in the order it runs (later ones read what earlier ones cached: the proxies
read the forward pass the geometries' directions ran; without an MTP loss only the proxies run)."""


def quantity_names() -> tuple[str, ...]:
    return tuple(q.name for q in QUANTITIES)
