"""Coefficient rules beyond OCC (docs/theory.md section 4), each on a problem whose answer is known."""

import math

import pytest
import torch
from rl_fixtures import make_checkpoint, rl_trainer, with_signal

from occ_theory.rl.coef import SHARED_RULES, STEP_RULES, CoefficientRule, shared_update

G = {"a": torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64), "b": torch.tensor([[0.5, -1.0]], dtype=torch.float64)}


def _with(*values):
    return {"a": torch.tensor(values[:3], dtype=torch.float64), "b": torch.tensor([values[3:]], dtype=torch.float64)}


def _flat(d):
    return torch.cat([t.reshape(-1) for t in d.values()])


@pytest.mark.parametrize("rule", ["cosine", "cosine_weighted"])
def test_cosine_rules_drop_the_mtp_gradient_when_it_conflicts(rule):
    conflicting = _with(-1.0, 0.5, -1.0, 0.0, 1.0)  # gᵀu = -1 - 2 - 1 < 0
    upd = shared_update(rule, G, conflicting, 0.3)
    assert upd.cosine < 0 and upd.weight_u == 0.0 and upd.lambda_effective == 0.0
    assert torch.equal(_flat(upd.d), _flat(G))


def test_cosine_rules_keep_or_weigh_an_agreeing_mtp_gradient():
    agreeing = _with(1.0, 1.0, 1.0, 0.0, 0.0)
    cos = float(_flat(G) @ _flat(agreeing)) / float(_flat(G).norm() * _flat(agreeing).norm())
    assert shared_update("cosine", G, agreeing, 0.3).lambda_effective == 0.3
    weighted = shared_update("cosine_weighted", G, agreeing, 0.3)
    assert weighted.lambda_effective == pytest.approx(0.3 * cos, rel=1e-12)
    torch.testing.assert_close(_flat(weighted.d), _flat(G) + 0.3 * cos * _flat(agreeing))


@pytest.mark.parametrize("rule", ["pcgrad", "upgrad"])
@pytest.mark.parametrize("u_values", [(-1.0, 0.5, -1.0, 0.0, 1.0), (1.0, 1.0, 1.0, 0.0, 0.0)])
def test_surgery_rules_realise_torchjds_aggregation_of_the_two_loss_gradients(rule, u_values):
    """The realised update equals torchjd's aggregator applied to the matrix of loss gradients [−g; −c·u]."""
    pytest.importorskip("torchjd")
    from occ_theory.rl.coef import aggregator

    u, c = _with(*u_values), 0.7
    upd = shared_update(rule, G, u, c)
    matrix = torch.stack([-_flat(G), -c * _flat(u)])
    expected = -aggregator(rule)(matrix)  # the descent direction, negated: an ascent direction of J
    torch.testing.assert_close(_flat(upd.d), expected, rtol=1e-6, atol=1e-9)
    if rule == "pcgrad" and upd.cosine > 0:  # no conflict: PCGrad is the plain sum g + c·u
        assert upd.weight_g == pytest.approx(1.0) and upd.lambda_effective == pytest.approx(c)


def test_rule_names_and_what_they_need():
    for rule in STEP_RULES:
        r = CoefficientRule(rule, 0.1)
        assert r.name == rule and r.needs_mtp_grad and not r.edits_shared
    for rule in SHARED_RULES:
        r = CoefficientRule(rule, 0.2)
        assert r.edits_shared and r.needs_mtp_grad and r().value == 0.2  # mtp_coef stays in the loss


@pytest.mark.parametrize("rule", STEP_RULES)
def test_step_rules_apply_zero_where_undefined_clip_bound_and_hold_their_value(rule):
    from occ_theory.rl.coef import CoefInputs

    r = CoefficientRule(rule, 0.1, clip=(-5.0, 5.0), bound=3.0, every=2)
    calls = []

    def value(v):
        return CoefInputs(**{rule: lambda: calls.append(v) or v})

    assert r(value(float("nan"))).value == 0.0 and r.undefined == 1
    assert r.needs_mtp_grad_now is False  # the next step holds: no u needed
    held = r(value(40.0))
    assert held.value == 0.0 and held.held and len(calls) == 1  # held, not recomputed
    assert r.needs_mtp_grad_now
    assert r(value(40.0)).value == 3.0  # clipped to 5, then bounded by rl.coef_max
    assert r(value(-1.0)).value == 3.0 and len(calls) == 2
    state = r.state_dict()
    again = CoefficientRule(rule, 0.1, clip=(-5.0, 5.0), bound=3.0, every=2)
    again.load_state_dict(state)
    assert again(value(-1.0)).value == -1.0 and again._calls == r._calls + 1


def test_the_fisher_rule_is_bounded_and_waits_for_the_optimizer_state():
    from occ_theory.rl.coef import CoefInputs

    r = CoefficientRule("occ", 0.1, proxy="fisher", bound=10.0)
    assert r(CoefInputs(fisher=lambda: 1.3e5, first_step=True)).value == 0.0 and r.undefined == 1
    assert r(CoefInputs(fisher=lambda: 1.3e5)).value == 10.0
    assert r(CoefInputs(fisher=lambda: -0.5)).value == -0.5


def test_the_renamed_oracle_regime_says_what_it_is_now():
    from occ_theory.train.config import load_config

    with pytest.raises(ValueError, match=r"'oracle' is now 'adam_step'.*'real'"):
        load_config(None, ["rl.regime=oracle"])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "sft")


def test_adam_step_rule_is_the_second_order_optimum_of_the_adam_step_by_finite_differences(ckpt, tmp_path):
    """The adam_step rule's λ (one HVP) against λ* = −(gᵀa + sᵀHa)/(aᵀHa) with every term a central difference of J
    at θ (forward passes only): gᵀa and aᵀHa along a, the mixed term sᵀHa along s and a, on the AdamW step
    about to be taken after one real step (momentum, bias correction, weight decay in play), float64."""
    from occ_theory.diagnostics.probe import shared_params
    from occ_theory.models import exact_float64
    from occ_theory.rl.batch import compute_objectives
    from occ_theory.rl.coef import step_lambda
    from occ_theory.theory import grad
    from occ_theory.theory.step import adamw_step_directions
    tr = rl_trainer(ckpt, tmp_path / "o", "adam_step", "diag.every=0", "diag.first=false")
    tr.model.double()
    tr.optimizer = torch.optim.AdamW(tr.trainable, lr=tr.rc.lr, weight_decay=0.01)
    batch, _ = tr.rollout()
    first, mb = (with_signal(tr, m) for m in batch.split(2))
    (-compute_objectives(tr.model, first, tr.spec).rl_objective).backward()
    tr.optimizer.step()
    params = shared_params(tr.model)

    def J(p):
        return compute_objectives(tr.model, mb, tr.spec, params=p, with_mtp=False).rl_objective

    with exact_float64(tr.model):  # RMSNorm and softmax in float64 too: the differences need it
        u = grad(lambda p: compute_objectives(tr.model, mb, tr.spec, params=p).mtp, params)[1]
        lam = step_lambda("adam_step", tr.model, mb, tr.spec, tr.shared, tr.optimizer, u, 0.0, grad_clip=0.0)
        group = tr.optimizer.param_groups[0]
        st = {k: tr.optimizer.state[p] for k, p in tr.shared.items()}
        s, a = adamw_step_directions(params, grad(J, params)[1], u, {k: v["exp_avg"] for k, v in st.items()},
                                     {k: v["exp_avg_sq"] for k, v in st.items()}, 1, group["lr"], group["betas"],
                                     group["eps"], group["weight_decay"])
        h = 1e-2

        def at(x, y):
            with torch.no_grad():
                return float(J({k: params[k] + x * s[k] + y * a[k] for k in params}))

        ga = (at(0, h) - at(0, -h)) / (2 * h)
        aha = (at(0, h) - 2 * at(0, 0) + at(0, -h)) / h**2
        sha = (at(h, h) - at(h, -h) - at(-h, h) + at(-h, -h)) / (4 * h**2)
    expected = -(ga + sha) / aha if aha < 0 else float("nan")
    assert lam == pytest.approx(expected, rel=1e-3) or (math.isnan(lam) and math.isnan(expected))


@pytest.mark.parametrize("regime", ["real", "adam_step", "cosine", "cosine_weighted", "pcgrad", "upgrad"])
def test_each_rule_trains_logs_its_lambda_and_checks_identity3_with_its_weights(ckpt, tmp_path, regime):
    if regime in ("pcgrad", "upgrad"):
        pytest.importorskip("torchjd")
    tr = rl_trainer(ckpt, tmp_path / regime, regime, "diag.at=[1]", "diag.every=0", "diag.curve_points=0",
                    "diag.taylor_halvings=0")
    batch, _ = tr.rollout()
    rec = tr.train_step(with_signal(tr, batch.split(2)[0]), first_after_rollout=True)
    assert rec["lambda/rule"] == regime and math.isfinite(rec["lambda/used"]) and not rec["rl/skipped"]
    assert rec["diag/identity3/rel_err"] < 1e-4  # .grad is the rule's own update, not g + λu
    if regime not in STEP_RULES:
        assert math.isfinite(rec["lambda/effective"]) and -1 <= rec["lambda/cosine"] <= 1
        assert math.isfinite(rec["diag/realised/delta_vs_detach"])


def test_the_real_rule_applies_the_probes_adam_real_optimum(ckpt, tmp_path):
    """At a probed step the rule's λ (before the bound) is the probe's diag/adam_real/lambda_star_clamped: both expand
    the real, clipped AdamW step at the same state, the rule on the live model, the probe functionally."""
    tr = rl_trainer(ckpt, tmp_path / "r", "real", "diag.at=[2]", "diag.every=0", "diag.first=false",
                    "diag.curve_points=0", "diag.taylor_halvings=0", "rl.grad_clip=0.5")
    batch, _ = tr.rollout()
    first, second = (with_signal(tr, m) for m in batch.split(2))
    tr.train_step(first, first_after_rollout=True)
    rec = tr.train_step(second, first_after_rollout=False)
    probe = rec["diag/adam_real/lambda_star_clamped"]
    assert rec["lambda/rule"] == "real" and math.isfinite(probe)
    assert rec["lambda/raw"] == pytest.approx(probe, rel=1e-3)
    assert abs(rec["lambda/used"]) <= tr.rc.coef_max


def test_every_regime_of_the_table_is_wired_through():
    """A regime is one row of names.REGIME_TABLE: its objectives, its rule, the config and the analysis all read it."""
    from analysis.load import arm_name
    from occ_theory.names import REGIME_TABLE
    from occ_theory.rl.batch import ObjectiveSpec
    from occ_theory.rl.coef import CoefInputs
    from occ_theory.train.config import RLConfig, load_config

    doc = RLConfig.model_fields["regime"].description
    for name, row in REGIME_TABLE.items():
        spec = ObjectiveSpec.for_regime(name, detach_mtp_loss="policy")
        assert spec.grad_cut == row.grad_cut and (spec.mtp_kind is None) == (row.mtp_loss is None)
        rule = CoefficientRule(name, 0.2, proxy="least_squares")
        assert rule.name == ("least_squares" if row.rule == "proxy" else row.rule)
        assert rule.edits_shared == row.edits_shared and rule.needs_mtp_grad == row.needs_u
        inputs = CoefInputs({"least_squares": 0.5}, real=lambda: 0.3, adam_step=lambda: 0.3)
        assert math.isfinite(rule(inputs).value)
        assert load_config(None, [f"rl.regime={name}"]).rl.regime == name and name in doc
        assert arm_name(name, {"mtp_coef": 0.2, "proxy": "fisher"}).startswith(name)
