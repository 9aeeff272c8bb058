"""The measured-curve fit Δ(λ) ≈ α·λ + ½·β·λ² and the λ grid (docs/theory.md section 5)."""

import math

import numpy as np
import pytest

from occ_theory.theory import bootstrap_quadratic, effective_smoothness, fit_quadratic, lambda_grid


def test_fit_recovers_exact_coefficients_without_noise():
    lams = np.linspace(-2, 3, 9)
    fit = fit_quadratic(lams, 0.7 * lams + 0.5 * -1.3 * lams**2)
    assert fit.alpha == pytest.approx(0.7, abs=1e-12)
    assert fit.beta == pytest.approx(-1.3, abs=1e-12)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.concave and fit.lambda_star == pytest.approx(0.7 / 1.3)
    assert fit.gain_at_optimum == pytest.approx(0.7**2 / 2.6)


def test_fit_recovers_noisy_coefficients_within_standard_errors():
    """Over many noisy synthetic curves the truth lies within 2 SE about 95% of the time."""
    rng = np.random.default_rng(0)
    lams = np.linspace(-3, 3, 13)
    alpha, beta = 0.4, -0.9
    hits_a = hits_b = 0
    trials = 400
    for _ in range(trials):
        y = alpha * lams + 0.5 * beta * lams**2 + rng.normal(0, 0.3, lams.size)
        fit = fit_quadratic(lams, y)
        hits_a += abs(fit.alpha - alpha) < 2 * fit.alpha_se
        hits_b += abs(fit.beta - beta) < 2 * fit.beta_se
    assert 0.88 <= hits_a / trials <= 0.99
    assert 0.88 <= hits_b / trials <= 0.99


def test_fit_flags_convex_and_flat_curves():
    lams = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    convex = fit_quadratic(lams, 0.2 * lams + 0.5 * 0.8 * lams**2)
    assert not convex.concave and math.isnan(convex.lambda_star) and "convex" in convex.reason
    flat = fit_quadratic(lams, np.zeros(5))
    assert not flat.concave and math.isnan(flat.lambda_star) and math.isnan(flat.r2) and "flat" in flat.reason


def test_fit_rejects_degenerate_grids():
    with pytest.raises(ValueError, match="two distinct nonzero"):
        fit_quadratic([0.0, 1.0, 1.0], [0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="entries"):
        fit_quadratic([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        fit_quadratic([1.0, 2.0, 3.0], [1.0, float("nan"), 2.0])


def test_effective_smoothness_inverts_the_smoothness_model():
    lr, u2, big_l = 0.01, 4.0, 3.0
    beta = -big_l * lr**2 * u2
    assert effective_smoothness(beta, lr, u2) == pytest.approx(big_l)
    assert math.isnan(effective_smoothness(beta, lr, 0.0))


def test_lambda_grid_brackets_scale_and_holds_zero_negatives_and_used():
    grid = lambda_grid(scale=0.4, used=2.0, n=9, span=3.0)
    assert 0.0 in grid and 0.4 in grid and 2.0 in grid
    assert grid.min() <= -1.2 and grid.max() >= 2.0
    assert np.all(np.diff(grid) > 0)
    wide = lambda_grid(scale=-5.0, n=7)
    assert wide.min() == pytest.approx(-15.0) and wide.max() == pytest.approx(15.0)


def test_lambda_grid_falls_back_to_default_range_without_finite_estimate():
    for scale in (float("nan"), float("inf"), 0.0):
        grid = lambda_grid(scale, n=5, default=2.0)
        assert grid.min() == pytest.approx(-2.0) and grid.max() == pytest.approx(2.0) and 0.0 in grid
    with pytest.raises(ValueError, match="n must be"):
        lambda_grid(1.0, n=2)


def test_bootstrap_intervals_have_the_delta_method_width_and_cover_the_truth():
    """Resampling sequences of a token-mean curve: the fit's α is the ratio estimator Σ w·a / Σ w, whose
    standard error has the closed (delta-method) form sqrt(Σ w²(a − ā)²) / Σ w; the 95% percentile
    interval is about ±1.96 of it, for α and β alike, and covers the truth."""
    rng = np.random.default_rng(1)
    lams = np.linspace(-2, 2, 9)
    seqs = 200
    weights = rng.integers(1, 6, seqs).astype(float)
    alpha, beta = 0.5, -1.0
    a_s = alpha + rng.normal(0, 0.5, seqs)
    b_s = beta + rng.normal(0, 0.5, seqs)
    seq_deltas = weights[None, :] * (a_s[None, :] * lams[:, None] + 0.5 * b_s[None, :] * lams[:, None] ** 2)
    ci = bootstrap_quadratic(lams, seq_deltas, weights, n_boot=400, seed=2, level=0.95)
    for key, per_seq, truth in (("alpha", a_s, alpha), ("beta", b_s, beta)):
        mean = np.sum(weights * per_seq) / weights.sum()
        se = np.sqrt(np.sum(weights**2 * (per_seq - mean) ** 2)) / weights.sum()
        lo, hi = ci[key]
        assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.2), key
        assert (lo + hi) / 2 == pytest.approx(mean, abs=0.3 * se), key
        assert lo < truth < hi, key
    lo, hi = ci["lambda_star"]
    assert lo < -alpha / beta < hi
    with pytest.raises(ValueError, match="shape"):
        bootstrap_quadratic(lams, seq_deltas[:, :5], weights)


def test_grid_half_width_follows_theory_and_caps_only_when_asked():
    from occ_theory.diagnostics.curve import grid_half_width
    from occ_theory.theory import Decomposition

    def dec(corr, curv, pg=2.0, u_sq=4.0):  # λ_bal = ‖Pg‖/‖Pu‖ = 1
        return Decomposition(lr=0.1, corr=corr, cross=0.0, curv=curv, g_norm=1.0, u_norm=1.0, cosine=0.5,
                             pu_norm_sq=u_sq, pg_norm=pg)

    d = dec(1.0, -1.0)  # λ* = −C/(ηQ) = 10
    assert d.lambda_star == pytest.approx(10.0) and d.lambda_bal == pytest.approx(1.0)
    assert grid_half_width(d, span=3.0, cap=0.0) == (None, False)  # the caller uses span·|λ*| = 30
    assert grid_half_width(d, span=3.0, cap=100.0) == (pytest.approx(30.0), False)
    assert grid_half_width(d, span=3.0, cap=5.0) == (pytest.approx(5.0), True)
    assert grid_half_width(dec(1.0, 1.0), span=3.0, cap=5.0) == (pytest.approx(5.0), True)  # no finite λ*
    grid = lambda_grid(10.0, used=0.1, n=5, half_width=5.0)
    assert grid.max() == pytest.approx(5.0) and 10.0 not in grid and 0.1 in grid
