"""The step AdamW really takes (docs/theory.md section 2, ``adam_real``), against torch and brute force in float64."""

import math

import numpy as np
import pytest
import torch
from theory_problems import DT, SoftmaxPolicy, gen, random_params

from occ_theory.theory import (
    RealStep,
    adamw_real_step,
    curve_taylor,
    fit_quadratic,
    locate_maximum,
    optimum_grid,
    real_step_taylor,
)
from occ_theory.theory.params import axpy, flatten

SHAPES = {"w": (3, 2), "b": (4,)}
M_SIZE = 5  # θ_M: one parameter of 5 entries
LR, BETAS, EPS, WD = 0.01, (0.9, 0.999), 1e-8, 0.05


def _problem(seed):
    g = gen(seed)
    params, grad_g, grad_u = (random_params(g, SHAPES) for _ in range(3))
    u_m = torch.randn(M_SIZE, generator=g, dtype=DT)
    return params, grad_g, grad_u, u_m


def _state_after(params, steps, seed, u_m):
    """AdamW's state after ``steps`` real steps on random gradients (θ_S and θ_M), with weight decay; (None, None)
    before the first."""
    if steps == 0:
        return None, None
    g = gen(seed)
    ps = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    pm = torch.zeros(M_SIZE, dtype=DT, requires_grad=True)
    opt = torch.optim.AdamW([*ps.values(), pm], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for _ in range(steps):
        for p in (*ps.values(), pm):
            p.grad = torch.randn(p.shape, generator=g, dtype=DT)
        opt.step()
    return ({k: {n: v.clone() for n, v in opt.state[p].items()} for k, p in ps.items()},
            {n: v.clone() for n, v in opt.state[pm].items()})


def _torch_step(params, state, m_state, grad_g, grad_u, u_m, lam, clip, scope):
    """The reference: torch.optim.AdamW after clip_grad_norm_ over θ_S and a θ_M parameter with gradient −λ·u_M."""
    ps = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    pm = torch.zeros(M_SIZE, dtype=DT, requires_grad=True)
    opt = torch.optim.AdamW([*ps.values(), pm], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    if state is not None:
        for k, p in ps.items():
            opt.state[p] = {n: v.clone() for n, v in state[k].items()}
        opt.state[pm] = {n: v.clone() for n, v in m_state.items()}
    for k, p in ps.items():
        p.grad = -(grad_g[k] + lam * grad_u[k])
    pm.grad = -lam * u_m
    if clip > 0:
        if scope == "global":
            torch.nn.utils.clip_grad_norm_([*ps.values(), pm], clip)
        else:
            torch.nn.utils.clip_grad_norm_(list(ps.values()), clip)
            if scope == "separate":
                torch.nn.utils.clip_grad_norm_([pm], clip)
    opt.step()
    return {k: p.detach() for k, p in ps.items()}


def _buffers(state):
    if state is None:
        return None, None, 0
    return ({k: s["exp_avg"] for k, s in state.items()}, {k: s["exp_avg_sq"] for k, s in state.items()},
            int(next(iter(state.values()))["step"]))


@pytest.mark.parametrize("steps", [0, 3])
@pytest.mark.parametrize("scope", ["global", "shared", "separate"])
def test_adamw_real_step_equals_torch_adamw_after_the_clip(steps, scope):
    """Inside and outside the clip interval, at step 0 and after a few real steps, with weight decay."""
    params, grad_g, grad_u, u_m = _problem(1)
    state, m_state = _state_after(params, steps, 2, u_m)
    gg = float(sum((t**2).sum() for t in grad_g.values()))
    for clip in (0.0, 0.5 * math.sqrt(gg), 2.0 * math.sqrt(gg)):  # none, active at λ = 0, inactive at λ = 0
        rs = RealStep(params, grad_g, grad_u, *_buffers(state), LR, BETAS, EPS, WD, clip, float((u_m**2).sum()), scope)
        lo, hi = rs.lambda_clip
        lams = [-4.0, -0.3, 0.0, 0.2, 1.5, 6.0]
        if math.isfinite(hi):  # both sides of each boundary
            lams += [lo * 1.01, lo * 0.99, hi * 0.99, hi * 1.01]
        for lam in lams:
            ref = _torch_step(params, state, m_state, grad_g, grad_u, u_m, lam, clip, scope)
            ours = adamw_real_step(params, grad_g, grad_u, *_buffers(state), LR, BETAS, EPS, WD, clip,
                                   float((u_m**2).sum()), lam, clip_scope=scope)
            torch.testing.assert_close(flatten(ours), flatten(ref), rtol=1e-13, atol=1e-15)


def test_lambda_clip_is_where_the_clip_factor_leaves_the_step_alone():
    params, grad_g, grad_u, u_m = _problem(3)
    gg = float(sum((t**2).sum() for t in grad_g.values()))
    rs = RealStep(params, grad_g, grad_u, None, None, 0, LR, BETAS, EPS, WD, 2 * math.sqrt(gg), float((u_m**2).sum()))
    lo, hi = rs.lambda_clip
    assert lo < 0 < hi
    inside = np.linspace(lo, hi, 7)[1:-1]
    assert all(float(rs.clip_factor(x)) == 1.0 for x in inside)
    assert float(rs.clip_factor(hi * 1.001)) < 1.0 and float(rs.clip_factor(lo * 1.001)) < 1.0


def test_the_result_is_differentiable_in_a_0d_lambda():
    params, grad_g, grad_u, u_m = _problem(4)
    state, _ = _state_after(params, 2, 5, u_m)
    lam = torch.tensor(0.3, dtype=DT, requires_grad=True)
    out = adamw_real_step(params, grad_g, grad_u, *_buffers(state), LR, BETAS, EPS, WD, 1.0, 0.5, lam)
    (d,) = torch.autograd.grad(sum(t.sum() for t in out.values()), lam)
    h = 1e-6
    fd = (sum(t.sum() for t in adamw_real_step(params, grad_g, grad_u, *_buffers(state), LR, BETAS, EPS, WD, 1.0,
                                                 0.5, 0.3 + h).values())
          - sum(t.sum() for t in adamw_real_step(params, grad_g, grad_u, *_buffers(state), LR, BETAS, EPS, WD, 1.0,
                                                   0.5, 0.3 - h).values())) / (2 * h)
    assert float(d) == pytest.approx(float(fd), rel=1e-6)


def _fd_taylor(f, h):
    """Central differences of f at 0, Richardson-extrapolated (error O(h⁴))."""
    def d1(h):
        return (f(h) - f(-h)) / (2 * h)

    def d2(h):
        return (f(h) - 2 * f(0.0) + f(-h)) / h**2

    return (4 * d1(h / 2) - d1(h)) / 3, (4 * d2(h / 2) - d2(h)) / 3


@pytest.mark.parametrize("where", ["no_clip", "active_at_0", "inactive_at_0"])
@pytest.mark.parametrize("steps", [0, 3])
def test_real_step_taylor_equals_central_differences(where, steps):
    """α = dΔ/dλ and β = d²Δ/dλ² of Δ(λ) = J(θ⁺(λ)) − J(θ⁺(0)) on a smooth non-quadratic J (rel 1e-4)."""
    prob = SoftmaxPolicy(seed=6)
    params = prob.params
    # u small beside g: at step 0 (a sign step) the curve is smooth only while no coordinate of g + λu changes sign
    g_, u_ = random_params(gen(7), prob.shapes), random_params(gen(8), prob.shapes, 0.02)
    u_m = torch.randn(M_SIZE, generator=gen(9), dtype=DT)
    state = None
    if steps:  # a few real steps of AdamW on random gradients
        state, _ = _state_after_shapes(params, steps)
    norm = math.sqrt(float(sum((t**2).sum() for t in g_.values())))
    clip = {"no_clip": 0.0, "active_at_0": 0.5 * norm, "inactive_at_0": 3.0 * norm}[where]
    args = (params, g_, u_, *_buffers(state), 0.05, BETAS, EPS, WD, clip, 0.02 * float((u_m**2).sum()))
    tay = real_step_taylor(prob.rl_objective, *args)
    base = float(prob.rl_objective(adamw_real_step(*args, 0.0)))
    h = 0.03 if steps == 0 else 0.1  # inside the smooth range, past float64 cancellation in Δ
    alpha, beta = _fd_taylor(lambda lam: float(prob.rl_objective(adamw_real_step(*args, lam))) - base, h)
    assert tay.alpha == pytest.approx(alpha, rel=1e-4)
    assert tay.beta == pytest.approx(beta, rel=1e-4)
    assert tay.clip_active == (where == "active_at_0")


def _state_after_shapes(params, steps):
    g = gen(11)
    ps = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    opt = torch.optim.AdamW(list(ps.values()), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for _ in range(steps):
        for p in ps.values():
            p.grad = 0.3 * torch.randn(p.shape, generator=g, dtype=DT)
        opt.step()
    return {k: {n: v.clone() for n, v in opt.state[p].items()} for k, p in ps.items()}, None


def test_curve_taylor_on_a_quadratic_is_exact():
    """J quadratic: along a line J(p + t·d1) − J(p) = t·α + ½t²·β exactly; with curvature d2, β = d1ᵀA d1 + ∇Jᵀd2
    from the closed-form gradient and Hessian A."""
    from theory_problems import quadratic

    g = gen(12)
    params = random_params(g, SHAPES)
    J = quadratic(g, params, "indefinite")
    d1, d2 = random_params(g, SHAPES), random_params(g, SHAPES)
    zero = {k: torch.zeros_like(t) for k, t in params.items()}
    (line, curved) = curve_taylor(J, params, [(d1, zero), (d1, d2)])
    for t in (-2.0, 0.5, 3.0):
        assert float(J(axpy(t, d1, params)) - J(params)) == pytest.approx(t * line[0] + 0.5 * t * t * line[1],
                                                                          rel=1e-10)
    grad = flatten(J.grad(params))
    assert curved[0] == pytest.approx(float(grad @ flatten(d1)), rel=1e-12)
    assert curved[1] == pytest.approx(float(flatten(d1) @ J.hess @ flatten(d1) + grad @ flatten(d2)), rel=1e-10)


def test_lambda_star_clamped_follows_the_clip_interval():
    from occ_theory.theory.step import RealStepTaylor

    inside = RealStepTaylor(alpha=1.0, beta=-0.1, clip_active=False, lambda_clip=(-2.0, 3.0))
    assert inside.lambda_star == pytest.approx(10.0) and inside.lambda_star_clamped == 3.0
    convex = RealStepTaylor(alpha=-1.0, beta=0.5, clip_active=False, lambda_clip=(-2.0, 3.0))
    assert math.isnan(convex.lambda_star) and convex.lambda_star_clamped == -2.0
    active = RealStepTaylor(alpha=1.0, beta=-0.1, clip_active=True, lambda_clip=(0.5, 3.0))
    assert active.lambda_star_clamped == pytest.approx(10.0)  # the clip already acts: no kink to clamp to
    free = RealStepTaylor(alpha=1.0, beta=0.2, clip_active=False, lambda_clip=(-math.inf, math.inf))
    assert math.isnan(free.lambda_star_clamped)


def test_detach_real_curve_is_the_clip_alone():
    """u = 0 on θ_S: θ⁺(λ) is the λ = 0 step with g rescaled by the clip factor f(λ), which θ_M's gradient enters
    under the global scope; under the separate scope it does not move at all."""
    params, grad_g, _, u_m = _problem(13)
    zero = {k: torch.zeros_like(t) for k, t in params.items()}
    state, _ = _state_after(params, 3, 14, u_m)
    gg = float(sum((t**2).sum() for t in grad_g.values()))
    clip, m_sq = 2 * math.sqrt(gg), float((u_m**2).sum())
    rs = RealStep(params, grad_g, zero, *_buffers(state), LR, BETAS, EPS, WD, clip, m_sq, "global")
    for lam in (-30.0, -1.0, 0.0, 2.0, 50.0):
        f = float(rs.clip_factor(lam))
        clip_only = adamw_real_step(params, {k: f * t for k, t in grad_g.items()}, zero, *_buffers(state), LR, BETAS,
                                    EPS, WD, 0.0, 0.0, 0.0)
        torch.testing.assert_close(flatten(rs.at(lam)), flatten(clip_only), rtol=1e-13, atol=1e-15)
    assert float(rs.clip_factor(50.0)) < 1.0  # far enough out, θ_M's gradient alone trips the clip
    sep = RealStep(params, grad_g, zero, *_buffers(state), LR, BETAS, EPS, WD, clip, m_sq, "separate")
    torch.testing.assert_close(flatten(sep.at(50.0)), flatten(sep.at(0.0)), rtol=0, atol=0)


def test_the_optimum_locator_finds_a_planted_maximum_a_quadratic_fit_misses():
    """A bounded, kinked, flat-topped curve (a clipped step's shape): the maximum planted off every grid point is
    found to within the refinement's tolerance; the vertex of a quadratic fitted to a wide grid is not."""
    peak = 0.4137

    def delta(lam):  # rises steeply, kinks at the peak, then saturates to a plateau below it
        return 2.0 * lam - 3.0 * lam * lam if lam < peak else 2.0 * peak - 3.0 * peak**2 - 0.05 * math.tanh(lam - peak)

    grid = optimum_grid(0.1, stars=[3.0], used=0.1, per_decade=5)
    assert peak not in grid
    opt = locate_maximum(delta, grid)
    assert opt.lam == pytest.approx(1 / 3, rel=1e-3) and not opt.at_edge  # 2λ − 3λ² peaks at 1/3 < the kink
    wide = np.linspace(-10, 10, 9)
    vertex = fit_quadratic(wide, [delta(x) for x in wide]).lambda_star
    assert not (0.5 < abs(vertex) / opt.lam < 2.0)


def test_the_optimum_locator_breaks_ties_at_the_smallest_lambda_and_says_when_it_is_at_the_edge():
    flat = locate_maximum(lambda lam: 0.0, [-1.0, 0.0, 1.0])
    assert flat.lam == 0.0 and flat.delta == 0.0
    rising = locate_maximum(lambda lam: lam, optimum_grid(1.0, per_decade=2))
    assert rising.at_edge and rising.lam == pytest.approx(3.0)
    nan = locate_maximum(lambda lam: math.nan, [0.0, 1.0])
    assert math.isnan(nan.lam)
    with pytest.raises(ValueError, match="scale"):
        optimum_grid(float("nan"))


@pytest.mark.parametrize("scope", ["global", "shared", "separate"])
def test_the_probes_replay_of_the_optimizer_is_the_real_step(scope):
    """The probe's ground truth (torch's optimizer replayed from a copy of its state, ``real_step_params``) and the
    differentiable ``RealStep`` the adam_real Taylor series expands are the same step."""
    from occ_theory.diagnostics.probe import OptimizerSnapshot
    from occ_theory.diagnostics.realstep import real_step, real_step_params

    params, grad_g, grad_u, u_m = _problem(15)
    state, _ = _state_after(params, 3, 16, u_m)
    gg = float(sum((t**2).sum() for t in grad_g.values()))
    snap = OptimizerSnapshot("adamw", LR, BETAS, EPS, WD, state, grad_clip=1.5 * math.sqrt(gg), clip_scope=scope)
    m_sq = float((u_m**2).sum())
    rs = real_step(params, grad_g, grad_u, snap, m_sq)
    for lam in (-5.0, 0.0, 0.4, 3.0):
        replay = real_step_params(params, grad_g, grad_u, lam, snap, lam * lam * m_sq)
        torch.testing.assert_close(flatten(rs.at(lam)), flatten(replay), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("steps", [0, 3])
@pytest.mark.parametrize("clip_at", [0.0, 0.5, 3.0])  # none, active at λ = 0, inactive (× ‖g‖)
def test_the_step_derivatives_equal_forward_mode_through_the_step(steps, clip_at):
    """``RealStep.derivatives`` (the chain rule by hand, fast) against torch's nested forward-mode differentiation of
    ``RealStep.at`` (the brute-force reference), including coordinates with no gradient and no second moment."""
    params, grad_g, grad_u, u_m = _problem(17)
    state, _ = _state_after(params, steps, 18, u_m)
    grad_g["b"][0] = grad_u["b"][0] = 0.0  # a coordinate the loss never reaches
    gg = float(sum((t**2).sum() for t in grad_g.values()))
    rs = RealStep(params, grad_g, grad_u, *_buffers(state), LR, BETAS, EPS, WD, clip_at * math.sqrt(gg),
                  float((u_m**2).sum()))
    zero, one = torch.zeros((), dtype=DT), torch.ones((), dtype=DT)
    (theta0, d1), (_, d2) = torch.func.jvp(lambda lam: torch.func.jvp(rs.at, (lam,), (one,)), (zero,), (one,))
    for mine, ref in zip(rs.derivatives(), (theta0, d1, d2)):
        torch.testing.assert_close(flatten(mine), flatten(ref), rtol=1e-10, atol=1e-14)
