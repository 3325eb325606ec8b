"""Finding the checkpoint to load in a checkpoint folder, and the one that is known good.

``latest`` is a hint: resuming takes the checkpoint it names if that one is intact (its files match
its manifest), else the newest intact one, and says which it skipped and why. A folder that holds
checkpoints but no intact one is an error, never a silent start from step 0. Each checkpoint's
``meta.json`` names the run that wrote it (``run``, kept by a resumed run): when ``latest`` is lost
in a folder where another run's checkpoints are too (a run started over there), the newest is not
necessarily the one to continue, so that is an error naming both, not a warning.

``known_good`` names the newest checkpoint whose weights passed a later divergence check (the next
step's loss and gradients computed on them, or the final validation). Pruning never deletes it, and
when a run stops as diverged, ``latest`` is pointed back at it: a divergence that stayed finite long
enough to be saved a few times never takes the last good weights with it.

A save that replaces a step moves the old folder to ``.old-<tag>`` first; a crash before the new one
is renamed in leaves that step only there: :func:`restore_moved_aside` puts it back.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from sigma_moe.atomic_io import atomic_write_text
from sigma_moe.distributed.checkpoint import CheckpointError
from sigma_moe.launch.checkpoint.manifest import META, CheckpointCorrupt, is_complete, verify

logger = logging.getLogger(__name__)
LATEST = "latest"
KNOWN_GOOD = "known_good"
MOVED_ASIDE = ".old-"
_TAG = re.compile(r"^step_(\d+)$")


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag_dir: Path) -> int:
    return int(_TAG.match(Path(tag_dir).name).group(1))


def known_good(directory: Path) -> Path | None:
    """The checkpoint ``known_good`` names, if it is still there."""
    try:
        tag_dir = Path(directory) / (Path(directory) / KNOWN_GOOD).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return tag_dir if _TAG.match(tag_dir.name) and is_complete(tag_dir) else None


def mark_known_good(directory: Path, step: int) -> bool:
    """Name the checkpoint of ``step`` known good if it exists (rank 0); True when it does."""
    tag_dir = Path(directory) / tag_for_step(step)
    if not is_complete(tag_dir):
        return False
    atomic_write_text(Path(directory) / KNOWN_GOOD, tag_dir.name)
    return True


def fall_back_to_known_good(directory: Path) -> str:
    """After a divergence (rank 0): point ``latest`` at the known good checkpoint if it names a later
    one. Returns the clause for the error message."""
    good = known_good(directory)
    if good is None:
        newest = checkpoint_tags(Path(directory))
        return f"; no checkpoint is known good yet (the newest is {newest[0][1]})" if newest else ""
    try:
        named = (Path(directory) / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        named = None
    if named != good.name:
        atomic_write_text(Path(directory) / LATEST, good.name)
        return f"; the newest checkpoint known good is {good}, and {LATEST} names it now"
    return f"; the newest checkpoint known good is {good}"


def restore_moved_aside(directory: Path) -> None:
    """Put back a step a crashed save had moved aside (rank 0, before looking for checkpoints)."""
    for old in sorted(Path(directory).glob(f"{MOVED_ASIDE}step_*")) if Path(directory).is_dir() else []:
        final = old.with_name(old.name[len(MOVED_ASIDE) :])
        if final.exists():  # the save finished: the old copy is garbage
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
            logger.warning("%s restored from %s (a save that replaced it was interrupted)", final, old.name)


def checkpoint_tags(directory: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step_* folder, newest step first."""
    if not directory.is_dir():
        return []
    return sorted(
        ((int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _TAG.match(p.name))), reverse=True
    )


def newest_intact(directory: Path) -> Path | None:
    """The tag folder ``latest`` names if it is intact, else the newest intact one (a warning says what
    was skipped and why); None if ``directory`` has no checkpoint at all. A folder with checkpoints
    of which none is intact raises :class:`CheckpointError` listing each one's fault."""
    marker, hint, skipped = directory / LATEST, None, []
    if marker.is_file():
        try:
            hint = directory / marker.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            skipped.append(f"{marker} is unreadable ({e})")
    elif checkpoint_tags(directory):
        skipped.append(f"{marker} is missing")
    candidates = ([hint] if hint is not None else []) + [p for _, p in checkpoint_tags(directory) if p != hint]
    run = _run_of(hint) if hint is not None and hint.is_dir() else _only_run(directory)
    for tag_dir in candidates:
        if not tag_dir.is_dir():
            skipped.append(f"{marker.name} names {tag_dir.name}, which does not exist")
            continue
        if run is not None and _run_of(tag_dir) not in (None, run):
            skipped.append(f"{tag_dir.name} was saved by another run (started over in this folder)")
            continue
        try:
            verify(tag_dir)
        except CheckpointCorrupt as e:
            skipped.append(str(e))
            continue
        if skipped:
            logger.warning("checkpoint %s chosen; skipped: %s", tag_dir, "; ".join(skipped))
        return tag_dir
    if not candidates and not skipped:
        return None
    raise CheckpointError(
        f"{directory} holds no intact checkpoint: {'; '.join(skipped)}. Restore the files, point "
        "checkpoint.resume at another checkpoint, or start over with checkpoint.resume=none (a new "
        "checkpoint.dir keeps these)."
    )


def _run_of(tag_dir: Path) -> str | None:
    try:
        return json.loads((tag_dir / META).read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        return None


def _only_run(directory: Path) -> str | None:
    """Without ``latest`` to say which run the folder continues: the run of its checkpoints, or an
    error when they come from several (the newest may be an older run's later step)."""
    newest: dict[str, Path] = {}
    for _, tag_dir in checkpoint_tags(directory):
        if (run := _run_of(tag_dir)) is not None:
            newest.setdefault(run, tag_dir)
    if len(newest) > 1:
        which = ", ".join(p.name for p in newest.values())
        raise CheckpointError(
            f"{directory}: {LATEST} is lost or names no checkpoint, and the folder holds the checkpoints of "
            f"{len(newest)} runs (newest of each: {which}), so which one to continue is unknown; set "
            "checkpoint.resume to the step_* folder to continue, or restore latest"
        )
    return next(iter(newest), None)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A tag folder (checked against its manifest), or a checkpoint folder (its newest intact
    checkpoint) -> the tag folder to load."""
    path = Path(path)
    if is_complete(path):
        try:
            verify(path)
        except CheckpointCorrupt as e:
            raise CheckpointError(f"cannot load checkpoint {path}: {e}") from None
        return path
    if (path / LATEST).exists() or checkpoint_tags(path):
        found = newest_intact(path)
        if found is not None:
            return found
    raise CheckpointError(
        f"{path} is not a checkpoint: it has neither {META} (a tag folder such as step_00000100/) nor "
        f"a '{LATEST}' file (a checkpoint folder); pass one of those"
    )
