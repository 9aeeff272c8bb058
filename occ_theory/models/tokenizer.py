"""A character-level tokenizer built locally with the ``tokenizers`` library (no downloads).

Vocabulary (100 tokens): ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3, then every
printable ASCII character (space .. ``~``) and ``\\n``. Every character is one token, so
``decode(encode(text)) == text`` for any text made of those characters; other characters (tabs,
non-ASCII) become ``<unk>``. Encoding adds no special tokens by itself: prepend
``tokenizer.bos_token_id`` where a task wants one. The literal strings ``<pad>``, ``<bos>``,
``<eos>``, ``<unk>`` in a text are read as the special tokens.

``load_tokenizer`` also reads a pretrained model's own tokenizer (a directory with
``tokenizer.json``, or a ``.gguf`` file); one without a pad token pads with its EOS token.
"""

from __future__ import annotations

import os

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .gguf_file import check_gguf

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
    """A tokenizer saved with ``save_pretrained``, or the one inside a ``.gguf`` file (offline).

    ``ValueError`` when there is none, or when it has neither a pad nor an EOS token; a tokenizer
    without a pad token (Llama, GPT-2 style) gets its EOS token as pad (every consumer masks padding).
    """
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        check_gguf(path)  # a truncated file would fail here with a reshape error that names nothing
        where, extra = os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}
        loader = AutoTokenizer
    else:
        if not os.path.isdir(path):
            raise ValueError(f"tokenizer directory {path!r} does not exist")
        if not os.path.isfile(os.path.join(path, "tokenizer.json")):
            raise ValueError(f"no tokenizer in {path!r}: tokenizer.json is missing")
        where, extra, loader = path, {}, PreTrainedTokenizerFast
    try:
        tokenizer = loader.from_pretrained(where, local_files_only=True, **extra)
    except Exception as err:
        raise ValueError(f"cannot load the tokenizer in {path!r}: {type(err).__name__}: {err}") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer in {path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_character_tokenizer(tokenizer: object) -> bool:
    """Whether ``tokenizer`` is the built-in character tokenizer (its exact vocabulary)."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None or len(tokenizer) != len(SPECIAL_TOKENS) + len(CHARACTERS):
        return False
    return get_vocab() == {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
