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

import json
import logging
from pathlib import Path

from sigma_moe.distributed.checkpoint import CheckpointError
from sigma_moe.distributed.deepspeed_compat import earlier_format_files
from sigma_moe.file_manifest import MANIFEST, manifest_problem, write_manifest

logger = logging.getLogger(__name__)
META = "meta.json"
FORMAT = 2  # meta.json's "format": saved with a manifest
__all__ = ["FORMAT", "MANIFEST", "META", "CheckpointCorrupt", "is_complete", "verify", "write_manifest"]


class CheckpointCorrupt(CheckpointError):
    """A tag folder whose files do not match its manifest (the message names the file)."""


def is_complete(tag_dir: Path) -> bool:
    """The save of ``tag_dir`` finished (its manifest, or for older checkpoints its meta.json, exists)."""
    return (tag_dir / MANIFEST).is_file() or (tag_dir / META).is_file()


def verify(tag_dir: Path, *, checksums: bool = True) -> None:
    """Raise :class:`CheckpointCorrupt` naming the first file that is missing, has another size or
    (with ``checksums``) other bytes than the manifest lists."""
    if not (tag_dir / MANIFEST).is_file():
        _verify_earlier_format(tag_dir)
        return
    problem = manifest_problem(tag_dir, checksums=checksums)
    if problem is not None:
        raise CheckpointCorrupt(problem)


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
