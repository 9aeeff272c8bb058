"""The character tokenizer: exact round trip, fixed special ids, offline save/load."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from occ_theory.models import SPECIAL_TOKENS, build_tokenizer, load_tokenizer

PRINTABLE = "".join(chr(i) for i in range(32, 127)) + "\n"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_special_tokens_have_fixed_ids_and_vocab_is_specials_plus_printable_ascii(tok):
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == list(SPECIAL_TOKENS)
    assert len(tok) == 4 + len(PRINTABLE) == 100


@pytest.mark.parametrize("text", [PRINTABLE, "  two  spaces\n\nand newlines\n", "x=(3*4)-5; print('ok')  ", "a"])
def test_encode_decode_round_trip_is_exact_one_token_per_character(tok, text):
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_no_special_tokens_are_added_and_decode_can_skip_them(tok):
    ids = tok.encode("hi")
    assert ids == [tok.convert_tokens_to_ids("h"), tok.convert_tokens_to_ids("i")]
    assert tok.decode([tok.bos_token_id, *ids, tok.eos_token_id], skip_special_tokens=True) == "hi"


def test_characters_outside_the_vocabulary_become_unk(tok):
    assert tok.encode("a\tb\u00e9") == [tok.convert_tokens_to_ids("a"), 3, tok.convert_tokens_to_ids("b"), 3]


def test_save_and_load_offline_give_the_same_tokenizer(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    for loaded in (load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)):
        assert loaded.encode(PRINTABLE) == tok.encode(PRINTABLE)
        assert loaded.decode(tok.encode(PRINTABLE)) == PRINTABLE
        assert loaded.eos_token_id == 2 and loaded.pad_token_id == 0


def test_load_tokenizer_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"tokenizer\.json is missing"):
        load_tokenizer(tmp_path)
