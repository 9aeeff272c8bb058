"""Identity 4: Hessian-vector products agree across methods and with the explicit Hessian."""

import pytest
import torch
from theory_problems import DT, SoftmaxPolicy, gen, random_params

from occ_theory.theory import eager_attention, grad, grad_and_hvp, hessian, hvp
from occ_theory.theory.params import flatten


def _max_rel(a, b):
    a, b = flatten(a).detach(), flatten(b).detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def policy():
    return SoftmaxPolicy(seed=21, batch=5, length=4, dim=6, hidden=8, vocab=9)


def test_hvp_methods_agree_with_explicit_hessian(policy):
    v = random_params(gen(22), policy.shapes)
    exact = hessian(policy.rl_objective, policy.params) @ flatten(v)
    n = exact.numel()
    assert n < 5000
    for method in ("fwd-rev", "rev-rev"):
        assert _max_rel(hvp(policy.rl_objective, policy.params, v, method), {"all": exact}) < 1e-10
    assert _max_rel(hvp(policy.rl_objective, policy.params, v, "fd"), {"all": exact}) < 1e-6


def test_grad_and_hvp_returns_the_gradient_of_every_method(policy):
    v = random_params(gen(23), policy.shapes)
    _, g_ref = grad(policy.mtp_objective, policy.params)
    for method in ("fwd-rev", "rev-rev", "fd"):
        g, _ = grad_and_hvp(policy.mtp_objective, policy.params, v, method)
        assert _max_rel(g, g_ref) < 1e-12


def test_grad_and_hvps_shares_one_graph_and_equals_separate_hvps(policy):
    from occ_theory.theory import grad_and_hvps

    vs = [random_params(gen(s), policy.shapes) for s in (30, 31, 32)]
    for method in ("fwd-rev", "rev-rev"):
        g, hvs = grad_and_hvps(policy.rl_objective, policy.params, vs, method)
        for v, hv in zip(vs, hvs):
            g1, hv1 = grad_and_hvp(policy.rl_objective, policy.params, v, method)
            assert _max_rel(hv, hv1) < 1e-12 and _max_rel(g, g1) < 1e-12


def test_hvp_of_linear_function_is_zero_and_unused_params_get_zeros():
    params = random_params(gen(24), {"a": (3,), "b": (2,)})
    v = random_params(gen(25), {"a": (3,), "b": (2,)})

    def linear(p):
        return (p["a"] * torch.arange(3, dtype=DT)).sum()

    for method in ("fwd-rev", "rev-rev", "fd"):
        out = hvp(linear, params, v, method)
        assert all(torch.all(t == 0) for t in out.values()), method


def test_hvp_validates_keys_shapes_and_scalar_output(policy):
    v = random_params(gen(26), policy.shapes)
    with pytest.raises(ValueError, match="missing"):
        hvp(policy.rl_objective, policy.params, {k: t for k, t in v.items() if k != "b1"})
    bad = dict(v, b2=torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError, match=r"v\['b2'\] has shape"):
        hvp(policy.rl_objective, policy.params, bad)
    with pytest.raises(ValueError, match="scalar"):
        hvp(policy.logp, policy.params, v)
    with pytest.raises(ValueError, match="unknown HVP method"):
        hvp(policy.rl_objective, policy.params, v, method="bfgs")
    with pytest.raises(ValueError, match="non-empty"):
        hvp(policy.rl_objective, {}, {})


def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                      attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg).to(DT)


def test_eager_attention_makes_both_methods_work_on_a_transformers_model():
    """Under eager (math) attention fwd-rev, rev-rev and the explicit Hessian agree; the setting is restored."""
    model = _tiny_qwen2()
    ids = torch.randint(0, 11, (2, 6), generator=gen(27))
    params = {k: t.detach() for k, t in model.named_parameters() if "layers.0.mlp" in k or "norm" in k}

    def f(p):
        out = torch.func.functional_call(model, p, (ids,))
        return torch.log_softmax(out.logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean()

    v = random_params(gen(28), {k: tuple(t.shape) for k, t in params.items()})
    assert model.config._attn_implementation == "sdpa"
    with eager_attention(model):
        assert model.config._attn_implementation == "eager"
        fr = hvp(f, params, v, "fwd-rev")
        rr = hvp(f, params, v, "rev-rev")
        exact = hessian(f, params) @ flatten(v)
    assert model.config._attn_implementation == "sdpa"
    # transformers' RMSNorm computes in float32 even for a float64 model: agreement is to float32 precision
    assert _max_rel(fr, rr) < 1e-6
    assert _max_rel(fr, {"all": exact}) < 1e-6


def test_eager_attention_restores_setting_after_an_error():
    model = _tiny_qwen2()
    with pytest.raises(RuntimeError), eager_attention(model):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
