"""A checkpoint's manifest: every file of a tag folder with its size and SHA-256, written last.

A tag folder is *complete* when it holds ``manifest.json``: the save writes it after every rank's
files and ``meta.json`` are in the temporary folder, and only then renames the folder into place.
Before a checkpoint is loaded its files are checked against the manifest, so a truncated, zeroed,
deleted or bit-flipped file is found and named instead of loading silently or failing deep inside
``torch.load``. A checkpoint of this format (``meta.json`` says ``format``) without its manifest is
incomplete like any damaged one (a deleted manifest must not turn the checks off); only checkpoints
saved before manifests existed load unverified, once their expected files are all there, with a
warning naming them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from sigma_moe.atomic_io import atomic_write_text
from sigma_moe.distributed.checkpoint import CheckpointError
from sigma_moe.distributed.deepspeed_compat import earlier_format_files

logger = logging.getLogger(__name__)
MANIFEST = "manifest.json"
META = "meta.json"
FORMAT = 2  # meta.json's "format": saved with a manifest


class CheckpointCorrupt(CheckpointError):
    """A tag folder whose files do not match its manifest (the message names the file)."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(tag_dir: Path) -> None:
    """List every file under ``tag_dir`` (recursively) in ``tag_dir/manifest.json``, atomically."""
    files = {}
    for path in sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(tag_dir).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    atomic_write_text(tag_dir / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1))


def is_complete(tag_dir: Path) -> bool:
    """The save of ``tag_dir`` finished (its manifest, or for older checkpoints its meta.json, exists)."""
    return (tag_dir / MANIFEST).is_file() or (tag_dir / META).is_file()


def verify(tag_dir: Path, *, checksums: bool = True) -> None:
    """Raise :class:`CheckpointCorrupt` naming the first file that is missing, has another size or
    (with ``checksums``) other bytes than the manifest lists."""
    manifest_path = tag_dir / MANIFEST
    if not manifest_path.is_file():
        _verify_earlier_format(tag_dir)
        return
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointCorrupt(f"{manifest_path} is unreadable ({e})") from None
    for name, want in files.items():
        path = tag_dir / name
        if not path.is_file():
            raise CheckpointCorrupt(f"{path} is missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CheckpointCorrupt(
                f"{path} has {size:,} bytes, the manifest lists {want['bytes']:,} (truncated or overwritten)"
            )
        if checksums and _sha256(path) != want["sha256"]:
            raise CheckpointCorrupt(f"{path} is corrupted: its SHA-256 differs from the manifest's")


def _verify_earlier_format(tag_dir: Path) -> None:
    """A folder without manifest: of the format before manifests, with every file its load opens (then
    loaded unverified, with a warning), or incomplete."""
    try:
        meta = json.loads((tag_dir / META).read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        raise CheckpointCorrupt(f"{tag_dir} is incomplete: it has no {MANIFEST} (its save did not finish)")
    if "format" in meta or "optimizer_params" in meta:  # written by a version that writes manifests
        raise CheckpointCorrupt(
            f"{tag_dir} is incomplete: it has no {MANIFEST}, which every checkpoint of its format has "
            "(deleted, or its save did not finish), so its files cannot be verified"
        )
    for path in earlier_format_files(tag_dir, int(meta.get("world_size", 1)), int(meta.get("expert_parallel_size", 1))):
        if not path.is_file():
            raise CheckpointCorrupt(f"{path} is missing (a checkpoint of the format before manifests)")
    logger.warning("%s has the format before manifests: loaded without verifying its files", tag_dir)
