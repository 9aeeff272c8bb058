"""Pretrained checkpoints under study: tiny random Llama / Qwen2 / Qwen3 models saved as plain HF
directories with a real byte-level BPE tokenizer (trained here by ``tokenizers``), loaded by
``load_pretrained`` with MTP modules attached.

The three tokenizers differ the way real ones do: the Llama one has a BOS token, no pad token and no
chat template; the Qwen2 and Qwen3 ones have no BOS token (``bos_token: null``) and a ChatML chat
template.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from occ_theory.models import (
    aligned_logprobs,
    load_model,
    load_pretrained,
    load_tokenizer,
    module_group,
    save_model,
)

VOCAB = 320  # model vocabulary; the BPE tokenizer has fewer tokens (real checkpoints pad it too)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": False}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"tie_word_embeddings": True, "head_dim": 16}),  # head_dim != H/heads
}


def _corpus() -> list[str]:
    words = ["the", "answer", "is", "what", "plus", "minus", "times", "solve", "for", "x", "Answer:", "number"]
    return [f"{words[i % 12]} {i} {words[(3 * i) % 12]} {i * 7 % 97} = {i + 13}." for i in range(300)]


def bpe_tokenizer(style: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few hundred strings, with Llama or Qwen special tokens."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>"] if style == "llama" else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(_corpus(), trainer)
    if style == "llama":
        return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def save_hf_model(path, family: str, seed: int = 0) -> str:
    config_cls, model_cls, extra = FAMILIES[family]
    tok = bpe_tokenizer("llama" if family == "llama" else "qwen")
    torch.manual_seed(seed)
    model = model_cls(config_cls(**SIZES, **extra, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                 pad_token_id=tok.pad_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    return {family: save_hf_model(root / family, family) for family in FAMILIES}


def _batch(tokenizer, texts):
    rows = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # left padding, as the sampler writes it
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    return ids, mask


TEXTS = ["what is 12 plus 30 = 42.", "solve for x 7 = 20."]


# -- loading --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_pretrained_attaches_mtp_modules_of_the_trunks_own_layer_class(checkpoints, family):
    model, tok = load_pretrained(checkpoints[family], mtp_depths=2)
    layer = type(model.trunk.base_model.layers[0])
    assert model.num_mtp == 2 and all(type(m.block) is layer for m in model.mtp)
    assert model.config.family == family and model.config.vocab_size == VOCAB
    assert len(tok) < VOCAB and tok.pad_token_id is not None  # Llama: EOS pads
    # copy_last: every MTP block starts as the trunk's last block, the final norm as the trunk's
    last = model.trunk.base_model.layers[-1].state_dict()
    for m in model.mtp:
        assert all(torch.equal(v, last[k]) for k, v in m.block.state_dict().items())
        assert torch.equal(m.norm.weight, model.trunk.base_model.norm.weight)
    fresh, _ = load_pretrained(checkpoints[family], mtp_init="fresh")
    assert not torch.equal(fresh.mtp[0].block.mlp.up_proj.weight, last["mlp.up_proj.weight"])
    # the trunk is the checkpoint's: its logits are the transformers model's own
    _, model_cls, _ = FAMILIES[family]
    reference = model_cls.from_pretrained(checkpoints[family]).float().eval()
    ids, mask = _batch(tok, TEXTS)
    torch.testing.assert_close(model(ids, mask)[0][mask.bool()], reference(ids, attention_mask=mask).logits[mask.bool()],
                               atol=1e-5, rtol=1e-5)


def test_the_tokenizers_special_tokens_are_the_checkpoints(checkpoints):
    _, llama = load_pretrained(checkpoints["llama"])
    _, qwen = load_pretrained(checkpoints["qwen3"])
    assert llama.bos_token == "<s>" and llama.pad_token == "</s>" and llama.chat_template is None
    assert qwen.bos_token_id is None and qwen.eos_token == "<|im_end|>" and qwen.chat_template == CHATML


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_aligned_logprobs_are_causal_and_aligned_on_a_pretrained_trunk(checkpoints, family):
    model, tok = load_pretrained(checkpoints[family], mtp_depths=2)
    model = model.double()
    ids, mask = _batch(tok, TEXTS)
    logits, mtp_logits = model(ids, mask)
    logp, (mtp1, mtp2) = aligned_logprobs(model, ids, mask)
    t = ids.shape[1] - 2
    torch.testing.assert_close(logp[:, t], torch.log_softmax(logits[:, t - 1], -1).gather(-1, ids[:, t, None])[:, 0])
    torch.testing.assert_close(mtp2[:, t], torch.log_softmax(mtp_logits[1][:, t - 3], -1).gather(-1, ids[:, t, None])[:, 0])
    changed = ids.clone()
    changed[:, t:] = (changed[:, t:] + 11) % len(tok)  # token t and later
    after = aligned_logprobs(model, changed, mask)
    for before, now in zip((logp, mtp1, mtp2), (after[0], *after[1])):
        torch.testing.assert_close(now[:, :t], before[:, :t], atol=1e-12, rtol=0, equal_nan=True)
        assert (now[:, t] - before[:, t]).abs().max() > 0  # token t itself is scored anew


# -- gradient cuts --------------------------------------------------------------------------------


def _mtp_group_grads(model, mtp_grad, ids, mask):
    model.zero_grad(set_to_none=True)
    _, mtp = aligned_logprobs(model, ids, mask, mtp_grad=mtp_grad)
    torch.where(torch.isnan(mtp), 0.0, mtp).sum().backward()
    norms: dict[str, float] = {}
    for n, p in model.named_parameters():
        g = 0.0 if p.grad is None else float(p.grad.abs().sum())
        norms[module_group(n)] = norms.get(module_group(n), 0.0) + g
    return norms


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_regimes_gradient_cut_holds_on_a_pretrained_trunk(checkpoints, family):
    """u = ∇_θS M: zero under detach, the output head's only under detach_encoder, the trunk's under full."""
    model, tok = load_pretrained(checkpoints[family])
    model = model.double()
    ids, mask = _batch(tok, TEXTS)
    head = "head" if family == "llama" else "embed"  # tied Qwen: the head is the embedding matrix
    detach = _mtp_group_grads(model, "detach", ids, mask)
    assert detach.pop("mtp") > 0 and set(detach.values()) == {0.0}
    encoder = _mtp_group_grads(model, "detach_encoder", ids, mask)
    assert encoder.pop("mtp") > 0 and encoder.pop(head) > 0 and set(encoder.values()) == {0.0}
    full = _mtp_group_grads(model, "full", ids, mask)
    assert all(v > 0 for v in full.values()), full


# -- save / load ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_load_round_trip_keeps_logits_and_the_tokenizer(checkpoints, family, tmp_path):
    model, tok = load_pretrained(checkpoints[family])
    path = save_model(model, tmp_path / "ckpt", tok)
    again, tok2 = load_model(path), load_tokenizer(path)
    ids, mask = _batch(tok, TEXTS)
    for a, b in zip([model(ids, mask)[0], *model(ids, mask)[1]], [again(ids, mask)[0], *again(ids, mask)[1]]):
        assert torch.equal(a, b)
    assert again.config == model.config and again.config.mtp_init == "copy_last"
    assert tok2.get_vocab() == tok.get_vocab() and tok2.chat_template == tok.chat_template
    assert (tok2.bos_token_id, tok2.eos_token_id, tok2.pad_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                         tok.pad_token_id)


# -- refusals -------------------------------------------------------------------------------------


def test_a_checkpoint_that_is_not_a_causal_lm_is_refused(tmp_path):
    tok = bpe_tokenizer("qwen")
    classifier = Qwen2ForSequenceClassification(Qwen2Config(**SIZES, num_labels=2, pad_token_id=tok.pad_token_id))
    classifier.save_pretrained(tmp_path / "cls")
    tok.save_pretrained(tmp_path / "cls")
    with pytest.raises(ValueError, match=r"not a causal LM.*Qwen2ForSequenceClassification"):
        load_pretrained(tmp_path / "cls")
    encoder = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64))
    encoder.save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"model_type 'bert'.*llama"):
        load_pretrained(tmp_path / "bert")


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(checkpoints, tmp_path):
    small = tmp_path / "small"
    config_cls, model_cls, extra = FAMILIES["qwen2"]
    model_cls(config_cls(**{**SIZES, "vocab_size": 64}, **extra)).save_pretrained(small)
    bpe_tokenizer("qwen").save_pretrained(small)
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        load_pretrained(small)
    (small / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"tokenizer\.json is missing"):
        load_pretrained(small)

