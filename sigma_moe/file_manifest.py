"""A folder's manifest: every file with its size and SHA-256, written last, checked before use.

Checkpoints (``launch/checkpoint/manifest.py``) and token shards (``launch/data/prepare.py``) both
use it: a folder is complete once its manifest exists, and a truncated, zeroed, deleted or bit-flipped
file is found and named instead of being read silently. Every package may import this module (it
imports only the standard library and :mod:`.atomic_io`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sigma_moe.atomic_io import atomic_write_text

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path, extra: dict | None = None) -> dict:
    """List every file under ``folder`` (recursively) in ``folder/manifest.json``, atomically, with
    ``extra`` entries beside ``files``; return what was written."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"format": 1, **(extra or {}), "files": files}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def manifest_problem(folder: Path, *, checksums: bool = True) -> str | None:
    """None when every file the manifest lists is there with its size (and, with ``checksums``, its
    bytes); else a sentence naming the first file that is not (or the manifest's own problem)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return f"{folder} is incomplete: it has no {MANIFEST} (its writing did not finish)"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{manifest_path} is unreadable ({e})"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing (listed in {MANIFEST})"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{path} has {size:,} bytes, the manifest lists {want['bytes']:,} (truncated or overwritten)"
        if checksums and sha256_file(path) != want["sha256"]:
            return f"{path} is corrupted: its SHA-256 differs from the manifest's"
    return None
