"""The trunk + MTP model: alignment of logp / mtp_logp, gradient cuts, torch.func, save/load.

Models are tiny (H = 32, 2 layers) and float64. transformers' RMSNorm and eager softmax compute in
float32 even for float64 models, so "equal" below means equal to ~1e-6 unless a test compares two
evaluations of the very same computation (then it is bitwise).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from safetensors.torch import save_file

from occ_theory.models import (
    ModelConfig,
    aligned_logprobs,
    build_model,
    build_tokenizer,
    exact_float64,
    load_model,
    load_tokenizer,
    module_group,
    read_model_config,
    save_model,
    selective_log_softmax,
)
from occ_theory.theory import eager_attention

V = 16
TINY = dict(family="qwen2", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            max_position_embeddings=64)


def tiny_model(mtp_depths: int = 1, tied: bool = True, family: str = "qwen2", seed: int = 0, vocab: int = V):
    cfg = ModelConfig(**{**TINY, "family": family}, mtp_depths=mtp_depths, tie_word_embeddings=tied, vocab_size=vocab)
    return build_model(cfg, seed=seed).double()


def tokens(batch: int = 2, seq: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


def finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(x), 0.0, x)


# -- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(hidden_size=30), "hidden_size"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(num_layers=0), "num_layers"),
        (dict(family="gpt2"), "family"),
        (dict(mtp_depths=-1), "mtp_depths"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(hidden_size=24, num_heads=8), "hidden_size / num_heads"),
    ],
)
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**TINY, **change})


def test_config_without_init_from_requires_the_architecture_and_rejects_unknown_keys():
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig(family="qwen2")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({**TINY, "hiden_size": 3})
    with pytest.raises(ValueError, match="vocab_size is unset"):
        build_model(TINY)
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_model({**TINY, "vocab_size": 50}, tokenizer=build_tokenizer())


def test_presets_have_the_documented_sizes():
    tok = build_tokenizer()
    with torch.device("meta"):
        n_tiny = sum(p.numel() for p in build_model(ModelConfig.tiny(), tok).parameters())
        n_small = sum(p.numel() for p in build_model(ModelConfig.small(), tok).parameters())
    assert 0.5e6 <= n_tiny <= 2e6
    assert 20e6 <= n_small <= 50e6


def test_build_is_reproducible_for_a_seed_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = tiny_model(seed=3), tiny_model(seed=3), tiny_model(seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert not all(torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))


def test_vocab_size_comes_from_the_tokenizer():
    tok = build_tokenizer()
    model = build_model(TINY, tokenizer=tok)
    assert model.config.vocab_size == len(tok) == model.trunk.config.vocab_size
    assert model.trunk.config.pad_token_id == tok.pad_token_id


# -- parameter groups -----------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_shared_and_mtp_names_partition_the_parameters_and_count_the_tied_head_once(tied):
    model = tiny_model(mtp_depths=2, tied=tied)
    shared, mtp = model.shared_param_names(), model.mtp_param_names()
    all_names = [n for n, _ in model.named_parameters()]
    assert sorted(shared + mtp) == sorted(all_names) and not set(shared) & set(mtp)
    assert ("trunk.lm_head.weight" in shared) is (not tied)
    groups = {module_group(n) for n in shared}
    expected = {"embed", "block.0", "block.1", "final_norm"} | (set() if tied else {"head"})
    assert groups == expected
    assert {module_group(n) for n in mtp} == {"mtp"}
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(p.numel() for n, p in model.named_parameters() if n in shared or n in mtp)


def test_module_group_maps_names_and_rejects_unknown_ones():
    assert module_group("trunk.model.layers.12.mlp.up_proj.weight") == "block.12"
    assert module_group("module.trunk.lm_head.weight") == "head"
    assert module_group("model.embed_tokens.weight") == "embed"
    assert module_group("trunk.model.norm.weight") == "final_norm"
    assert module_group("mtp.0.block.self_attn.q_proj.weight") == "mtp"
    with pytest.raises(ValueError, match="no known module group"):
        module_group("trunk.model.rotary_emb.inv_freq")


# -- alignment ------------------------------------------------------------------------------------


def test_selective_log_softmax_equals_log_softmax_then_gather():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64) * 4
    index = torch.randint(0, 11, (3, 5), generator=gen)
    for dtype, tol in [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-5)]:
        for temperature in (1.0, 0.7):
            x = logits.to(dtype)
            ref = torch.log_softmax(x.double() / temperature, -1).gather(-1, index[..., None])[..., 0]
            got = selective_log_softmax(x, index, temperature)
            assert got.dtype == torch.promote_types(dtype, torch.float32)
            torch.testing.assert_close(got.double(), ref, atol=tol, rtol=0)


def test_aligned_logprobs_read_the_forward_logits_at_the_documented_positions():
    model = tiny_model(mtp_depths=2)
    ids = tokens()
    logits, mtp_logits = model(ids)
    logp, (mtp1, mtp2) = aligned_logprobs(model, ids, temperature=0.8)
    assert logp.shape == mtp1.shape == mtp2.shape == ids.shape
    assert torch.isnan(logp[:, 0]).all() and torch.isnan(mtp1[:, :2]).all() and torch.isnan(mtp2[:, :3]).all()
    for t in range(1, ids.shape[1]):  # main: logits at t-1
        ref = torch.log_softmax(logits[:, t - 1] / 0.8, -1).gather(-1, ids[:, t, None])[:, 0]
        torch.testing.assert_close(logp[:, t], ref)
    for k, (lg, lp) in enumerate(zip(mtp_logits, (mtp1, mtp2)), start=1):
        assert lg.shape[1] == ids.shape[1] - k
        for t in range(k + 1, ids.shape[1]):  # depth k: MTP position t-k-1
            ref = torch.log_softmax(lg[:, t - k - 1] / 0.8, -1).gather(-1, ids[:, t, None])[:, 0]
            torch.testing.assert_close(lp[:, t], ref)


def _log_dists(model, ids):
    """Full log-distributions aligned like aligned_logprobs: entry t is the one that scores token t."""
    logits, mtp_logits = model(ids)
    main = torch.log_softmax(logits[:, :-1], -1)  # (B, T-1, V), entry t-1 scores token t
    return [main] + [torch.log_softmax(lg, -1) for lg in mtp_logits]


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_prediction_for_token_t_sees_tokens_before_t_only(depth):
    """Changing token t or any later token leaves the prediction for t unchanged; changing t-1 changes it."""
    model = tiny_model(mtp_depths=2)
    ids = tokens(batch=1, seq=10)
    t = 6
    offset = depth + 1  # the prediction for token t sits at position t - depth - 1
    base = _log_dists(model, ids)[depth][:, t - offset]
    logp = aligned_logprobs(model, ids)
    scored = logp[0] if depth == 0 else logp[1][depth - 1]
    torch.testing.assert_close(scored[:, t], base.gather(-1, ids[:, t, None])[:, 0], atol=1e-12, rtol=0)
    for pos in range(t, ids.shape[1]):  # token t and later: same distribution
        changed = ids.clone()
        changed[0, pos] = (changed[0, pos] + 5) % V
        torch.testing.assert_close(_log_dists(model, changed)[depth][:, t - offset], base, atol=1e-12, rtol=0)
    changed = ids.clone()
    changed[0, t - 1] = (changed[0, t - 1] + 5) % V
    assert (_log_dists(model, changed)[depth][:, t - offset] - base).abs().max() > 1e-6


def test_left_padding_leaves_every_real_position_unchanged():
    """Positions come from the attention mask (cumsum - 1) in the trunk and the MTP modules alike."""
    model = tiny_model(mtp_depths=2)
    row = tokens(batch=1, seq=7, seed=1)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    for impl in ("sdpa", "eager"):
        with eager_attention(model) if impl == "eager" else contextlib.nullcontext():
            alone = aligned_logprobs(model, row)
            inbatch = aligned_logprobs(model, padded, mask)
        for a, b in zip([alone[0], *alone[1]], [inbatch[0], *inbatch[1]]):
            scored = ~torch.isnan(a)
            torch.testing.assert_close(b[:, 3:][scored], a[scored], atol=1e-6, rtol=0)
            assert not torch.isnan(b[:, 3:]).any()  # no NaN leaks out of the padding (eager, float64)


# -- gradient cuts --------------------------------------------------------------------------------


def _mtp_grads(model, grad_cut, ids, mask):
    model.zero_grad(set_to_none=True)
    _, mtp = aligned_logprobs(model, ids, mask, grad_cut=grad_cut)
    loss = sum(finite(x).sum() for x in (mtp if isinstance(mtp, list) else [mtp]))
    loss.backward()
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def _group_norms(model, grads):
    out: dict[str, float] = {}
    for n in model.shared_param_names():
        out[module_group(n)] = out.get(module_group(n), 0.0) + float(grads[n].abs().sum())
    return out


@pytest.fixture(scope="module")
def batch():
    ids = tokens(batch=3, seq=9, seed=2)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return ids, mask


@pytest.mark.parametrize("tied", [True, False])
def test_detach_gives_exactly_zero_mtp_gradient_on_every_shared_parameter(batch, tied):
    model = tiny_model(mtp_depths=2, tied=tied)
    grads = _mtp_grads(model, "detach", *batch)
    for n in model.shared_param_names():
        assert torch.count_nonzero(grads[n]) == 0, n
    for n in model.mtp_param_names():
        assert grads[n].abs().sum() > 0, n


def test_detach_encoder_sends_mtp_gradient_to_the_output_head_only(batch):
    model = tiny_model(mtp_depths=2, tied=False)
    norms = _group_norms(model, _mtp_grads(model, "detach_encoder", *batch))
    assert norms.pop("head") > 0
    assert norms == {"embed": 0.0, "block.0": 0.0, "block.1": 0.0, "final_norm": 0.0}


def test_detach_encoder_with_tied_embeddings_reaches_the_matrix_only_through_the_head(batch):
    """Tied: the embedding matrix *is* the head, so it gets exactly the head's MTP gradient."""
    tied = tiny_model(mtp_depths=2, tied=True)
    norms = _group_norms(tied, _mtp_grads(tied, "detach_encoder", *batch))
    assert norms.pop("embed") > 0
    assert norms == {"block.0": 0.0, "block.1": 0.0, "final_norm": 0.0}
    # the same gradient as an untied copy whose head holds the tied matrix (its embedding gets none)
    untied = tiny_model(mtp_depths=2, tied=False)
    untied.load_state_dict({**tied.state_dict(), "trunk.lm_head.weight": tied.trunk.lm_head.weight.detach().clone()})
    g_tied = _mtp_grads(tied, "detach_encoder", *batch)["trunk.model.embed_tokens.weight"]
    g_untied = _mtp_grads(untied, "detach_encoder", *batch)
    torch.testing.assert_close(g_tied, g_untied["trunk.lm_head.weight"], atol=1e-12, rtol=0)
    assert torch.count_nonzero(g_untied["trunk.model.embed_tokens.weight"]) == 0


def test_full_sends_mtp_gradient_into_the_trunk(batch):
    model = tiny_model(mtp_depths=2, tied=False)
    norms = _group_norms(model, _mtp_grads(model, "full", *batch))
    assert all(v > 0 for v in norms.values()), norms


def test_main_logits_do_not_depend_on_the_gradient_mode(batch):
    model = tiny_model(mtp_depths=1)
    outs = [model(batch[0], batch[1], grad_cut=mode) for mode in ("full", "detach", "detach_encoder")]
    for logits, mtp in outs[1:]:
        assert torch.equal(logits, outs[0][0]) and torch.equal(mtp[0], outs[0][1][0])
    with pytest.raises(ValueError, match="grad_cut"):
        model(batch[0], grad_cut="stop")


# -- torch.func -----------------------------------------------------------------------------------


def test_functional_call_on_a_subset_of_shared_params_equals_the_plain_forward(batch):
    model = tiny_model(mtp_depths=1, tied=True)
    ids, mask = batch
    subset = ["trunk.model.embed_tokens.weight", "trunk.model.layers.1.mlp.up_proj.weight", "trunk.model.norm.weight"]
    params = dict(model.named_parameters())
    same = {n: params[n].detach().clone() for n in subset}
    plain = model(ids, mask)
    fc = torch.func.functional_call(model, same, (ids, mask))
    assert torch.equal(fc[0], plain[0]) and torch.equal(fc[1][0], plain[1][0])
    # substituted values take effect everywhere, the tied head and the MTP path included
    moved = {n: t + 0.01 * torch.randn_like(t) for n, t in same.items()}
    reference = tiny_model(mtp_depths=1, tied=True)
    tied_head = {"trunk.lm_head.weight": moved["trunk.model.embed_tokens.weight"]}  # state_dict lists both names
    reference.load_state_dict({**model.state_dict(), **moved, **tied_head})
    fc = torch.func.functional_call(model, moved, (ids, mask))
    expected = reference(ids, mask)
    torch.testing.assert_close(fc[0], expected[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(fc[1][0], expected[1][0], atol=1e-12, rtol=0)
    assert not torch.allclose(fc[0], plain[0])


def _hvps(model, params, objective, v):
    """(∇f, H·v by forward-over-reverse, H·v by double backward), flattened."""
    grad = torch.func.grad(objective)(params)
    _, hv_fwd = torch.func.jvp(torch.func.grad(objective), (params,), (v,))
    leaves = {n: t.clone().requires_grad_(True) for n, t in params.items()}
    g = torch.autograd.grad(objective(leaves), list(leaves.values()), create_graph=True)
    inner = sum((gi * v[n]).sum() for gi, n in zip(g, leaves))
    hv_rev = torch.autograd.grad(inner, list(leaves.values()))
    flat = [torch.cat([t.flatten() for t in ts]) for ts in (grad.values(), g, hv_fwd.values(), hv_rev)]
    return flat[0], flat[1].detach(), flat[2], flat[3]


@pytest.mark.parametrize("context", ["eager_attention", "exact_float64"])
def test_func_grad_and_second_order_derivatives_work_on_the_model(batch, context):
    """torch.func.grad equals autograd; forward-over-reverse equals double backward (HVP).

    transformers' float32 RMSNorm/softmax limit float64 models to ~1e-7 under eager_attention;
    exact_float64 removes that rounding, so the two HVPs then agree to float64 precision.
    """
    model = tiny_model(mtp_depths=1)
    ids, mask = batch
    params = {n: p.detach().clone() for n, p in model.named_parameters() if n in model.shared_param_names()}
    valid = mask.bool()

    def objective(p):
        lp, q = _aligned(model, p, ids, mask)
        return torch.where(valid, finite(lp), 0).sum() + torch.where(valid, finite(q), 0).sum() * 0.5

    v = {n: torch.randn(t.shape, dtype=t.dtype, generator=torch.Generator().manual_seed(i))
         for i, (n, t) in enumerate(params.items())}
    ctx = eager_attention if context == "eager_attention" else exact_float64
    with ctx(model):
        grad_func, grad_autograd, hv_fwd, hv_rev = _hvps(model, params, objective, v)
    assert model.trunk.config._attn_implementation == "sdpa"  # restored
    torch.testing.assert_close(grad_func, grad_autograd, atol=1e-12, rtol=1e-10)
    assert torch.isfinite(hv_rev).all() and hv_rev.norm() > 0
    tol = 1e-6 if context == "eager_attention" else 1e-12
    assert (hv_fwd - hv_rev).norm() <= tol * hv_rev.norm()


def test_exact_float64_changes_float64_values_only_by_float32_rounding(batch):
    model = tiny_model(mtp_depths=1)
    plain = model(*batch)
    with exact_float64(model):
        exact = model(*batch)
    assert "forward" not in model.trunk.model.norm.__dict__  # per-instance patch removed
    torch.testing.assert_close(exact[0], plain[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(exact[1][0], plain[1][0], atol=1e-6, rtol=0)


def _aligned(model, params, ids, mask):
    logits, mtp_logits = torch.func.functional_call(model, params, (ids, mask))
    logp = selective_log_softmax(logits[:, :-1], ids[:, 1:])
    q = selective_log_softmax(mtp_logits[0][:, :-1], ids[:, 2:])
    nan = torch.full_like(ids[:, :1], float("nan"), dtype=logp.dtype)
    return torch.cat([nan, logp], 1), torch.cat([nan, nan, q], 1)


# -- save / load ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_save_load_round_trip_gives_identical_logits_and_tokenizer(tmp_path, family):
    tok = build_tokenizer()
    model = build_model({**TINY, "family": family, "mtp_depths": 2}, tokenizer=tok, seed=1)
    path = save_model(model, tmp_path / "ckpt", tokenizer=tok)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directory left behind
    loaded = load_model(path, expect={"vocab_size": len(tok), "mtp_depths": 2})
    ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    a, b = model(ids, mask), loaded(ids, mask)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    assert loaded.config == model.config and read_model_config(path) == model.config
    assert load_tokenizer(path).encode("hello\nworld") == tok.encode("hello\nworld")


def test_saving_over_a_checkpoint_replaces_it_and_other_directories_are_refused(tmp_path):
    first, second = tiny_model(seed=0).float(), tiny_model(seed=1).float()
    path = save_model(first, tmp_path / "ckpt")
    save_model(second, path)
    assert torch.equal(load_model(path).mtp[0].proj.weight, second.mtp[0].proj.weight)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]

    class FailingTokenizer:  # an interrupted save leaves the previous checkpoint intact
        def save_pretrained(self, _):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_model(first, path, tokenizer=FailingTokenizer())
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert torch.equal(load_model(path).mtp[0].proj.weight, second.mtp[0].proj.weight)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        save_model(first, tmp_path / "other")


def test_loading_errors_name_the_problem(tmp_path):
    model = tiny_model(mtp_depths=1).float()
    path = save_model(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "missing")
    for field, value in [("vocab_size", V + 1), ("hidden_size", 64), ("mtp_depths", 2)]:
        with pytest.raises(ValueError, match=field):
            load_model(path, expect={field: value})
    with pytest.raises(ValueError, match="hidden_size"):
        load_model(path, expect=ModelConfig(**{**TINY, "hidden_size": 64}))

    broken = tmp_path / "broken"
    save_model(model, broken)
    weights = broken / "mtp.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt MTP weights"):
        load_model(broken)
    weights.unlink()
    with pytest.raises(ValueError, match=r"mtp\.safetensors is missing"):
        load_model(broken)
    save_file({"0.proj.weight": torch.zeros(3, 3)}, str(weights))
    with pytest.raises(ValueError, match="does not fit"):
        load_model(broken)

    trunk_only = tmp_path / "trunk"
    save_model(model, trunk_only)
    trunk_file = trunk_only / "model.safetensors"
    trunk_file.write_bytes(trunk_file.read_bytes()[:50])
    with pytest.raises(ValueError, match="cannot load the trunk weights"):
        load_model(trunk_only)

    (tmp_path / "plain").mkdir()
    model.trunk.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="plain transformers checkpoint"):
        load_model(tmp_path / "plain")


def test_init_from_a_plain_hf_checkpoint_builds_fresh_mtp_modules(tmp_path):
    donor = tiny_model(mtp_depths=1, seed=5).float()
    donor.trunk.save_pretrained(tmp_path / "hf")
    model = build_model(ModelConfig(init_from=str(tmp_path / "hf"), mtp_depths=2), seed=0)
    assert model.config.hidden_size == 32 and model.config.vocab_size == V and model.num_mtp == 2
    ids = tokens()
    assert torch.equal(model(ids)[0], donor(ids)[0])
    assert not torch.equal(model.mtp[0].proj.weight, donor.mtp[0].proj.weight)
    with pytest.raises(ValueError, match="hidden_size"):
        build_model(ModelConfig(init_from=str(tmp_path / "hf"), hidden_size=64))
    with pytest.raises(ValueError, match="does not exist"):
        build_model(ModelConfig(init_from=str(tmp_path / "none")))
