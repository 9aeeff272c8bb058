"""A ``.gguf`` file checked before transformers reads it: the ``gguf`` extra installed, and the file whole.

transformers reads a GGUF file's tokenizer before its weights, so a truncated file used to fail in the tokenizer
("cannot reshape array ..."): ``check_gguf`` reads the file's header and tensor table first and names the file.
"""

from __future__ import annotations

import os

from ..extras import require


def check_gguf(path: str | os.PathLike) -> None:
    """``ValueError`` naming ``path`` unless the ``gguf`` extra is installed and ``path`` is a complete GGUF file
    (its header, metadata and every tensor's data within the file)."""
    path = os.fspath(path)
    require("gguf", f"{path} (a .gguf file)")
    from gguf import GGUFReader

    size = os.path.getsize(path)
    try:
        GGUFReader(path)
    except Exception as err:  # numpy's reshape / index errors on a short file, struct errors on a bad header
        with open(path, "rb") as f:
            magic = f.read(4)
        what = ("is not a GGUF file (it does not start with GGUF)" if magic != b"GGUF" else
                f"is truncated or damaged ({size} bytes; its tensor table points past the end or is unreadable: "
                f"{type(err).__name__})")
        raise ValueError(f"{path} {what}") from None
