"""Durable files: one way to write a file atomically, used by every writer in the
project (driver checkpoints, run checkpoints, the rendezvous file, the control token).

:func:`atomic_write` writes into a temporary file in the target's directory, flushes and
fsyncs it, renames it over the target and fsyncs the directory, so a reader sees the old
file or the new one, never half of one, also after a crash of the machine.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "fsync_dir", "fsync_file"]


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames and creations in directory ``path`` durable (where the file system
    allows it: some network file systems refuse to open a directory; that is ignored)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file someone else wrote (Meep's HDF5 dump, say) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None], *, mode: int = 0o600
) -> Path:
    """Replace ``path`` atomically with ``data`` (bytes, or a function writing to a binary
    file object), file mode ``mode``; returns the path."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode != 0o600:  # mkstemp makes it 0600
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path
