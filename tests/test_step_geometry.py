"""The optimizer's real step (docs/theory.md section 2): θ⁺(λ) = θ + s + λ·a, against brute force in float64."""

import itertools
import math

import numpy as np
import pytest
import torch
from theory_problems import DT, SoftmaxPolicy, flat_grad_and_hessian, gen, quadratic, random_params

from occ_theory.theory import (
    adamw_step_directions,
    clip_active,
    clip_interval,
    decompose,
    decompose_step,
    decompose_steps,
    directions,
    fixed_precond_directions,
)
from occ_theory.theory.params import axpy, flatten, unflatten
from occ_theory.theory.step import REASON_A_ZERO, REASON_NOT_CONCAVE

SHAPES = {"w": (3, 2), "b": (4,)}


def _positive(g, like):
    return {k: 0.2 + torch.rand(t.shape, generator=g, dtype=DT) for k, t in like.items()}


# ------------------------------------------------------------------ decompose_step


@pytest.mark.parametrize("method", ["rev-rev", "fwd-rev"])
@pytest.mark.parametrize("batched", [False, True])
def test_identity1_quadratic_exact_for_any_step(method, batched):
    """For quadratic J, Δ(λ) = J(θ+s+λa) − J(θ+s) equals λ·α_m + ½·λ²·β_m for arbitrary s and a, with
    α_m = (g + A s)ᵀa and β_m = aᵀAa from the closed-form gradient and Hessian A."""
    g = gen(101)
    params = random_params(g, SHAPES)
    J = quadratic(g, params, "indefinite")
    steps = {"one": (random_params(g, SHAPES), random_params(g, SHAPES)),
             "two": (random_params(g, SHAPES, 0.01), random_params(g, SHAPES, 3.0))}
    decs = decompose_steps(J, params, steps, method, batched=batched)
    lams = np.array([-5.0, -1.0, -0.1, 0.0, 0.3, 1.0, 4.0])
    for name, (s, a) in steps.items():
        dec = decs[name]
        base = axpy(1.0, s, params)
        measured = np.array([float(J(axpy(lam, a, base)) - J(base)) for lam in lams])
        assert np.max(np.abs(measured - dec.predicted_delta(lams))) <= 1e-10 * np.max(np.abs(measured))
        x_s, x_a = flatten(s), flatten(a)
        assert dec.alpha_model == pytest.approx(float((flatten(J.grad(params)) + J.hess @ x_s) @ x_a), rel=1e-12)
        assert dec.beta_model == pytest.approx(float(x_a @ J.hess @ x_a), rel=1e-12)
        assert dec.lambda_bal == pytest.approx(float(x_s.norm() / x_a.norm()), rel=1e-12)
        assert dec.geometry == name


def test_lambda_star_of_a_step_is_the_argmax_of_the_measured_curve():
    g = gen(102)
    params = random_params(g, SHAPES)
    J = quadratic(g, params, "negdef")
    s, a = random_params(g, SHAPES), random_params(g, SHAPES)
    dec = decompose_step(J, params, s, a, geometry="adam_step")
    assert dec.concave and dec.reason == ""
    span = 3 * abs(dec.lambda_star) + 1
    grid = np.linspace(dec.lambda_star - span, dec.lambda_star + span, 1001)
    base = axpy(1.0, s, params)
    measured = [float(J(axpy(float(lam), a, base))) for lam in grid]
    assert grid[int(np.argmax(measured))] == pytest.approx(dec.lambda_star, abs=2 * span / 1000)


@pytest.mark.parametrize("batched", [False, True])
def test_decompose_steps_match_explicit_hessian_for_every_geometry(batched):
    """Four geometries from one call, each against g and H built explicitly, on a non-quadratic J;
    β_F against the explicit Jacobian of the log-probs; a zero direction gives zeros and its reason."""
    prob = SoftmaxPolicy(seed=103)
    g_flat, hess = flat_grad_and_hessian(prob.rl_objective, prob.params)
    jac = torch.func.jacrev(lambda x: prob.logp(unflatten(x, prob.params)))(flatten(prob.params))  # (B, T, n)
    r = gen(104)
    zero = {k: torch.zeros_like(t) for k, t in prob.params.items()}
    steps = {name: (random_params(r, prob.shapes, 0.1), random_params(r, prob.shapes, 0.1))
             for name in ("sgd", "adam", "adam_step")} | {"adam_stationary": (random_params(r, prob.shapes), zero)}
    decs = decompose_steps(prob.rl_objective, prob.params, steps, logp_fn=prob.logp, mask=prob.mask, batched=batched)
    for name in ("sgd", "adam", "adam_step"):
        s, a = (flatten(d) for d in steps[name])
        dec = decs[name]
        assert dec.alpha_model == pytest.approx(float((g_flat + hess @ s) @ a), rel=1e-10)
        assert dec.alpha_first_order == pytest.approx(float(g_flat @ a), rel=1e-12)
        assert dec.beta_model == pytest.approx(float(a @ hess @ a), rel=1e-10)
        delta = jac @ a  # (B, T)
        assert dec.beta_fisher == pytest.approx(-float((prob.mask * delta**2).sum() / prob.mask.sum()), rel=1e-10)
    still = decs["adam_stationary"]
    assert (still.alpha_model, still.beta_model) == (0.0, 0.0) and still.reason == REASON_A_ZERO
    assert math.isnan(still.lambda_star) and math.isnan(still.lambda_bal) and not still.concave
    torch.testing.assert_close(flatten(decs["sgd"].grad_rl), g_flat, rtol=1e-12, atol=1e-14)


def test_decompose_step_sums_over_processes_with_reduce():
    """Two processes holding the same half-batch: J is their sum, so α_m and β_m double, β_F does not."""
    prob = SoftmaxPolicy(seed=105)
    s, a = random_params(gen(106), prob.shapes, 0.1), random_params(gen(107), prob.shapes, 0.1)
    one = decompose_step(prob.rl_objective, prob.params, s, a)
    two = decompose_step(prob.rl_objective, prob.params, s, a, reduce=lambda d: {k: 2 * t for k, t in d.items()})
    assert two.alpha_model == pytest.approx(2 * one.alpha_model, rel=1e-12)
    assert two.beta_model == pytest.approx(2 * one.beta_model, rel=1e-12)


def test_decompose_step_is_not_concave_on_a_convex_objective():
    g = gen(108)
    params = random_params(g, SHAPES)
    J = quadratic(g, params, "posdef")
    dec = decompose_step(J, params, random_params(g, SHAPES), random_params(g, SHAPES))
    assert dec.beta_model > 0 and not dec.concave and dec.reason == REASON_NOT_CONCAVE
    assert math.isnan(dec.lambda_star) and set(dec.as_dict()) >= {"alpha_model", "beta_model", "lambda_star",
                                                                  "concave", "reason", "lambda_bal", "geometry"}


@pytest.mark.parametrize("use_precond", [False, True])
def test_decompose_equals_decompose_step_with_s_eta_Pg_and_a_eta_Pu(use_precond):
    """The fixed-P model of section 2 is the step form with s = ηPg, a = ηPu:
    α_m = η(C + ηX), β_m = η²Q, and every λ* and λ_bal agree."""
    prob = SoftmaxPolicy(seed=109)
    lr = 0.07
    precond = _positive(gen(110), prob.params) if use_precond else None
    dec = decompose(prob.rl_objective, prob.mtp_objective, prob.params, lr, precond, "rev-rev", prob.logp, prob.mask)
    g, u = directions(prob.rl_objective, prob.mtp_objective, prob.params)
    name = "sgd" if precond is None else "adam"
    step = decompose_steps(prob.rl_objective, prob.params, {name: fixed_precond_directions(g, u, lr, precond)},
                           logp_fn=prob.logp, mask=prob.mask)[name]
    assert dec.geometry == step.geometry == name
    assert step.alpha_model == pytest.approx(lr * (dec.corr + lr * dec.cross), rel=1e-10)
    assert step.alpha_first_order == pytest.approx(lr * dec.corr, rel=1e-12)
    assert step.beta_model == pytest.approx(lr**2 * dec.curv, rel=1e-10)
    assert step.beta_fisher == pytest.approx(lr**2 * dec.curv_fisher, rel=1e-10)
    for key in ("lambda_star", "lambda_star_first_order", "lambda_star_fisher", "lambda_bal"):
        a, b = getattr(step, key), getattr(dec, key)
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-10), key


def test_fixed_precond_directions_validate_their_inputs():
    p = random_params(gen(111), SHAPES)
    with pytest.raises(ValueError, match="lr"):
        fixed_precond_directions(p, p, 0.0)
    with pytest.raises(ValueError, match="non-negative"):
        fixed_precond_directions(p, p, 0.1, {k: -torch.ones_like(t) for k, t in p.items()})
    with pytest.raises(ValueError, match=r"a\['adam'\]"):
        decompose_steps(lambda q: flatten(q).sum(), p, {"adam": (p, {"w": p["w"]})})


# ------------------------------------------------------------------ adamw_step_directions

LR, BETAS, EPS, WD = 0.05, (0.9, 0.99), 1e-6, 0.1


class _AdamW:
    """A real ``torch.optim.AdamW`` on a copy of θ and of a saved state: the ground truth."""

    def __init__(self, theta, history, foreach):
        self.names = list(theta)
        self.foreach = foreach
        params, opt = self._fresh(theta)
        for grads in history:  # earlier steps on other gradients: momentum, v and t > 1
            for k, p in params.items():
                p.grad = grads[k].clone()
            opt.step()
        self.theta = {k: p.detach().clone() for k, p in params.items()}
        st = [opt.state[params[k]] for k in self.names]
        zeros = {k: torch.zeros_like(t) for k, t in theta.items()}
        self.m = {k: s["exp_avg"].clone() for k, s in zip(self.names, st)} if history else zeros
        self.v = {k: s["exp_avg_sq"].clone() for k, s in zip(self.names, st)} if history else zeros
        self.t = len(history)

    def _fresh(self, theta):
        params = {k: torch.nn.Parameter(theta[k].clone()) for k in self.names}
        return params, torch.optim.AdamW(list(params.values()), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                                         foreach=self.foreach)

    def step(self, g, u, lam, frozen_v=False):
        """θ⁺(λ): one AdamW step on the loss gradient −(g + λu) from the saved state. ``frozen_v``: the
        stored v is shifted so that torch's own update lands on v' = β₂·v + (1−β₂)·g², the λ = 0 value."""
        params, opt = self._fresh(self.theta)
        for k, p in params.items():
            grad = -(g[k] + lam * u[k])
            v = self.v[k] + (1 - BETAS[1]) / BETAS[1] * (g[k] ** 2 - grad**2) if frozen_v else self.v[k].clone()
            opt.state[p] = {"step": torch.tensor(float(self.t)), "exp_avg": self.m[k].clone(), "exp_avg_sq": v}
            p.grad = grad
        opt.step()
        return {k: p.detach() for k, p in params.items()}

    def vhat_direction(self, g, u):
        """d_v: the first-order change of the real step through v'(λ), which adam_step leaves out
        (chain rule through torch's update: ∂/∂λ of −η/bc1 · m'/(sqrt(v')/sqrt(bc2) + ε) at fixed m')."""
        b1, b2 = BETAS
        t = self.t + 1
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        out = {}
        for k in self.names:
            m1 = b1 * self.m[k] - (1 - b1) * g[k]  # m' at λ = 0 (loss gradients)
            root = (b2 * self.v[k] + (1 - b2) * g[k] ** 2).sqrt()
            d_root = (1 - b2) * g[k] * u[k] / root  # ∂sqrt(v')/∂λ, v' = β₂v + (1−β₂)(g + λu)²
            out[k] = LR / bc1 * m1 * d_root / (bc2**0.5 * (root / bc2**0.5 + EPS) ** 2)
        return out


@pytest.mark.parametrize("history", [0, 3], ids=["t=1", "t=4"])
@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_step_directions_equal_torch_adamw_with_vhat_frozen(history, foreach):
    """θ + s is AdamW's step at λ = 0, and θ + s + λ·a is AdamW's step on −(g + λu) with v' held at its
    λ = 0 value, for every λ (to rounding): momentum, bias corrections, ε and weight decay as torch has them."""
    r = gen(120 + history)
    shapes = {"w": (5, 4), "b": (6,)}
    adamw = _AdamW(random_params(r, shapes), [random_params(r, shapes) for _ in range(history)], foreach)
    g, u = random_params(r, shapes), random_params(r, shapes)
    state = (adamw.m, adamw.v) if history else (None, None)
    s, a = adamw_step_directions(adamw.theta, g, u, *state, adamw.t, LR, BETAS, EPS, WD)
    for lam in (0.0, -3.0, 0.01, 1.0, 20.0):
        real = adamw.step(g, u, lam, frozen_v=True)
        for k in shapes:
            # rtol: the shifted v cancels (1−β₂)·(g + λu)² back out, with rounding that grows with λ²
            torch.testing.assert_close(adamw.theta[k] + s[k] + lam * a[k], real[k], rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("history", [0, 3], ids=["t=1", "t=4"])
def test_adamw_real_step_departs_from_adam_step_through_vhat_at_first_order(history):
    """With v'(λ) free, θ⁺(λ) − θ⁺(0) = λ·(a + d_v) + O(λ²): the residual after the first-order term
    shrinks 4× per halving of λ. At t = 1 AdamW's step is η·sign(g + λu): d_v ≈ −a, the real step hardly
    moves with λ; that is the v̂(λ) effect the probe reports beside the adam_step model."""
    r = gen(125 + history)
    shapes = {"w": (5, 4), "b": (6,)}
    adamw = _AdamW(random_params(r, shapes), [random_params(r, shapes) for _ in range(history)], False)
    g, u = random_params(r, shapes), random_params(r, shapes)
    state = (adamw.m, adamw.v) if history else (None, None)
    _, a = adamw_step_directions(adamw.theta, g, u, *state, adamw.t, LR, BETAS, EPS, WD)
    d_v = adamw.vhat_direction(g, u)
    at0 = adamw.step(g, u, 0.0)
    lam0 = 0.05 * min(float((g[k].abs() / u[k].abs()).min()) for k in shapes)  # inside every |g_i/u_i|
    res = []
    for lam in (lam0, lam0 / 2, lam0 / 4):
        real = adamw.step(g, u, lam)
        res.append(float(flatten({k: real[k] - at0[k] - lam * (a[k] + d_v[k]) for k in shapes}).norm()))
    for big, small in itertools.pairwise(res):
        assert 3.5 <= big / small <= 4.5, res
    if history == 0:
        assert float(flatten({k: a[k] + d_v[k] for k in shapes}).norm()) < 1e-2 * float(flatten(a).norm())  # ε


def test_adamw_step_directions_validate_the_state():
    p = random_params(gen(130), SHAPES)
    with pytest.raises(ValueError, match="exp_avg"):
        adamw_step_directions(p, p, p, None, None, 3, LR, BETAS, EPS, WD)
    with pytest.raises(ValueError, match="step"):
        adamw_step_directions(p, p, p, None, None, -1, LR, BETAS, EPS, WD)
    with pytest.raises(ValueError, match="betas"):
        adamw_step_directions(p, p, p, None, None, 0, LR, (1.0, 0.99), EPS, WD)
    with pytest.raises(ValueError, match=r"exp_avg_sq\['b'\]"):
        adamw_step_directions(p, p, p, p, dict(p, b=torch.ones(5, dtype=DT)), 2, LR, BETAS, EPS, WD)


# ------------------------------------------------------------------ clip_interval


def _clip_problem(seed):
    r = gen(seed)
    g = random_params(r, {"w": (4, 3), "b": (5,)})
    u = random_params(r, {"w": (4, 3), "b": (5,), "mtp.w": (2, 2)})  # θ_M: only M reaches it
    return g, {k: t - 1.5 * g[k] if k in g else t for k, t in u.items()}  # gᵀu < 0: the clip can turn off


def test_clip_interval_matches_brute_force_over_a_grid_and_torch_clip():
    g, u = _clip_problem(140)
    gn = float(flatten(g).norm())
    for max_norm in (1.5 * gn, 0.9 * gn):
        lo, hi = clip_interval(g, u, max_norm)
        assert lo < hi
        grid = lo - 2 * (hi - lo) + (np.arange(2000) + 0.37) * (hi - lo) / 400  # never exactly on lo or hi
        norms = np.array([float(flatten({k: g.get(k, 0) + float(lam) * u[k] for k in u}).norm()) for lam in grid])
        inside = norms <= max_norm
        assert np.array_equal(~inside, clip_active(grid, (lo, hi)))
        assert grid[inside].min() == pytest.approx(lo, abs=(hi - lo) / 300)
        assert grid[inside].max() == pytest.approx(hi, abs=(hi - lo) / 300)
        assert (lo <= 0 <= hi) == (gn <= max_norm)
        for lam in (lo - 0.1 * (hi - lo), 0.5 * (lo + hi), hi + 0.1 * (hi - lo)):  # torch's clip agrees
            grads = [torch.nn.Parameter(torch.zeros_like(t)) for t in u.values()]
            for p, (k, t) in zip(grads, u.items()):
                p.grad = -(g.get(k, torch.zeros_like(t)) + lam * t)
            before = [p.grad.clone() for p in grads]
            torch.nn.utils.clip_grad_norm_(grads, max_norm)
            unchanged = all(torch.equal(b, p.grad) for b, p in zip(before, grads))
            assert unchanged == (lo <= lam <= hi)


def test_clip_interval_edge_cases():
    g, u = _clip_problem(141)
    assert clip_interval(g, u, 0.0) == (-math.inf, math.inf)  # grad_clip = 0: no clip
    zero_u = {k: torch.zeros_like(t) for k, t in u.items()}
    gn = float(flatten(g).norm())
    assert clip_interval(g, zero_u, 2 * gn) == (-math.inf, math.inf)
    assert all(math.isnan(x) for x in clip_interval(g, zero_u, 0.5 * gn))
    # u ⟂ g: ‖g + λu‖ ≥ ‖g‖ > max_norm for every λ, so the clip is always active
    u_perp = {k: t - float((flatten(g) @ flatten({q: u[q] for q in g})) / gn**2) * g[k] if k in g else t
              for k, t in u.items()}
    empty = clip_interval(g, u_perp, 0.99 * gn)
    assert all(math.isnan(x) for x in empty) and clip_active([-1e6, 0.0, 1e6], empty).all()
    with pytest.raises(ValueError, match="grad_clip"):
        clip_interval(g, u, float("nan"))
    with pytest.raises(ValueError, match=r"g_all\['b'\] has shape"):
        clip_interval(g, dict(u, b=torch.zeros(3, dtype=DT)), 1.0)
