"""Identity 4: Hessian-vector products agree across methods and with the explicit Hessian."""

import pytest
import torch
from theory_problems import DT, SoftmaxPolicy, fd_gradient, flat_grad_and_hessian, gen, random_params

from occ_theory.theory import (
    check_dropout,
    decompose,
    decompose_step,
    eager_attention,
    grad_and_hvp,
    grad_and_hvps,
    hessian,
    hvp,
    jvps,
)
from occ_theory.theory.params import flatten, unflatten


def _max_rel(a, b):
    a, b = flatten(a).detach(), flatten(b).detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def policy():
    return SoftmaxPolicy(seed=21, batch=5, length=4, dim=6, hidden=8, vocab=9)


def test_identity4_hvp_methods_agree_with_explicit_hessian(policy):
    v = random_params(gen(22), policy.shapes)
    exact = hessian(policy.rl_objective, policy.params) @ flatten(v)
    n = exact.numel()
    assert n < 5000
    for method in ("fwd-rev", "rev-rev"):
        assert _max_rel(hvp(policy.rl_objective, policy.params, v, method), {"all": exact}) < 1e-10
    assert _max_rel(hvp(policy.rl_objective, policy.params, v, "fd"), {"all": exact}) < 1e-6


def test_grad_and_hvp_returns_the_gradient_of_every_method(policy):
    """The by-product gradient of every method equals central differences of f, one coordinate at a time."""
    v = random_params(gen(23), policy.shapes)
    g_fd = fd_gradient(policy.mtp_objective, policy.params)
    for method in ("fwd-rev", "rev-rev", "fd"):
        g, _ = grad_and_hvp(policy.mtp_objective, policy.params, v, method)
        assert _max_rel(g, {"all": g_fd}) < 1e-8, method


@pytest.mark.parametrize("method", ["fwd-rev", "rev-rev"])
def test_grad_and_hvps_batched_and_looped_equal_the_explicit_hessian(policy, method):
    """Every direction of one call, vectorised or looped over one graph, against H·v with H built
    explicitly; the two paths agree to rounding (float64)."""
    vs = [random_params(gen(s), policy.shapes) for s in (30, 31, 32)]
    g_ref, hess = flat_grad_and_hessian(policy.rl_objective, policy.params)
    out = {batched: grad_and_hvps(policy.rl_objective, policy.params, vs, method, batched=batched)
           for batched in (False, True)}
    for g, hvs in out.values():
        assert _max_rel(g, {"all": g_ref}) < 1e-12
        for v, hv in zip(vs, hvs):
            assert _max_rel(hv, {"all": hess @ flatten(v)}) < 1e-10
    for loop, vec in zip(out[False][1], out[True][1]):
        assert _max_rel(vec, loop) < 1e-12


def test_jvps_batched_and_looped_equal_the_explicit_jacobian(policy):
    """δ = ∂l·v for several v (the Fisher's products): one vectorised pass, passes of at most two, or one per v."""
    vs = [random_params(gen(s), policy.shapes) for s in (33, 34, 35)]
    jac = torch.func.jacrev(lambda x: policy.logp(unflatten(x, policy.params)))(flatten(policy.params))  # (B, T, n)
    for batched, max_batch in ((False, 0), (True, 0), (True, 2), (True, 1)):
        out, deltas = jvps(policy.logp, policy.params, vs, batched=batched, max_batch=max_batch)
        torch.testing.assert_close(out, policy.logp(policy.params), rtol=0, atol=0)
        assert len(deltas) == len(vs)
        for v, d in zip(vs, deltas):
            torch.testing.assert_close(d, jac @ flatten(v), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="max_batch"):
        jvps(policy.logp, policy.params, vs, max_batch=-1)


@pytest.mark.parametrize("method", ["fwd-rev", "rev-rev", "fd"])
def test_grad_and_hvps_project_maps_each_hvp_as_it_is_made(policy, method):
    """``project(i, H·vᵢ)`` replaces each product (the probe keeps two dot products, not the vector)."""
    vs = [random_params(gen(s), policy.shapes) for s in (36, 37)]
    g, hvs = grad_and_hvps(policy.rl_objective, policy.params, vs, method)
    g2, dots = grad_and_hvps(policy.rl_objective, policy.params, vs, method,
                             project=lambda i, hv: float(flatten(vs[i]) @ flatten(hv)))
    assert _max_rel(g2, g) == 0
    assert dots == [float(flatten(v) @ flatten(hv)) for v, hv in zip(vs, hvs)]


def test_hvp_of_linear_function_is_zero_and_unused_params_get_zeros():
    params = random_params(gen(24), {"a": (3,), "b": (2,)})
    v = random_params(gen(25), {"a": (3,), "b": (2,)})

    def linear(p):
        return (p["a"] * torch.arange(3, dtype=DT)).sum()

    for method in ("fwd-rev", "rev-rev", "fd"):
        out = hvp(linear, params, v, method)
        assert all(torch.all(t == 0) for t in out.values()), method
    for batched in (False, True):
        _, (h1, h2) = grad_and_hvps(linear, params, [v, v], "rev-rev", batched=batched)
        assert all(torch.all(t == 0) for t in (*h1.values(), *h2.values()))


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


def _tiny_llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=16, **kw)
    return LlamaForCausalLM(cfg).to(DT)


def _logp_mean(model, ids):
    def f(p):
        out = torch.func.functional_call(model, p, (ids,))
        return torch.log_softmax(out.logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean()

    return f


def test_fused_attention_gives_a_value_error_that_names_eager_attention():
    """A transformers model on its default (SDPA) attention: torch's raw NotImplementedError/RuntimeError
    becomes a ValueError pointing at eager_attention, for every curvature entry point."""
    model = _tiny_llama().eval()
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 11, (2, 6), generator=gen(40))
    f = _logp_mean(model, ids)
    params = {k: t.detach() for k, t in model.named_parameters()}
    v = random_params(gen(41), {k: tuple(t.shape) for k, t in params.items()})
    calls = {
        "hvp fwd-rev": lambda: hvp(f, params, v, "fwd-rev"),
        "hvp rev-rev": lambda: hvp(f, params, v, "rev-rev"),
        "batched rev-rev": lambda: grad_and_hvps(f, params, [v, v], "rev-rev", batched=True),
        "decompose": lambda: decompose(f, f, params, 0.1),
        "decompose_step": lambda: decompose_step(f, params, v, v),
        "jvps": lambda: jvps(lambda p: torch.func.functional_call(model, p, (ids,)).logits, params, [v]),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"eager_attention\(model\)") as err:
            call()
        assert "torch:" in str(err.value) and "attention" in str(err.value.__cause__), name
    with eager_attention(model):
        hvp(f, params, v, "rev-rev")  # the fix works


def test_eager_attention_refuses_active_dropout():
    """Dropout in training mode makes J random: HVPs of different methods disagree silently. Refused,
    with the fix named; model.eval() (or p = 0) is accepted."""
    model = _tiny_llama(attention_dropout=0.1)
    with pytest.raises(ValueError, match=r"model\.eval\(\) first.*'model\.layers\.0\.self_attn' has dropout p=0\.1"):
        with eager_attention(model):
            pass
    with eager_attention(model.eval()):
        pass
    from occ_theory.models import exact_float64

    with pytest.raises(ValueError, match=r"model\.eval\(\) first"), exact_float64(model.train()):
        pass
    head = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5))
    with pytest.raises(ValueError, match=r"model\.eval\(\) first.*'1'.*p=0\.5"):
        check_dropout(head)
    check_dropout(head.eval())
    check_dropout(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.0)).train())
