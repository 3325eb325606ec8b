"""A checkpoint's manifest: every file of a tag folder with its size and SHA-256, written last.

A tag folder is *complete* when it holds ``manifest.json``: the save writes it after every rank's
files and ``meta.json`` are in the temporary folder, and only then renames the folder into place.
Before a checkpoint is loaded its files are checked against the manifest, so a truncated, zeroed,
deleted or bit-flipped file is found and named instead of loading silently or failing deep inside
``torch.load``. (Checkpoints saved before manifests existed have ``meta.json`` only; they are taken as
complete without a check.)
"""

from __future__ import annotations

from pathlib import Path

from sigma_moe.distributed.checkpoint import CheckpointError
from sigma_moe.file_manifest import MANIFEST, manifest_problem, write_manifest

META = "meta.json"
__all__ = ["MANIFEST", "META", "CheckpointCorrupt", "is_complete", "verify", "write_manifest"]


class CheckpointCorrupt(CheckpointError):
    """A tag folder whose files do not match its manifest (the message names the file)."""


def is_complete(tag_dir: Path) -> bool:
    """The save of ``tag_dir`` finished (its manifest, or for older checkpoints its meta.json, exists)."""
    return (tag_dir / MANIFEST).is_file() or (tag_dir / META).is_file()


def verify(tag_dir: Path, *, checksums: bool = True) -> None:
    """Raise :class:`CheckpointCorrupt` naming the first file that is missing, has another size or
    (with ``checksums``) other bytes than the manifest lists."""
    if not (tag_dir / MANIFEST).is_file() and (tag_dir / META).is_file():
        return  # saved before manifests: nothing to check against
    problem = manifest_problem(tag_dir, checksums=checksums)
    if problem is not None:
        raise CheckpointCorrupt(problem)
