"""A character-level tokenizer built locally with the ``tokenizers`` library (no downloads).

Vocabulary (100 tokens): ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3, then every
printable ASCII character (space .. ``~``) and ``\\n``. Every character is one token, so
``decode(encode(text)) == text`` for any text made of those characters; other characters (tabs,
non-ASCII) become ``<unk>``. Encoding adds no special tokens by itself: prepend
``tokenizer.bos_token_id`` where a task wants one. The literal strings ``<pad>``, ``<bos>``,
``<eos>``, ``<unk>`` in a text are read as the special tokens.
"""

from __future__ import annotations

import os

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARACTERS = (*(chr(i) for i in range(32, 127)), "\n")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The character tokenizer as a ``PreTrainedTokenizerFast`` (left padding, for generation)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one split per character
    core.decoder = decoders.Fuse()  # join tokens without separators
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """A tokenizer saved with ``save_pretrained`` (offline); ``ValueError`` when there is none."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"tokenizer directory {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise ValueError(f"no tokenizer in {path!r}: tokenizer.json is missing")
    try:
        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    except Exception as err:
        raise ValueError(f"cannot load the tokenizer in {path!r}: {type(err).__name__}: {err}") from err
