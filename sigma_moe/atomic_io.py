"""Atomic file writes: a file is written under a temporary name in its folder, then renamed over the
target (``os.replace``, atomic on POSIX), so a reader or a crash sees the old file or the new one,
never a part of one. A failed write removes its temporary file and leaves the target as it was.

Every package may import this module (it imports only the standard library); it is the one place
that writes this way (checkpoints, the expert files, caches, run results, heartbeats, configs).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` to fill a temporary file beside ``path`` (created with the usual permissions,
    as ``open`` would), then rename it to ``path``. ``write`` gets a path, not a handle, so writers
    that report their own errors on a path (``torch.save``) keep doing so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` as UTF-8."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
