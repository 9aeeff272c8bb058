"""The KV-cached sampler: its log-probs are the policy's, its layout is the documented one."""

from __future__ import annotations

import pytest
import torch

from occ_theory.models import ModelConfig, aligned_logprobs, build_model
from occ_theory.rl.sampler import Rollout, generate, sample_next

TINY = dict(family="qwen2", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            max_position_embeddings=128)
PAD, BOS = 0, 1
PROMPTS = [[BOS, 5, 6, 7, 8, 9], [BOS, 10], [BOS, 11, 12, 13]]  # different lengths: left padding


def model_with(vocab: int, seed: int = 0, dtype=torch.float64):
    return build_model(ModelConfig(**TINY, vocab_size=vocab), seed=seed).to(dtype)


@pytest.fixture(scope="module")
def model():
    return model_with(vocab=32)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run(model, prompts=PROMPTS, n=12, temperature=1.0, top_p=1.0, eos=None, seed=0, greedy=False) -> Rollout:
    return generate(model, prompts, n, temperature, top_p, eos_id=eos, pad_id=PAD, generator=gen(seed), greedy=greedy)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.8), (1.3, 0.5)])
def test_sampler_logprobs_equal_a_fresh_aligned_logprobs_forward(model, temperature, top_p):
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
    assert roll.input_ids.shape[1] == plen + max(lengths) < plen + 80  # stopped early, no all-pad columns
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
