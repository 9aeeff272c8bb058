"""The RL trainer: identities 3 and 5 on real steps, regimes end to end, resume, online/offline probes."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from rl_fixtures import inject_random_advantages, make_checkpoint, rl_config, rl_trainer, with_signal

from analysis.load import read_jsonl
from occ_theory.diagnostics.offline import read_online, recompute_run
from occ_theory.train.config import REGIMES
from occ_theory.train.rl import RLTrainer, resume_rl, run_rl


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "sft")


def _trainer(ckpt, tmp_path, regime, *extra):
    return rl_trainer(ckpt, tmp_path / regime, regime, *extra)


def _diag_step(ckpt, tmp_path, regime, *extra):
    """One diagnosed optimizer step on a minibatch with signal; returns the metrics record."""
    tr = _trainer(ckpt, tmp_path, regime, "diag.at=[1]", "diag.every=0", *extra)
    batch, _ = tr.rollout()
    mb = with_signal(tr, batch.split(2)[0])
    return tr, mb, tr.train_step(mb, first_after_rollout=False)


@pytest.mark.parametrize("regime", ["policy", "ce", "occ", "detach_encoder"])
def test_identity3_probe_directions_add_up_to_the_optimizer_gradient(ckpt, tmp_path, regime):
    """The probe's functional g and u (torch.func over θ_S) against the .grad the optimizer received."""
    _, _, rec = _diag_step(ckpt, tmp_path, regime)
    assert rec["diag/identity3/rel_err"] < 1e-5
    assert rec["diag/grad/g_norm"] > 0 and rec["diag/grad/u_norm"] > 0


def test_identity3_check_detects_directions_of_another_batch(ckpt, tmp_path):
    """The check can fail: g and u measured on the other half of the rollout do not add up to .grad."""
    from occ_theory.diagnostics.probe import OptimizerSnapshot, ProbeSettings, run_probe

    tr, mb, _ = _diag_step(ckpt, tmp_path, "policy")
    batch, _ = tr.rollout()
    other = with_signal(tr, batch.split(2)[1])
    settings = ProbeSettings(curve_points=0, bootstrap=0, taylor_halvings=0)
    coef = tr.rule()
    tr.optimizer.zero_grad(set_to_none=True)
    from occ_theory.rl.batch import compute_objectives

    obj = compute_objectives(tr.model, mb, tr.spec)
    (-obj.rl_objective - coef.value * obj.mtp).backward()
    snap = OptimizerSnapshot.capture(tr.optimizer, tr.shared)
    same = run_probe(tr.model, mb, tr.spec, coef, snap, settings)
    wrong = run_probe(tr.model, other, tr.spec, coef, snap, settings)
    recorder = tr.diagnostics.recorder
    assert recorder.check(same.g, same.u, 1.0, coef.value)["diag/identity3/rel_err"] < 1e-5
    assert recorder.check(wrong.g, wrong.u, 1.0, coef.value)["diag/identity3/rel_err"] > 1e-2


def test_identity5_detach_gives_zero_u_zero_terms_and_a_flat_curve(ckpt, tmp_path):
    tr, _, rec = _diag_step(ckpt, tmp_path, "detach")
    assert rec["diag/grad/u_norm"] == 0.0
    for geo in ("sgd",):
        assert (rec[f"diag/{geo}/corr"], rec[f"diag/{geo}/cross"], rec[f"diag/{geo}/curv"]) == (0.0, 0.0, 0.0)
        assert math.isnan(rec[f"diag/{geo}/lambda_star"]) and "u = 0" in rec[f"diag/{geo}/reason"]
    assert rec["diag/curve/flat"] and rec["diag/curve/beta"] == 0.0
    mtp_grads = [p.grad for p in tr.model.mtp.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in mtp_grads)  # θ_M still trains


@pytest.mark.parametrize("regime", ["policy", "ce"])
def test_policy_and_ce_give_a_finite_decomposition_and_a_fit(ckpt, tmp_path, regime):
    _, _, rec = _diag_step(ckpt, tmp_path, regime)
    for key in ("diag/sgd/corr", "diag/sgd/cross", "diag/sgd/curv", "diag/sgd/curv_fisher", "diag/sgd/proj",
                "diag/curve/alpha", "diag/curve/beta", "diag/curve/r2"):
        assert math.isfinite(rec[key]), key
    assert rec["diag/grad/u_norm"] > 0 and not rec["diag/curve/flat"]


def test_trainer_proxies_equal_a_by_hand_sum(ckpt, tmp_path):
    """reference: the unmasked mean over the response block; least_squares: the masked ratio of sums over
    positions with an MTP prediction; both × mtp_coef (one depth). Summed here element by element in float64."""
    tr = _trainer(ckpt, tmp_path, "occ", "rl.proxy=least_squares", "rl.mtp_coef=0.3")
    batch, _ = tr.rollout()
    mb = with_signal(tr, batch.split(2)[0])
    from occ_theory.rl.batch import compute_objectives

    with torch.no_grad():
        obj = compute_objectives(tr.model, mb, tr.spec)
    mask = mb.response_mask.double().numpy()
    lp, old, q = (t.detach().double().numpy() for t in (obj.logp, mb.old_logp, obj.mtp_logp[0]))
    first = int(np.nonzero(mask.sum(0))[0][0])
    ref_sum, ls_num, ls_den, count = 0.0, 0.0, 0.0, 0
    for i in range(mask.shape[0]):
        for t in range(first, mask.shape[1]):
            count += 1
            if mask[i, t] == 0:
                continue  # padding inside the block: zeros, ratio 0, still counted
            dq, dl = q[i, t] - old[i, t], lp[i, t] - old[i, t]
            ref_sum += dq * dl / (dq * dq + 1e-8)
            if np.isfinite(q[i, t]):  # an MTP prediction exists (t ≥ depth + 1)
                ls_num += dq * dl
                ls_den += dq * dq
    step = tr.train_step(mb, first_after_rollout=False)
    # the trainer's forward carries a graph (another attention kernel): float32 noise on l − l_old ~ 1e-3
    assert step["lambda/reference"] == pytest.approx(0.3 * ref_sum / count, rel=1e-4)
    assert step["lambda/least_squares"] == pytest.approx(0.3 * ls_num / (ls_den + 1e-8), rel=1e-4)
    assert step["lambda/used"] == step["lambda/least_squares"] and step["lambda/rule"] == "least_squares"


@pytest.mark.parametrize("regime", REGIMES)
def test_end_to_end_run_in_each_regime(ckpt, tmp_path, regime, monkeypatch):
    inject_random_advantages(monkeypatch)
    run_dir = run_rl(rl_config(ckpt, regime), out_dir=tmp_path / regime)
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all("lambda/used" in r and "reward/mean" in r for r in records)
    if regime == "off":
        assert all(r["lambda/used"] == 0.0 for r in records)
    else:
        assert (run_dir / "probes" / "step_000002" / "bundle.pt").is_file()
    if regime == "occ":  # reference proxy: λ = 0 exactly on the first minibatch after each rollout
        assert all(r["lambda/used"] == 0.0 for r in records if r["first_after_rollout"])
        assert all(r["lambda/used"] != 0.0 for r in records if not r["first_after_rollout"])
    evald = json.loads((run_dir / "eval.json").read_text())
    assert set(evald["suites"]) == {"addition", "signed", "multiplication", "linear", "countdown", "length_gen"}
    assert (run_dir / "final" / "occ_model.json").is_file() and (run_dir / "tb").is_dir()


def _comparable(records):
    drop = ("perf/", "rollout/tokens_per_s")
    return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in records]


def test_resume_after_interruption_gives_the_same_metrics(ckpt, tmp_path, monkeypatch):
    inject_random_advantages(monkeypatch)
    extra = ("rl.steps=6", "rl.checkpoint_every=1", "diag.every=3")
    full = run_rl(rl_config(ckpt, "occ", *extra), out_dir=tmp_path / "full")

    cut_dir = _interrupted_at_5_then_resumed(rl_config(ckpt, "occ", *extra), tmp_path / "cut", monkeypatch)
    a, b = read_jsonl(full / "metrics.jsonl"), read_jsonl(cut_dir / "metrics.jsonl")
    assert _comparable(a) == _comparable(b)


def _interrupted_at_5_then_resumed(cfg, cut_dir, monkeypatch):
    """``cfg`` (two steps a rollout, rl.checkpoint_every=1) run into ``cut_dir``, interrupted as step 5 is
    about to run (the checkpoint after rollout 2, step 4, exists: records 1-4 are on disk), then resumed."""
    original = RLTrainer.train_step

    def crash_at_5(self, mb, first_after_rollout, **kw):
        if self.step == 4:
            raise KeyboardInterrupt
        return original(self, mb, first_after_rollout, **kw)

    monkeypatch.setattr(RLTrainer, "train_step", crash_at_5)
    with pytest.raises(KeyboardInterrupt):
        run_rl(cfg, out_dir=cut_dir)
    monkeypatch.setattr(RLTrainer, "train_step", original)
    assert [r["step"] for r in read_jsonl(cut_dir / "metrics.jsonl")] == [1, 2, 3, 4]
    resume_rl(cut_dir)
    return cut_dir



def test_defer_degenerate_moves_a_probe_off_minibatches_without_advantages_and_resumes(ckpt, tmp_path, monkeypatch):
    """The first two rollouts (steps 1-4) have all advantages 0 (J ≡ 0). Scheduled at 2, 4, 6, the probes
    measure C = 0 at 2 and 4; with diag.defer_degenerate the probe due at 2 runs at 5, the first step with
    a nonzero advantage (saying so), and 6 as scheduled. The deferral pending at step 4 survives an interruption."""
    inject_random_advantages(monkeypatch, zero_rollouts=2)
    extra = ("rl.steps=6", "diag.every=2", "diag.first=false", "rl.checkpoint_every=1", "diag.curve_points=0")
    rows = read_jsonl(run_rl(rl_config(ckpt, "ce", *extra), out_dir=tmp_path / "plain") / "metrics.jsonl")
    assert [r["step"] for r in rows if "diag/lr" in r] == [2, 4, 6]
    assert rows[1]["diag/sgd/corr"] == 0.0 and rows[5]["diag/sgd/corr"] != 0.0

    deferring = (*extra, "diag.defer_degenerate=true")
    full = run_rl(rl_config(ckpt, "ce", *deferring), out_dir=tmp_path / "full")
    rows = read_jsonl(full / "metrics.jsonl")
    assert [(r["step"], r.get("diag/deferred_from")) for r in rows if "diag/lr" in r] == [(5, 2), (6, None)]
    assert rows[4]["diag/sgd/corr"] != 0.0
    assert sorted(p.name for p in (full / "probes").iterdir()) == ["step_000005", "step_000006"]

    # the checkpoint after rollout 2 holds the deferral pending since step 2
    cut_dir = _interrupted_at_5_then_resumed(rl_config(ckpt, "ce", *deferring), tmp_path / "cut", monkeypatch)
    assert _comparable(read_jsonl(cut_dir / "metrics.jsonl")) == _comparable(rows)


def test_offline_probe_recomputation_equals_online_values(ckpt, tmp_path, monkeypatch):
    inject_random_advantages(monkeypatch)
    run_dir = run_rl(rl_config(ckpt, "policy", "diag.every=2", "rl.steps=4", "diag.curve_real_step=true"),
                     out_dir=tmp_path / "p")
    out = recompute_run(run_dir)
    df = pd.read_parquet(out)
    assert list(df["step"]) == [1, 2, 4]
    for _, row in df.iterrows():
        online = read_online(run_dir / "probes" / f"step_{int(row['step']):06d}")
        checked = 0
        for k, v in online.items():
            if isinstance(v, float) and k in row and isinstance(row[k], float) and math.isfinite(row[k]):
                assert row[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
                checked += 1
        assert checked > 20
        if int(row["step"]) > 1:  # the real step's quantities too (adam_real, the real optimum, the β split)
            assert {"diag/adam_real/beta", "diag/real_optimum/lambda", "diag/real_beta/clip"} <= set(online)


def test_offline_probe_with_other_settings_writes_its_own_file_and_keeps_the_online_one(ckpt, tmp_path, monkeypatch):
    inject_random_advantages(monkeypatch)
    run_dir = run_rl(rl_config(ckpt, "policy", "diag.every=2", "rl.steps=2"), out_dir=tmp_path / "p")
    online = recompute_run(run_dir)
    before = online.read_bytes()
    with pytest.raises(ValueError, match=r"rl\.lr"):
        recompute_run(run_dir, overrides=["rl.lr=1"], out_name="x.parquet")
    with pytest.raises(ValueError, match="file of their own"):
        recompute_run(run_dir, overrides=["diag.grid_cap=0.001"])
    with pytest.raises(ValueError, match="grid_cap"):
        recompute_run(run_dir, overrides=["diag.grid_cap=-1"], out_name="x.parquet")
    capped = pd.read_parquet(recompute_run(run_dir, overrides=["diag.grid_cap=0.001"], out_name="capped.parquet"))
    base = pd.read_parquet(online)
    assert online.read_bytes() == before and not (run_dir / "x.parquet").exists()
    assert capped["diag/curve/grid_capped"].all() and not base["diag/curve/grid_capped"].any()
    assert (capped["diag/curve/grid_half_width"] < base["diag/curve/grid_half_width"]).all()
    for k in ("diag/sgd/corr", "diag/sgd/curv", "lambda/reference"):  # only the grid changed
        np.testing.assert_allclose(capped[k], base[k], rtol=1e-12)


def test_taylor_order_on_a_tiny_transformer_with_mtp_head(ckpt, tmp_path):
    """Identity 2 on the real objective: halving η divides the residual by about 8 (float64, SGD geometry).

    Ratios stay well inside the clip range (old log-probs 0.01 off), where the surrogate is smooth.
    """
    tr = _trainer(ckpt, tmp_path, "policy")
    batch, _ = tr.rollout()
    mb = with_signal(tr, batch.split(2)[0], noise=0.01)
    from occ_theory.diagnostics.probe import OptimizerSnapshot, ProbeSettings, run_probe

    snap = OptimizerSnapshot("sgd", 0.002, (0.9, 0.999), 1e-8, 0.0, {})
    settings = ProbeSettings(dtype="float64", curve_points=0, bootstrap=0, taylor_halvings=4, curve_default=0.5)
    out = run_probe(tr.model, mb, tr.spec, tr.rule(), snap, settings).record
    res = out["taylor/residuals"]
    ratios = [res[i] / res[i + 1] for i in range(len(res) - 1)]
    assert all(6.0 <= r <= 10.0 for r in ratios[1:]), (res, ratios)
    assert 2.7 <= out["diag/taylor/slope"] <= 3.3


def test_objective_gradient_is_the_derivative_even_with_pad_tokens_in_responses(ckpt, tmp_path):
    """nn.Embedding(padding_idx) would zero the pad row's gradient although a response may hold that token."""
    tr, mb, _ = _diag_step(ckpt, tmp_path, "policy")
    from occ_theory.diagnostics.probe import shared_params
    from occ_theory.models import exact_float64
    from occ_theory.rl.batch import compute_objectives
    from occ_theory.theory import grad
    from occ_theory.theory.params import axpy, dot

    model = tr.model.double()
    ids = mb.input_ids.clone()
    resp = torch.nonzero(mb.response_mask[0])[:, 0]
    ids[0, resp[0]] = tr.tokenizer.pad_token_id  # a sampled pad token inside a response
    from dataclasses import replace

    mb = replace(mb, input_ids=ids, **{k: v.double() for k, v in mb.tensors().items() if v.is_floating_point()})
    params = shared_params(model)

    def J(p):
        return compute_objectives(model, mb, tr.spec, params=p, with_mtp=False).rl_objective

    with exact_float64(model):
        _, g = grad(J, params)
        v = {k: torch.randn(t.shape, generator=torch.Generator().manual_seed(1), dtype=t.dtype)
             for k, t in params.items()}
        norm = float(dot(v, v)) ** 0.5
        v = {k: t / norm for k, t in v.items()}
        e = 1e-5
        with torch.no_grad():
            fd = (float(J(axpy(e, v, params))) - float(J(axpy(-e, v, params)))) / (2 * e)
    assert fd == pytest.approx(float(dot(g, v)), rel=1e-6)


def test_trainer_fisher_coefficient_by_finite_difference_matches_the_exact_jvp(ckpt, tmp_path):
    """occ/fisher applies λ from a central finite difference; the probe computes δ = ∇l·Pu exactly. On the first
    step (no Adam state: a sign step, P undefined) it applies 0 and counts it."""
    tr = _trainer(ckpt, tmp_path, "occ", "rl.proxy=fisher", "diag.at=[2]", "diag.every=0", "diag.first=false")
    batch, _ = tr.rollout()
    first, second = (with_signal(tr, mb) for mb in batch.split(2))
    rec1 = tr.train_step(first, first_after_rollout=True)
    assert rec1["lambda/used"] == 0.0 and tr.rule.undefined == 1
    rec = tr.train_step(second, first_after_rollout=False)
    online = read_online(tr.ctx.run_dir / "probes" / "step_000002")
    assert rec["lambda/used"] == rec["lambda/fisher"] != 0.0
    assert rec["lambda/fisher"] == pytest.approx(online["lambda/fisher"], rel=2e-2)


@pytest.mark.parametrize("kl_coef", [0.0, 0.3])
def test_per_sequence_terms_add_up_to_J_with_and_without_kl(ckpt, tmp_path, kl_coef):
    """The curve's per-sequence terms (bootstrap) measure the same J the decomposition differentiates."""
    from dataclasses import replace

    from occ_theory.rl.batch import compute_objectives

    tr = _trainer(ckpt, tmp_path, "policy", f"rl.kl_coef={kl_coef}")
    batch, _ = tr.rollout()
    mb = with_signal(tr, batch.split(2)[0])
    if kl_coef > 0:
        mb = replace(mb, ref_logp=mb.old_logp - 0.05 * mb.response_mask)
    with torch.no_grad():
        obj = compute_objectives(tr.model, mb, tr.spec)
    assert float(obj.seq_rl.sum() / mb.response_mask.sum()) == pytest.approx(float(obj.rl_objective), rel=1e-5)
    assert (obj.kl is not None) == (kl_coef > 0)


def test_real_step_curve_replays_the_optimizer_step_the_run_takes(ckpt, tmp_path):
    """The 'real optimizer step' behind curve_real: from a copy of the AdamW state, with the run's clipping."""
    from occ_theory.diagnostics.curve import real_step_params
    from occ_theory.diagnostics.probe import OptimizerSnapshot, shared_params
    from occ_theory.rl.batch import compute_objectives
    from occ_theory.theory import grad

    tr = _trainer(ckpt, tmp_path, "policy", "rl.grad_clip=0.05", "diag.every=0")
    batch, _ = tr.rollout()
    first, second = (with_signal(tr, mb) for mb in batch.split(2))
    tr.train_step(first, first_after_rollout=False)  # Adam now has state
    snap = OptimizerSnapshot.capture(tr.optimizer, tr.shared, tr.rc.grad_clip)
    params = {k: t.clone() for k, t in shared_params(tr.model).items()}
    g = grad(lambda p: compute_objectives(tr.model, second, tr.spec, params=p, with_mtp=False).rl_objective, params)[1]
    u = grad(lambda p: compute_objectives(tr.model, second, tr.spec, params=p).mtp, params)[1]
    own = {k: p.detach() for k, p in tr.model.named_parameters() if k in set(tr.model.mtp_param_names())}
    um = grad(lambda p: compute_objectives(tr.model, second, tr.spec, params=p).mtp, own)[1]
    um_sq = tr.rc.mtp_coef**2 * sum(float((t * t).sum()) for t in um.values())
    predicted = real_step_params(params, g, u, tr.rc.mtp_coef, snap, um_sq)
    tr.train_step(second, first_after_rollout=False)
    actual = shared_params(tr.model)
    for k in params:
        err = float((predicted[k] - actual[k]).abs().max())
        assert err <= 1e-6 + 1e-4 * float((actual[k] - params[k]).abs().max()), k


def test_a_bundle_saves_the_optimizer_state_without_copying_and_loads_it_back(ckpt, tmp_path):
    """The snapshot's dict holds its own tensors (no deep copy of Adam's state at every bundle), and the
    bundle, read back memory-mapped, has the same weights, batch and state."""
    from occ_theory.diagnostics.bundle import load_bundle, save_bundle
    from occ_theory.diagnostics.probe import OptimizerSnapshot, ProbeSettings

    tr = _trainer(ckpt, tmp_path, "policy", "diag.every=0")
    batch, _ = tr.rollout()
    first, second = (with_signal(tr, mb) for mb in batch.split(2))
    tr.train_step(first, first_after_rollout=False)
    snap = OptimizerSnapshot.capture(tr.optimizer, tr.shared, tr.rc.grad_clip)
    d = snap.to_dict()
    assert d["state"] and all(d["state"][k]["exp_avg_sq"] is snap.state[k]["exp_avg_sq"] for k in snap.state)
    save_bundle(tmp_path / "b", step=2, model=tr.model, batch=second, spec=tr.spec, coef=tr.rule(), optim=snap,
                settings=ProbeSettings())
    back = load_bundle(tmp_path / "b")
    assert all(torch.equal(v, back["model"][k]) for k, v in tr.model.state_dict().items())
    assert all(torch.equal(v, back["batch"][k]) for k, v in second.tensors().items())
    again = OptimizerSnapshot.from_dict(back["optim"])
    assert again.betas == snap.betas and again.grad_clip == snap.grad_clip
    assert all(torch.equal(again.state[k][n], snap.state[k][n]) for k in snap.state for n in snap.state[k])

def test_mtp_mask_counts_from_each_rows_first_real_token_under_left_padding():
    """Depth k at position t needs t ≥ first + k + 1: a 1-token prompt left-padded by 3 gives the same M_k
    (D = 2, ce) as the same row unpadded; the positions whose MTP inputs are padding stay out of M and its count."""
    from occ_theory.models import ModelConfig, build_model, build_tokenizer
    from occ_theory.rl.batch import ObjectiveSpec, RLBatch, compute_objectives, mtp_mask

    tok = build_tokenizer()
    model = build_model(ModelConfig.tiny(mtp_depths=2), tok, seed=0).eval()
    ids = torch.tensor([[5, 17, 23, 9, 31, 12]])  # 1 prompt token, 5 response tokens

    def batch(pad: int) -> RLBatch:
        full = torch.cat([torch.full((1, pad), tok.pad_token_id), ids], 1)
        attn = (torch.arange(full.shape[1]) >= pad).long()[None]
        resp = (torch.arange(full.shape[1]) >= pad + 1).float()[None]
        return RLBatch(full, attn, resp, torch.ones(1), torch.zeros_like(resp))

    spec = ObjectiveSpec.for_regime("ce")
    with torch.no_grad():
        plain, padded = (compute_objectives(model, batch(p), spec) for p in (0, 3))
    for k in (1, 2):
        assert float(padded.mtp_depths[k - 1]) == pytest.approx(float(plain.mtp_depths[k - 1]), rel=1e-5), k
        b = batch(3)
        assert int(mtp_mask(b.response_mask, k, b.attention_mask).sum()) == 5 - k


def test_adam_stationary_buffers_are_the_bias_corrected_ema_of_g_and_u(ckpt, tmp_path):
    """The recorder's m̂_g, m̂_u after three steps equal Adam's β₁-EMA (bias-corrected) of ∇J and ∇M measured
    functionally before each step."""
    from occ_theory.diagnostics.probe import shared_params
    from occ_theory.rl.batch import compute_objectives
    from occ_theory.theory import grad

    tr = _trainer(ckpt, tmp_path, "policy", "diag.every=100", "rl.steps=100", "diag.stationary=true")  # not probed
    batch, _ = tr.rollout()
    b1 = tr.rc.betas[0]
    m_g = m_u = None
    for t, mb in enumerate((with_signal(tr, m) for m in batch.split(4)[:3]), start=1):
        params = shared_params(tr.model)
        g = grad(lambda p, mb=mb: compute_objectives(tr.model, mb, tr.spec, params=p, with_mtp=False).rl_objective,
                 params)[1]
        u = grad(lambda p, mb=mb: compute_objectives(tr.model, mb, tr.spec, params=p).mtp, params)[1]
        m_g = {k: (1 - b1) * v if m_g is None else b1 * m_g[k] + (1 - b1) * v for k, v in g.items()}
        m_u = {k: (1 - b1) * v if m_u is None else b1 * m_u[k] + (1 - b1) * v for k, v in u.items()}
        tr.train_step(mb, first_after_rollout=t == 1)
    got_g, got_u = tr.diagnostics.recorder.momentum()
    c = 1 - b1**3
    for k in m_g:
        scale_g, scale_u = float(m_g[k].abs().max()) + 1e-12, float(m_u[k].abs().max()) + 1e-12
        assert float((got_g[k] - m_g[k] / c).abs().max()) <= 1e-4 * scale_g / c + 1e-9, k
        assert float((got_u[k] - m_u[k] / c).abs().max()) <= 1e-4 * scale_u / c + 1e-9, k


def test_without_diag_stationary_no_step_pays_for_u_and_the_probe_skips_adam_stationary(ckpt, tmp_path):
    """The default: the momentum of u is not tracked, so an unprobed policy step takes no u (no second backward
    through the trunk) and the probe has sgd, adam, adam_step and adam_real but not adam_stationary."""
    tr = _trainer(ckpt, tmp_path, "policy", "diag.at=[2]", "diag.every=0", "diag.first=false", "diag.curve_points=0",
                  "diag.bootstrap=0", "diag.taylor_halvings=0")
    assert not tr.diagnostics.needs_mtp_grad and not tr.diagnostics.recorder.track_momentum
    batch, _ = tr.rollout()
    first, second = (with_signal(tr, mb) for mb in batch.split(2))
    tr.train_step(first, first_after_rollout=True)
    assert tr.diagnostics.recorder.momentum() is None
    rec = tr.train_step(second, first_after_rollout=False)
    for geo in ("sgd", "adam", "adam_step", "adam_real"):
        assert math.isfinite(rec[f"diag/{geo}/lambda_bal" if geo != "adam_real" else "diag/adam_real/beta"]), geo
    assert not any(k.startswith("diag/adam_stationary/") and math.isfinite(v) for k, v in rec.items()
                   if isinstance(v, float))


def test_probe_measures_every_geometry_against_the_real_step(ckpt, tmp_path):
    """Second step (Adam has state, momentum tracked): sgd, adam, adam_step, adam_stationary all logged with
    their geometry in the key; C in SGD geometry is gᵀu; the real-step curves and each geometry's errors exist."""
    tr = _trainer(ckpt, tmp_path, "policy", "diag.at=[2]", "diag.every=0", "diag.curve_real_step=true",
                  "diag.curve_points=5", "diag.bootstrap=0", "diag.taylor_halvings=0", "diag.stationary=true")
    batch, _ = tr.rollout()
    first, second = (with_signal(tr, mb) for mb in batch.split(2))
    tr.train_step(first, first_after_rollout=True)
    rec = tr.train_step(second, first_after_rollout=False)
    for geo in ("sgd", "adam", "adam_step", "adam_stationary"):
        for k in ("alpha_model", "beta_model", "lambda_bal", "alpha_rel_err", "beta_rel_err"):
            assert math.isfinite(rec[f"diag/{geo}/{k}"]), (geo, k)
    for k in ("alpha", "beta", "clip_factor", "alpha_rel_err", "beta_rel_err"):
        assert math.isfinite(rec[f"diag/adam_real/{k}"]), k
    assert rec["diag/control"] == "" and rec["diag/adam_t"] == 2 and rec["diag/clip_scope"] == "global"
    # the real optimum is a maximum of the real curve: no geometry's λ* does better on it
    opt = rec["diag/real_optimum/delta"]
    assert math.isfinite(rec["diag/real_optimum/lambda"]) and opt >= 0.0
    for geo in ("sgd", "adam", "adam_step", "adam_stationary", "adam_real"):
        for tag, best in (("", opt), ("_noclip", rec["diag/real_optimum_noclip/delta"])):
            at = rec[f"diag/{geo}/delta_at_lambda_star{tag}"]
            assert math.isnan(at) or at <= best, (geo, tag)
    shares = [rec[f"diag/real_beta/{k}_share"] for k in ("clip", "vhat", "rest")]
    assert sum(shares) == pytest.approx(1.0)
    parts = sum(rec[f"diag/real_beta/{k}"] for k in ("clip", "vhat", "rest"))
    assert parts == pytest.approx(rec["diag/adam_real/beta"], rel=1e-9, abs=1e-15)
    assert rec["diag/sgd/corr"] == pytest.approx(rec["diag/grad/corr"], rel=1e-5)  # P = I: C = gᵀu
    assert rec["diag/sgd/cosine"] == pytest.approx(rec["diag/grad/cos"], rel=1e-5)
    assert rec["diag/adam/proj"] == pytest.approx(rec["diag/adam/corr"] / rec["diag/adam/pu_norm_sq"], rel=1e-6)
    assert rec["diag/adam/beta_model"] == pytest.approx(rec["diag/adam/curv"] * tr.rc.lr**2, rel=1e-6)
    assert rec["diag/adam_step/a_norm"] < rec["diag/adam/a_norm"]  # the current gradient carries c₁ < 1 of it
    assert rec["diag/lambda_clip_lo"] < 0 < rec["diag/lambda_clip_hi"]
    for k in ("alpha", "beta", "r2"):
        assert math.isfinite(rec[f"diag/curve_real_local/{k}"]), k


def test_lr_warmup_ramps_linearly_and_survives_a_checkpoint(ckpt, tmp_path):
    tr = _trainer(ckpt, tmp_path, "detach", "rl.warmup_steps=4", "rl.lr=1e-4", "diag.every=0", "diag.first=false")
    batch, _ = tr.rollout()
    mbs = [with_signal(tr, m) for m in batch.split(4)]
    lrs = [tr.train_step(mb, first_after_rollout=False)["rl/lr"] for mb in mbs[:2]]
    state = tr.checkpoint_state()
    other = _trainer(ckpt, tmp_path / "b", "detach", "rl.warmup_steps=4", "rl.lr=1e-4", "diag.every=0",
                     "diag.first=false")
    path = tmp_path / "ck.pt"
    torch.save(state, path)
    other.load_checkpoint(path)
    lrs += [other.train_step(mb, first_after_rollout=False)["rl/lr"] for mb in mbs[2:]]
    assert lrs == pytest.approx([2.5e-5, 5e-5, 7.5e-5, 1e-4], rel=1e-12)


@pytest.mark.parametrize("scope, coupled", [("global", True), ("shared", False), ("separate", False)])
def test_clip_scope_decides_whether_the_mtp_loss_moves_detachs_step(ckpt, tmp_path, scope, coupled):
    """Under detach u = 0 on θ_S, so the MTP coefficient reaches θ_S's update only through the clip factor: with a
    global clip (θ_M's gradient in the norm) a larger λ shrinks θ_S's step; with the shared or separate scope the
    step on θ_S does not depend on λ. Each step records the clip's action and θ_M's share of the norm."""
    shared_after = []
    for lam in (0.1, 30.0):
        tr = _trainer(ckpt, tmp_path / f"{lam}", "detach", f"rl.clip_scope={scope}", f"rl.mtp_coef={lam}",
                      "rl.grad_clip=0.05", "diag.every=0", "diag.first=false")
        batch, _ = tr.rollout()
        rec = tr.train_step(with_signal(tr, batch.split(2)[0]), first_after_rollout=True)
        assert rec["rl/clip_active"] and 0 < rec["rl/grad_norm_mtp_share"] < 1
        assert rec["rl/grad_norm"] == pytest.approx(math.hypot(rec["rl/grad_norm_shared"], rec["rl/grad_norm_mtp"]))
        shared_after.append(torch.cat([p.detach().reshape(-1) for p in tr.shared.values()]))
    assert (not torch.equal(*shared_after)) == coupled


def test_l_old_is_recomputed_once_per_rollout_in_row_chunks_to_the_same_numbers(ckpt, tmp_path, monkeypatch):
    """l_old comes from one training-layout forward over the rollout batch (rl.old_logp_rows rows a pass: the same
    numbers), so the first minibatch after a rollout has l = l_old and the reference proxy applies exactly 0."""
    tr = _trainer(ckpt, tmp_path, "occ", "diag.every=0", "diag.first=false")
    calls = []
    fill = tr.fill_old_logp
    monkeypatch.setattr(tr, "fill_old_logp", lambda mb: calls.append(mb.size) or fill(mb))
    pending = tr._next_rollout()
    assert calls == [tr.rc.batch_size] and len(pending["batches"]) == tr.rc.minibatches
    whole = torch.cat([mb.old_logp for mb in pending["batches"]])
    chunked = _trainer(ckpt, tmp_path / "c", "occ", "rl.old_logp_rows=3", "diag.every=0", "diag.first=false")
    again = chunked._next_rollout()
    assert torch.equal(torch.cat([mb.old_logp for mb in again["batches"]]), whole)
    rec = tr.train_step(pending["batches"][0], first_after_rollout=True, minibatch_index=0)
    assert rec["lambda/reference"] == 0.0 and rec["lambda/used"] == 0.0
