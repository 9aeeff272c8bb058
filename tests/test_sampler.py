"""The KV-cached sampler: its log-probs are the policy's, its layout is the documented one.

Two decoders run the forward passes: ``StaticCacheDecoder`` (the fast one, the trunk's layers by
hand) and ``TransformersDecoder`` (the reference, the ``transformers`` forward). They are compared
step by step on the same inputs, and whole rollouts through either are compared to each other.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from occ_theory.models import ModelConfig, aligned_logprobs, build_model
from occ_theory.rl import sampler
from occ_theory.rl.sampler import Rollout, StaticCacheDecoder, TransformersDecoder, generate, sample_next

TINY = dict(family="qwen2", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            max_position_embeddings=128)
PAD, BOS = 0, 1
PROMPTS = [[BOS, 5, 6, 7, 8, 9], [BOS, 10], [BOS, 11, 12, 13]]  # different lengths: left padding


def model_with(vocab: int, seed: int = 0, dtype=torch.float64, family: str = "qwen2"):
    return build_model(ModelConfig(**{**TINY, "family": family}, vocab_size=vocab), seed=seed).to(dtype)


@pytest.fixture(scope="module")
def model():
    return model_with(vocab=32)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def family_model(request):
    return model_with(vocab=32, family=request.param)


def llama_with_biases() -> nn.Module:
    """A bare Llama trunk with every optional bias and a head size other than H / heads."""
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, attention_bias=True, mlp_bias=True,
                      max_position_embeddings=64, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    trunk = LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for p in trunk.parameters():
            p.normal_(0.0, 0.3)  # biases and norm scales away from 0 / 1
    return trunk


def smollm2_like() -> nn.Module:
    """A bare Llama trunk laid out as SmolLM2: tied embeddings, rope_theta 1e5, no biases."""
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, rope_theta=100000.0, tie_word_embeddings=True,
                      max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(1)
    trunk = LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for p in trunk.parameters():
            p.normal_(0.0, 0.3)
    return trunk


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run(model, prompts=PROMPTS, n=12, temperature=1.0, top_p=1.0, eos=None, seed=0, greedy=False) -> Rollout:
    return generate(model, prompts, n, temperature, top_p, eos_id=eos, pad_id=PAD, generator=gen(seed), greedy=greedy)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.8), (1.3, 0.5)])
def test_sampler_logprobs_equal_a_fresh_aligned_logprobs_forward(family_model, temperature, top_p):
    model = family_model
    roll = run(model, temperature=temperature, top_p=top_p, eos=3)
    logp, _ = aligned_logprobs(model, roll.input_ids, roll.attention_mask, temperature=temperature)
    resp = roll.response_mask.bool()
    assert roll.logprobs.dtype == torch.float32
    torch.testing.assert_close(roll.logprobs[resp].double(), logp[resp].detach(), atol=1e-6, rtol=0)
    assert torch.count_nonzero(roll.logprobs[~resp]) == 0


def test_layout_left_padded_prompts_then_response_then_right_padding(model):
    roll = run(model, n=8)
    plen = max(map(len, PROMPTS))
    assert roll.prompt_len == plen and roll.input_ids.shape == (3, plen + 8)
    for i, p in enumerate(PROMPTS):
        assert roll.input_ids[i, plen - len(p):plen].tolist() == p
        assert roll.input_ids[i, :plen - len(p)].eq(PAD).all()
        assert roll.attention_mask[i, :plen].tolist() == [0] * (plen - len(p)) + [1] * len(p)
    assert roll.response_mask[:, :plen].eq(0).all() and roll.response_mask[:, plen:].eq(1).all()
    assert roll.response_lengths.tolist() == [8, 8, 8]
    assert [len(r) for r in roll.responses] == [8, 8, 8]


def test_eos_stops_each_row_and_the_batch_stops_when_every_row_has_stopped():
    small = model_with(vocab=6)  # EOS (id 2) has probability ~1/6 per step
    roll = run(small, prompts=[[BOS, 4, 5], [BOS], [BOS, 3, 4, 5, 3]], n=80, eos=2, seed=1)
    plen = roll.prompt_len
    lengths = roll.response_lengths.tolist()
    assert max(lengths) < 80  # every row stopped early
    assert roll.input_ids.shape[1] == plen + 80  # the response block keeps max_new_tokens columns
    for i, n in enumerate(lengths):
        response = roll.input_ids[i, plen:].tolist()
        assert response[n - 1] == 2 and 2 not in response[:n - 1]  # stops at its first EOS, EOS included
        assert all(t == PAD for t in response[n:])
        assert roll.response_mask[i, plen:].tolist() == [1] * n + [0] * (len(response) - n)
        assert roll.attention_mask[i, plen:].tolist() == roll.response_mask[i, plen:].tolist()
        assert roll.responses[i] == response[:n]
    logp, _ = aligned_logprobs(small, roll.input_ids, roll.attention_mask)
    resp = roll.response_mask.bool()
    torch.testing.assert_close(roll.logprobs[resp].double(), logp[resp].detach(), atol=1e-6, rtol=0)


def test_same_seed_same_rollout_other_seed_other_rollout(model):
    a, b, c = run(model, seed=5, top_p=0.9), run(model, seed=5, top_p=0.9), run(model, seed=6, top_p=0.9)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_sampling_uses_only_the_passed_generator(model):
    torch.manual_seed(0)
    a = run(model, seed=5)
    torch.manual_seed(123)
    b = run(model, seed=5)
    assert torch.equal(a.input_ids, b.input_ids)


def test_greedy_picks_the_argmax_of_the_full_forward_and_matches_hf_generate(model):
    roll = run(model, n=10, greedy=True, temperature=0.5)
    logits, _ = model(roll.input_ids, roll.attention_mask, with_mtp=False)
    plen = roll.prompt_len
    assert torch.equal(roll.input_ids[:, plen:], logits[:, plen - 1:-1].argmax(-1))
    ids, mask = roll.input_ids[:, :plen], roll.attention_mask[:, :plen]
    with torch.no_grad():
        hf = model.trunk.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                  pad_token_id=PAD, eos_token_id=None)
    assert torch.equal(hf[:, plen:], roll.input_ids[:, plen:])


def test_a_tiny_top_p_keeps_only_the_most_likely_token(model):
    assert torch.equal(run(model, top_p=1e-9, seed=3).input_ids, run(model, greedy=True).input_ids)


def test_sample_next_draws_from_the_nucleus_distribution():
    """Empirical frequencies over many rows match softmax(logits / T) restricted to the nucleus."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]]).repeat(40000, 1)
    temperature, top_p = 0.9, 0.8
    probs = torch.softmax(logits[0] / temperature, -1)
    keep = (torch.cumsum(probs, 0) - probs) < top_p  # a descending-sorted row
    target = probs * keep / (probs * keep).sum()
    tokens, lp = sample_next(logits, temperature, top_p, greedy=False, generator=gen(0))
    freq = torch.bincount(tokens, minlength=6).double() / len(tokens)
    assert freq[~keep].sum() == 0
    assert (freq - target).abs().max() < 0.01  # ~4 standard errors
    torch.testing.assert_close(lp, probs.log()[tokens])


def test_bad_arguments_are_rejected_with_the_setting_named(model):
    with pytest.raises(ValueError, match="generator"):
        generate(model, PROMPTS, 4, eos_id=2, pad_id=PAD, generator=None)
    with pytest.raises(ValueError, match="top_p"):
        run(model, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        run(model, temperature=0.0)
    with pytest.raises(ValueError, match="prompts"):
        run(model, prompts=[[1], []])
    with pytest.raises(ValueError, match="max_new_tokens"):
        run(model, n=0)


def test_bf16_autocast_rollouts_record_float32_policy_logprobs():
    model = model_with(vocab=32, dtype=torch.float32)
    roll = generate(model, PROMPTS, 6, 0.8, 0.9, eos_id=3, pad_id=PAD, generator=gen(0),
                    autocast_dtype=torch.bfloat16)
    resp = roll.response_mask.bool()
    assert roll.logprobs.dtype == torch.float32 and torch.isfinite(roll.logprobs).all()
    logp, _ = aligned_logprobs(model, roll.input_ids, roll.attention_mask, temperature=0.8)
    torch.testing.assert_close(roll.logprobs[resp], logp[resp].detach(), atol=0.1, rtol=0)  # bf16 forward


# -- the fast decoder against the reference ------------------------------------------------------


def reference_only(monkeypatch) -> None:
    monkeypatch.setattr(StaticCacheDecoder, "supports", staticmethod(lambda trunk: False))


def teacher_forced_logits(decoder_cls, trunk: nn.Module, prompt_len: int, ids, mask) -> list[torch.Tensor]:
    """Last-position logits after the prefill and after every later column of ``ids``."""
    ids, mask = ids.clone(), mask.clone()
    with torch.inference_mode():
        decoder = decoder_cls(trunk, ids, mask, prompt_len)
        out = [decoder.prefill()]
        out += [decoder.step(col) for col in range(prompt_len, ids.shape[1] - 1)]
    return out


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("trunk", ["qwen2", "llama", "llama_biases", "smollm2_like"])
def test_static_cache_decoder_logits_equal_the_transformers_forward_at_every_step(trunk, padded):
    """Prefill and steps on (left-padded) prompts, with response columns that later end (mask 0)."""
    special = {"llama_biases": llama_with_biases, "smollm2_like": smollm2_like}
    trunk = special[trunk]() if trunk in special else model_with(vocab=32, family=trunk).trunk
    assert StaticCacheDecoder.supports(trunk)
    g = torch.Generator().manual_seed(0)
    plen, width = 6, 14
    ids = torch.randint(4, 32, (3, width), generator=g)
    mask = torch.ones_like(ids)
    if padded:  # the prefill then runs on the real tokens only
        mask[1, :4] = 0
        mask[2, :5] = 0
    mask[1, 10:] = 0  # a row that stopped: its later columns are padding
    ids[mask == 0] = PAD
    fast = teacher_forced_logits(StaticCacheDecoder, trunk, plen, ids, mask)
    ref = teacher_forced_logits(TransformersDecoder, trunk, plen, ids, mask)
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)  # RMSNorm's float32 bounds the agreement


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("greedy", [False, True])
def test_fast_and_reference_decoders_give_the_same_rollout(monkeypatch, family, greedy):
    model = model_with(vocab=32, family=family, dtype=torch.float32)
    fast = run(model, n=16, temperature=0.8, top_p=0.9, eos=3, seed=4, greedy=greedy)
    reference_only(monkeypatch)
    ref = run(model, n=16, temperature=0.8, top_p=0.9, eos=3, seed=4, greedy=greedy)
    assert torch.equal(fast.input_ids, ref.input_ids) and torch.equal(fast.response_mask, ref.response_mask)
    torch.testing.assert_close(fast.logprobs, ref.logprobs, atol=1e-5, rtol=0)


def test_an_unknown_layer_structure_falls_back_to_the_transformers_forward():
    model = model_with(vocab=32)
    for layer in model.trunk.model.layers:
        layer.mlp = nn.Sequential(layer.mlp)  # same function, a structure the fast decoder does not know
    assert not StaticCacheDecoder.supports(model.trunk)
    roll = run(model, temperature=0.7, top_p=0.8, eos=3)
    logp, _ = aligned_logprobs(model, roll.input_ids, roll.attention_mask, temperature=0.7)
    resp = roll.response_mask.bool()
    torch.testing.assert_close(roll.logprobs[resp].double(), logp[resp].detach(), atol=1e-6, rtol=0)


def test_a_family_it_does_not_implement_falls_back_and_records_the_full_forward_logprobs():
    """Qwen3 (q/k norms in attention) is not the Qwen2/Llama layer: refused, sampled through its own forward."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    trunk = Qwen3ForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for p in trunk.parameters():
            p.normal_(0.0, 0.3)  # q/k norm scales away from 1: a decoder that skipped them would differ
    assert not StaticCacheDecoder.supports(trunk)
    roll = generate(trunk, PROMPTS, 10, 0.7, 0.8, eos_id=3, pad_id=PAD, generator=gen(0))
    mask = roll.attention_mask
    logits = trunk(input_ids=roll.input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    logp = torch.log_softmax(logits[:, :-1] / 0.7, -1).gather(-1, roll.input_ids[:, 1:, None])[..., 0]
    resp = roll.response_mask[:, 1:].bool()
    torch.testing.assert_close(roll.logprobs[:, 1:][resp].double(), logp[resp].detach(), atol=1e-6, rtol=0)


def test_a_rotary_table_that_depends_on_the_sequence_length_falls_back():
    model = model_with(vocab=32)
    model.trunk.model.rotary_emb.rope_type = "dynamic"
    assert not StaticCacheDecoder.supports(model.trunk)


def test_the_reference_decoder_alone_passes_the_aligned_logprobs_check(monkeypatch, model):
    reference_only(monkeypatch)
    roll = run(model, temperature=0.7, top_p=0.8, eos=3)
    logp, _ = aligned_logprobs(model, roll.input_ids, roll.attention_mask, temperature=0.7)
    resp = roll.response_mask.bool()
    torch.testing.assert_close(roll.logprobs[resp].double(), logp[resp].detach(), atol=1e-6, rtol=0)


def test_short_rows_softmax_equals_torch_softmax():
    scores = torch.randn(5, 3, 7, dtype=torch.float64)
    scores[0, :, :2] = float("-inf")
    torch.testing.assert_close(sampler._softmax(scores), torch.softmax(scores, -1))


def test_prompt_width_aligns_columns_and_keeps_every_response_column():
    """What data-parallel processes rely on to concatenate their rollouts column-aligned."""
    from occ_theory.models import ModelConfig, aligned_logprobs, build_model, build_tokenizer
    from occ_theory.rl.sampler import generate

    tok = build_tokenizer()
    model = build_model(ModelConfig(family="qwen2", hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                    num_kv_heads=1, max_position_embeddings=64), tok, seed=0)
    prompts = [[1, 20, 21], [1, 22]]
    ro = generate(model, prompts, 6, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                  generator=torch.Generator().manual_seed(0), prompt_width=5)
    assert ro.prompt_len == 5 and ro.input_ids.shape == (2, 11)
    assert ro.input_ids[0, 2:5].tolist() == [1, 20, 21] and ro.input_ids[1, 3:5].tolist() == [1, 22]
    logp, _ = aligned_logprobs(model, ro.input_ids, ro.attention_mask)
    m = ro.response_mask.bool()
    assert torch.allclose(logp[m], ro.logprobs[m], atol=1e-5)
    import pytest

    with pytest.raises(ValueError, match="prompt_width"):
        generate(model, prompts, 2, eos_id=None, pad_id=0, generator=torch.Generator(), prompt_width=2)
