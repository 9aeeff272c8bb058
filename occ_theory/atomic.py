"""Atomic writes: every file or directory appears complete or not at all.

A file is written to a temporary sibling, flushed and fsynced, then renamed over the target; a
directory is built under a temporary name and swapped in, the previous one removed only after
the new one is in place. A crash at any point leaves either the old or the new version. What
appears gets the permissions of an ordinary ``open`` / ``mkdir`` under the process's umask.

``check_output_file`` / ``check_output_dir`` tell, before any work, whether an output can be
written there, so that a bad location fails in a second and not after minutes of compute.

A write that fails (a full disk) is an ``OSError`` naming the file meant, not the temporary one, also where
torch or safetensors report it as their own error type (``as_write_error``); ``describe_os_error`` says it
in one line.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_WRITE_FAILURE = re.compile(r"writ|IoError|No space|StorageFull|Errno|disk quota", re.IGNORECASE)
_NO_SPACE = re.compile(r"No space|StorageFull|ENOSPC|code: 28|Errno 28", re.IGNORECASE)


def as_write_error(err: BaseException, path: Path) -> OSError | None:
    """``err``, raised while writing ``path``, as an ``OSError`` naming ``path``; None when it is not a failed write.
    torch (``PytorchStreamWriter failed writing file``) and safetensors (``SafetensorError: IoError(...)``) report
    a full disk as their own error types."""
    if isinstance(err, OSError):
        return OSError(err.errno, err.strerror or str(err), str(path))
    text = str(err)
    if (isinstance(err, RuntimeError) and "inline_container" in text) or (
            (isinstance(err, RuntimeError) or type(err).__name__ == "SafetensorError") and _WRITE_FAILURE.search(text)):
        if _NO_SPACE.search(text) or _disk_full(path):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return OSError(errno.EIO, f"the write failed ({' '.join(text.split())[:200]})", str(path))
    return None


def _disk_full(path: Path, below: int = 64 * 2**20) -> bool:
    """Whether the file system ``path`` is on has less than ``below`` bytes free (torch names no reason)."""
    try:
        return shutil.disk_usage(_nearest_existing(path)).free < below
    except OSError:
        return False


def describe_os_error(err: OSError) -> str:
    """One line: ``cannot write PATH: No space left on device`` (the file and the system's reason)."""
    if err.filename is not None and err.strerror:
        return f"cannot write {err.filename}: {err.strerror}"
    return " ".join(str(err).split())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest existing ancestor."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(path: Path, what: str) -> None:
    """Raise ``NotADirectoryError`` / ``PermissionError`` (naming ``what``, e.g. ``--out``) unless a
    directory can be created or written at ``path``; creates nothing that stays."""
    path = Path(path)
    base = _nearest_existing(path)
    if not base.is_dir():
        raise NotADirectoryError(f"{what} {path}: {base} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".occ-write-check.", dir=base)
    except OSError as e:
        raise PermissionError(f"{what} {path}: cannot write in {base} ({e.strerror})") from e
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: Path, what: str) -> None:
    """Like ``check_output_dir`` for a file to be written at ``path``."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path}: is a directory, not a file")
    check_output_dir(path.parent, what)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; an ordinary open makes 0666 & ~umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):  # named after the file meant, not the temporary one
            raise as_write_error(err, path) from err
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` (which may exist)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; an ordinary mkdir makes 0777 & ~umask
        yield tmp
        mode = 0o666 & ~_umask()  # some writers (safetensors) make 0600 files
        for f in tmp.rglob("*"):
            if f.is_file():
                f.chmod(mode)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        failed = as_write_error(err, path)
        if failed is not None:
            raise failed from err
        raise
