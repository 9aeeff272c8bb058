"""The identities of docs/theory.md section 2, against brute force in float64."""

import math

import numpy as np
import pytest
import torch
from theory_problems import DT, SoftmaxPolicy, flat_grad, flat_grad_and_hessian, gen, quadratic, random_params

from occ_theory.theory import decompose, decompose_geometries, fisher_curvature, measure_delta
from occ_theory.theory.decompose import REASON_NOT_CONCAVE, REASON_U_ZERO
from occ_theory.theory.params import axpy, dot, flatten, mul, unflatten

SHAPES = {"w": (3, 2), "b": (4,)}


def _precond(g, like, use):
    return {k: 0.2 + torch.rand(t.shape, generator=g, dtype=DT) for k, t in like.items()} if use else None


@pytest.mark.parametrize("kind", ["indefinite", "negdef"])
@pytest.mark.parametrize("use_precond", [False, True])
def test_identity1_quadratic_exact(kind, use_precond):
    """Identity 1: for exactly quadratic J and M, Δ(λ) equals the second-order formula."""
    g = gen(1)
    params = random_params(g, SHAPES)
    J, M = quadratic(g, params, kind), quadratic(g, params, "indefinite")
    precond = _precond(g, params, use_precond)
    lams = np.array([-3.0, -1.0, -0.25, 0.0, 0.5, 1.0, 2.0, 7.0])
    for lr in (1e-3, 0.05, 0.3, 1.0):
        for method in ("fwd-rev", "rev-rev"):
            dec = decompose(J, M, params, lr, precond=precond, method=method)
            measured = measure_delta(J, M, params, lr, lams, precond=precond)
            model = dec.predicted_delta(lams)
            assert np.max(np.abs(measured - model)) <= 1e-10 * max(1.0, np.max(np.abs(measured)))


def test_quadratic_terms_match_closed_form():
    """C = gᵀPu, X = (Pg)ᵀA(Pu), Q = (Pu)ᵀA(Pu) with the analytic gradients and Hessian."""
    g = gen(2)
    params = random_params(g, SHAPES)
    J, M = quadratic(g, params, "indefinite"), quadratic(g, params, "negdef")
    precond = _precond(g, params, True)
    dec = decompose(J, M, params, 0.1, precond=precond)
    gr, u = J.grad(params), M.grad(params)
    pg, pu = flatten(mul(gr, precond)), flatten(mul(u, precond))
    assert dec.corr == pytest.approx(float(dot(gr, mul(u, precond))), rel=1e-12)
    assert dec.cross == pytest.approx(float(pg @ J.hess @ pu), rel=1e-12)
    assert dec.curv == pytest.approx(float(pu @ J.hess @ pu), rel=1e-12)
    assert dec.pu_norm_sq == pytest.approx(float(pu @ pu), rel=1e-12)
    assert dec.proj == pytest.approx(dec.corr / float(pu @ pu), rel=1e-12)
    assert dec.lambda_bal == pytest.approx(float(pg.norm() / pu.norm()), rel=1e-12)
    assert dec.geometry == "adam"


@pytest.mark.parametrize("method", ["fwd-rev", "rev-rev"])
@pytest.mark.parametrize("batched", [False, True])
def test_decompose_geometries_match_explicit_gradient_hessian_and_jacobian(method, batched):
    """Each geometry of one call against g, H and ∂l/∂θ built explicitly on the flattened parameters;
    the result carries its key as its geometry label."""
    prob = SoftmaxPolicy(seed=16)
    precond = _precond(gen(17), prob.params, True)
    lr = 0.05
    decs = decompose_geometries(prob.rl_objective, prob.mtp_objective, prob.params, lr,
                                {"sgd": None, "adam": precond}, method, prob.logp, prob.mask, batched=batched)
    g, hess = flat_grad_and_hessian(prob.rl_objective, prob.params)
    u = flat_grad(prob.mtp_objective, prob.params)
    jac = torch.func.jacrev(lambda x: prob.logp(unflatten(x, prob.params)))(flatten(prob.params))  # (B, T, n)
    for name, p in (("sgd", torch.ones_like(g)), ("adam", flatten(precond))):
        dec = decs[name]
        pg, pu = p * g, p * u
        delta = jac @ pu  # (B, T)
        assert dec.geometry == name
        assert dec.corr == pytest.approx(float(g @ pu), rel=1e-12)
        assert dec.cross == pytest.approx(float(pg @ hess @ pu), rel=1e-10)
        assert dec.curv == pytest.approx(float(pu @ hess @ pu), rel=1e-10)
        assert dec.curv_fisher == pytest.approx(-float((prob.mask * delta**2).sum() / prob.mask.sum()), rel=1e-10)
        assert dec.pu_norm_sq == pytest.approx(float(pu @ pu), rel=1e-12)
        assert dec.pg_norm == pytest.approx(float(pg.norm()), rel=1e-12)
        assert dec.g_norm == pytest.approx(float(g.norm()), rel=1e-12)
        assert dec.cosine == pytest.approx(float(g @ u / (g.norm() * u.norm())), rel=1e-12)


def test_identity2_taylor_residual_shrinks_like_lr_cubed():
    """Identity 2: on a smooth non-quadratic clipped surrogate, halving η divides the residual by ~8."""
    prob = SoftmaxPolicy(seed=3)
    lams = np.array([-2.0, -1.0, 0.5, 1.0, 2.0, 3.0])
    residuals = []
    for lr in (0.04, 0.02, 0.01, 0.005):
        dec = decompose(prob.rl_objective, prob.mtp_objective, prob.params, lr)
        measured = measure_delta(prob.rl_objective, prob.mtp_objective, prob.params, lr, lams)
        residuals.append(np.max(np.abs(measured - dec.predicted_delta(lams))))
    ratios = [residuals[i] / residuals[i + 1] for i in range(len(residuals) - 1)]
    assert len(ratios) >= 3
    for r in ratios:
        assert 6.0 <= r <= 10.0, (residuals, ratios)


def test_identity2_taylor_residual_shrinks_like_lr_cubed_in_preconditioned_geometry():
    prob = SoftmaxPolicy(seed=4)
    g = gen(5)
    precond = _precond(g, prob.params, True)
    lams = np.array([-1.0, 1.0, 2.0])
    residuals = []
    for lr in (0.08, 0.04, 0.02, 0.01):
        dec = decompose(prob.rl_objective, prob.mtp_objective, prob.params, lr, precond=precond)
        measured = measure_delta(prob.rl_objective, prob.mtp_objective, prob.params, lr, lams, precond=precond)
        residuals.append(np.max(np.abs(measured - dec.predicted_delta(lams))))
    for i in range(3):
        assert 6.0 <= residuals[i] / residuals[i + 1] <= 10.0, residuals


def test_lambda_star_is_argmax_of_dense_sweep_when_concave():
    g = gen(6)
    params = random_params(g, SHAPES)
    J, M = quadratic(g, params, "negdef"), quadratic(g, params, "indefinite")
    dec = decompose(J, M, params, 0.2)
    assert dec.concave and dec.reason == ""
    span = 4 * abs(dec.lambda_star) + 1
    sweep = np.linspace(dec.lambda_star - span, dec.lambda_star + span, 200_001)
    best = sweep[np.argmax(dec.predicted_delta(sweep))]
    assert best == pytest.approx(dec.lambda_star, abs=2 * span / 200_000)
    assert dec.predicted_delta([dec.lambda_star])[0] == pytest.approx(dec.gain_at_optimum, rel=1e-10)
    measured = measure_delta(J, M, params, 0.2, sweep[::2000])
    assert sweep[::2000][np.argmax(measured)] == pytest.approx(dec.lambda_star, abs=span / 50)


def test_first_order_lambda_star_is_the_argmax_of_the_mtp_step_alone():
    """λ*₁ = −C/(ηQ) drops the cross term X, which comes from taking the MTP step after the RL step:
    it is the optimum of J(θ + λ·η·Pu) − J(θ), the MTP step taken alone (exact for quadratic J)."""
    g = gen(60)
    params = random_params(g, SHAPES)
    J, M = quadratic(g, params, "negdef"), quadratic(g, params, "indefinite")
    precond = _precond(g, params, True)
    lr = 0.2
    dec = decompose(J, M, params, lr, precond=precond)
    assert dec.concave and abs(dec.lambda_star - dec.lambda_star_first_order) > 0.1 * abs(dec.lambda_star)
    pu = mul(M.grad(params), precond)
    span = 3 * abs(dec.lambda_star_first_order) + 1
    sweep = np.linspace(dec.lambda_star_first_order - span, dec.lambda_star_first_order + span, 2001)
    alone = [float(J(axpy(lr * float(lam), pu, params))) for lam in sweep]
    assert sweep[int(np.argmax(alone))] == pytest.approx(dec.lambda_star_first_order, abs=2 * span / 2000)


def test_lambda_star_undefined_when_u_is_zero():
    """Under detach u = 0: C = X = Q = 0, Δ ≡ 0, λ* is NaN with the reason."""
    g = gen(7)
    params = random_params(g, SHAPES)
    J = quadratic(g, params, "negdef")

    def no_mtp(p):
        return 0.0 * p["w"].sum() + 1.5

    dec = decompose(J, no_mtp, params, 0.1)
    assert (dec.corr, dec.cross, dec.curv) == (0.0, 0.0, 0.0)
    assert math.isnan(dec.lambda_star) and math.isnan(dec.lambda_star_first_order) and math.isnan(dec.proj)
    assert not dec.concave and dec.reason == REASON_U_ZERO
    assert np.all(measure_delta(J, no_mtp, params, 0.1, [-1.0, 1.0, 5.0]) == 0.0)
    assert np.all(dec.predicted_delta([-1.0, 3.0]) == 0.0)


def test_lambda_star_undefined_when_curvature_is_not_negative():
    g = gen(8)
    params = random_params(g, SHAPES)
    J, M = quadratic(g, params, "posdef"), quadratic(g, params, "indefinite")
    dec = decompose(J, M, params, 0.1)
    assert dec.curv > 0 and not dec.concave
    assert math.isnan(dec.lambda_star) and math.isnan(dec.gain_at_optimum)
    assert dec.reason == REASON_NOT_CONCAVE
    assert math.isfinite(dec.proj)


def _fisher_problem(seed=9, contexts=5, dim=3, vocab=4):
    """A softmax model that samples its own targets: every outcome enumerated, weighted by its probability."""
    g = gen(seed)
    params = random_params(g, {"w": (dim, vocab), "b": (vocab,)})
    x = torch.randn(contexts, dim, generator=g, dtype=DT)

    def logp_fn(p):
        return torch.log_softmax(x @ p["w"] + p["b"], -1)  # (B=contexts, T=outcomes)

    weights = logp_fn(params).exp().detach()  # p_θ0(y|x) as the mask weight

    def expected_loglik(p):
        return (weights * logp_fn(p)).sum() / weights.sum()

    other = random_params(g, {"w": (dim, vocab), "b": (vocab,)})

    def mtp(p):
        return dot(other, p) + 0.1 * (p["w"] ** 3).sum()

    return params, logp_fn, weights, expected_loglik, mtp


@pytest.mark.parametrize("use_precond", [False, True])
def test_fisher_curvature_equals_exact_curvature_of_expected_loglik(use_precond):
    """Fisher identity: E_p[∇² log p] = −E_p[∇log p ∇log pᵀ], so Q_F = Q for the self-sampling model."""
    params, logp_fn, weights, expected_loglik, mtp = _fisher_problem()
    precond = _precond(gen(10), params, use_precond)
    dec = decompose(expected_loglik, mtp, params, 0.1, precond=precond, logp_fn=logp_fn, mask=weights)
    assert dec.curv < 0
    assert dec.curv_fisher == pytest.approx(dec.curv, rel=1e-9)
    assert dec.lambda_star_fisher == pytest.approx(dec.lambda_star_first_order, rel=1e-9)


def test_fisher_curvature_equals_finite_difference_of_logprobs():
    """Q_F = −masked mean of ((l(θ+εPu) − l(θ−εPu)) / 2ε)²."""
    prob = SoftmaxPolicy(seed=11)
    g = gen(12)
    precond = _precond(g, prob.params, True)
    dec = decompose(prob.rl_objective, prob.mtp_objective, prob.params, 0.05, precond=precond,
                    logp_fn=prob.logp, mask=prob.mask)
    from occ_theory.theory import grad

    pu = mul(grad(prob.mtp_objective, prob.params)[1], precond)
    eps = 1e-5
    plus = prob.logp({k: t + eps * pu[k] for k, t in prob.params.items()})
    minus = prob.logp({k: t - eps * pu[k] for k, t in prob.params.items()})
    delta_fd = (plus - minus) / (2 * eps)
    expected = -float((prob.mask * delta_fd**2).sum() / prob.mask.sum())
    assert dec.curv_fisher == pytest.approx(expected, rel=1e-7)
    assert fisher_curvature(dec.dlogp, prob.mask) == pytest.approx(expected, rel=1e-7)


def test_fisher_curvature_of_empty_mask_is_nan():
    assert math.isnan(fisher_curvature(torch.ones(2, 3), torch.zeros(2, 3)))
    with pytest.raises(ValueError, match="shape"):
        fisher_curvature(torch.ones(2, 3), torch.zeros(3, 2))


def test_decompose_rejects_bad_inputs_with_named_errors():
    g = gen(13)
    params = random_params(g, SHAPES)
    J, M = quadratic(g, params, "negdef"), quadratic(g, params, "negdef")
    with pytest.raises(ValueError, match="lr"):
        decompose(J, M, params, 0.0)
    with pytest.raises(ValueError, match="lr"):
        decompose(J, M, params, float("nan"))
    with pytest.raises(ValueError, match=r"precond\['b'\]"):
        decompose(J, M, params, 0.1, precond={"w": torch.ones(3, 2, dtype=DT), "b": torch.ones(5, dtype=DT)})
    with pytest.raises(ValueError, match="missing"):
        decompose(J, M, params, 0.1, precond={"w": torch.ones(3, 2, dtype=DT)})
    with pytest.raises(ValueError, match="non-negative"):
        decompose(J, M, params, 0.1, precond={"w": -torch.ones(3, 2, dtype=DT), "b": torch.ones(4, dtype=DT)})
    with pytest.raises(ValueError, match="together"):
        decompose(J, M, params, 0.1, logp_fn=lambda p: p["w"])
    with pytest.raises(ValueError, match="HVP method"):
        decompose(J, M, params, 0.1, method="magic")


def test_measure_delta_on_held_out_objective_uses_training_directions():
    """eval_objective scores the update built from the *training* batch's g and u on another batch:
    equal to the brute-force held-out Δ along the training directions, unlike the held-out batch's own."""
    prob, held = SoftmaxPolicy(seed=14), SoftmaxPolicy(seed=15)
    held.params = prob.params
    lams, lr = [-1.0, 0.0, 2.0], 0.05
    measured = measure_delta(prob.rl_objective, prob.mtp_objective, prob.params, lr, lams,
                             eval_objective=held.rl_objective)

    def brute(rl, mtp):  # held-out Δ along the step built from (∇rl, ∇mtp)
        g, u = (unflatten(flat_grad(f, prob.params), prob.params) for f in (rl, mtp))
        base = axpy(lr, g, prob.params)
        return np.array([float(held.rl_objective(axpy(lr * lam, u, base)) - held.rl_objective(base)) for lam in lams])

    train = brute(prob.rl_objective, prob.mtp_objective)
    own = brute(held.rl_objective, held.mtp_objective)
    assert np.allclose(measured, train, rtol=1e-12, atol=1e-15)
    assert not np.allclose(measured, own, rtol=1e-3)
