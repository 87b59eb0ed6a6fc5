"""Atomic file writes: a killed or failing save never leaves a partial file under the real name.

Everything is written to a temporary name in the destination folder (same filesystem, so the
final ``os.replace`` is an atomic rename), flushed and fsynced, then renamed over the target.
On any exception the temporary file is removed and an existing file at the target is untouched.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import torch


def _temporary_name(path: Path) -> Path:
    # Hidden and clearly temporary, so a crash leftover is never mistaken for a model file.
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    # The rename itself is only durable once the directory entry is on disk (POSIX); Windows
    # cannot open directories, which is harmless to skip.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it to ``path``.

    For writers that want a file name rather than a file object (``safetensors.torch.save_file``).
    The temporary file is created by the writer, so its permissions follow the umask.
    """
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        yield tmp
        _fsync_file(tmp)
        # Some writers create files 0600; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file for writing; it replaces ``path`` only if the block completes.

    ``mode`` is "wb" or "w" (text, then ``encoding`` defaults to UTF-8).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write supports modes 'w' and 'wb', not {mode!r}")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    # "x": never clobber a stray file that happens to have the temporary name.
    with atomic_path(path) as tmp, open(tmp, mode.replace("w", "x"), encoding=encoding) as f:
        yield f
        f.flush()


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` (and string ``metadata``) as a safetensors file, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_safetensors(path: str | os.PathLike, what: str = "weights") -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file. Other formats are refused: unpickling runs code."""
    from safetensors.torch import load_file

    from library.errors import UserError

    if not os.fspath(path).endswith(".safetensors"):
        raise UserError(f"{path}: {what} must be a .safetensors file")
    if not os.path.isfile(path):
        raise UserError(f"{what} file not found: {path}")
    from library.weights_check import check_weight_file

    check_weight_file(path)
    return load_file(path)


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path``, atomically."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)
