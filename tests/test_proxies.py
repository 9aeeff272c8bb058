"""The OCC proxies (docs/theory.md section 4) against hand-computed examples."""

import pytest
import torch

from occ_theory.theory import proxies

NAN = float("nan")


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# one response of two tokens plus one padding position (zeros in every tensor, as the trainer fills it)
LOGP = t([[-1.0, -2.0, 0.0]])
OLD = t([[-1.5, -2.5, 0.0]])
MTP = t([[-1.2, -3.5, 0.0]])
MASK = t([[1.0, 1.0, 0.0]])


def test_reference_is_unmasked_mean_of_ratios_with_1e_8():
    # dq = q − l_old = (0.3, −1.0, 0), dl = l − l_old = (0.5, 0.5, 0); the padding ratio is 0/(0+1e-8) = 0
    by_hand = (0.3 * 0.5 / (0.09 + 1e-8) + (-1.0 * 0.5) / (1.0 + 1e-8) + 0.0) / 3
    assert proxies.reference(LOGP, OLD, MTP, base_coef=1.0) == pytest.approx(by_hand, rel=1e-6)
    assert proxies.reference(LOGP, OLD, MTP, base_coef=0.6, num_depths=3) == pytest.approx(0.2 * by_hand, rel=1e-6)


def test_reference_is_zero_on_the_first_update_after_a_rollout():
    """l = l_old on the first minibatch, so the public implementation's λ is exactly 0."""
    assert proxies.reference(OLD, OLD, MTP, base_coef=1.0) == 0.0


def test_reference_counts_padding_in_the_mean():
    padded = [torch.cat([x, torch.zeros(1, 3)], dim=1) for x in (LOGP, OLD, MTP)]
    assert proxies.reference(*padded, 1.0) == pytest.approx(proxies.reference(LOGP, OLD, MTP, 1.0) / 2, rel=1e-6)


def test_reference_refuses_non_finite_inputs():
    with pytest.raises(ValueError, match="finite"):
        proxies.reference(LOGP, OLD, t([[-1.2, NAN, 0.0]]), 1.0)


def test_least_squares_is_masked_ratio_of_sums():
    by_hand = (0.3 * 0.5 + (-1.0) * 0.5) / (0.3**2 + 1.0**2 + 1e-8)
    assert proxies.least_squares(LOGP, OLD, MTP, MASK, base_coef=1.0) == pytest.approx(by_hand, rel=1e-6)
    assert proxies.least_squares(LOGP, OLD, MTP, MASK, 2.0, num_depths=2) == pytest.approx(by_hand, rel=1e-6)


def test_least_squares_ignores_masked_positions_even_when_non_finite():
    garbage = t([[-1.2, -3.5, NAN]])
    assert proxies.least_squares(t([[-1.0, -2.0, float("inf")]]), OLD, garbage, MASK, 1.0) == pytest.approx(
        proxies.least_squares(LOGP, OLD, MTP, MASK, 1.0))


def test_fisher_is_advantage_weighted_projection_over_lr():
    adv = torch.tensor([2.0])
    dlogp = t([[0.1, -0.2, NAN]])
    # Σ m·A·δ = 2·(0.1 − 0.2) = −0.2; Σ m·δ² = 0.01 + 0.04 = 0.05; λ = −0.2 / (0.5·0.05) = −8
    assert proxies.fisher(adv, dlogp, MASK, lr=0.5) == pytest.approx(-8.0, rel=1e-6)
    per_token = t([[2.0, 2.0, NAN]])
    assert proxies.fisher(per_token, dlogp, MASK, lr=0.5) == pytest.approx(-8.0, rel=1e-6)


def test_empty_masks_and_zero_denominators_give_zero_not_nan():
    empty = torch.zeros_like(MASK)
    assert proxies.least_squares(LOGP, OLD, MTP, empty, 1.0) == 0.0
    assert proxies.fisher(torch.tensor([1.0]), t([[0.1, 0.2, 0.3]]), empty, 0.1) == 0.0
    assert proxies.fisher(torch.tensor([1.0]), torch.zeros(1, 3), MASK, 0.1) == 0.0
    assert proxies.least_squares(LOGP, OLD, OLD, MASK, 1.0) == 0.0  # q − l_old all zero
    assert proxies.reference(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3), 1.0) == 0.0
    # without the ε that hides it, 0/0 would be NaN: the zero-denominator rule itself gives 0
    assert proxies.least_squares(LOGP, OLD, OLD, MASK, 1.0, eps=0.0) == 0.0
    assert proxies.least_squares(LOGP, OLD, MTP, empty, 1.0, eps=0.0) == 0.0


def test_terms_summed_over_shards_equal_the_whole_batch():
    """What a multi-process run all-reduces: the sums of two halves give the global coefficient."""
    g = torch.Generator().manual_seed(0)
    lp, old, q = (torch.randn(6, 5, generator=g) for _ in range(3))
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    adv, d = torch.randn(6, generator=g), torch.randn(6, 5, generator=g)
    halves = [slice(0, 2), slice(2, 6)]
    for terms, whole, kw in (
        (proxies.least_squares_terms, proxies.least_squares(lp, old, q, mask, 1.0), {"eps": 1e-8}),
        (proxies.reference_terms, proxies.reference(lp, old, q, 1.0), {}),
    ):
        args = [(lp[s], old[s], q[s], mask[s]) if terms is proxies.least_squares_terms else (lp[s], old[s], q[s])
                for s in halves]
        parts = [terms(*a) for a in args]
        num, den = sum(p[0] for p in parts), sum(p[1] for p in parts)
        assert proxies.from_terms(num, den, **kw) == pytest.approx(whole, rel=1e-12)
    parts = [proxies.fisher_terms(adv[s], d[s], mask[s]) for s in halves]
    num, den = sum(p[0] for p in parts), sum(p[1] for p in parts)
    assert proxies.from_terms(num, den, scale=1 / 0.3) == pytest.approx(proxies.fisher(adv, d, mask, 0.3), rel=1e-12)


def test_proxies_validate_shapes_and_settings():
    with pytest.raises(ValueError, match="old_logp has shape"):
        proxies.reference(LOGP, t([[1.0, 2.0]]), MTP, 1.0)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        proxies.least_squares(LOGP[0], OLD[0], MTP[0], MASK[0], 1.0)
    with pytest.raises(ValueError, match="num_depths"):
        proxies.reference(LOGP, OLD, MTP, 1.0, num_depths=0)
    with pytest.raises(ValueError, match="lr"):
        proxies.fisher(torch.ones(1), LOGP, MASK, lr=0.0)
    with pytest.raises(ValueError, match="advantages"):
        proxies.fisher(torch.ones(3), LOGP, MASK, lr=0.1)
