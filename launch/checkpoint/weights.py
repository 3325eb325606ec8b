"""Model weights alone, for evaluation, generation and export: from a checkpoint (any expert-parallel
size) or from an export folder (``sigma-moe export``: one safetensors file), into a plain model in one
process or into an engine's module at any expert-parallel size. No optimizer, no DeepSpeed engine.

Both sources are checked before anything loads: a checkpoint's pickles (``safe_unpickle``) and its
model config against the run's; an export's model config (its ``config.json``) likewise. An export
holds each expert under its global id with the same tensor names as a checkpoint's expert files
(``sigma_moe.layers.consolidated``), so the checkpoint loader reads it at any expert-parallel size.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from sigma_moe.distributed.checkpoint import CheckpointError, load_module, load_weights
from sigma_moe.launch.checkpoint.manager import check_compatible, checked_meta, resolve_checkpoint
from sigma_moe.layers.consolidated import is_export, load_export_state, read_export_config


def resolve_weights(path: str | os.PathLike) -> Path:
    """An export folder as it is; a checkpoint folder or tag folder -> the tag folder to load (its
    newest intact checkpoint). Fails with a one-line :class:`CheckpointError` before any work."""
    if is_export(path):
        return Path(path)
    try:
        return resolve_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}, or an export folder (sigma-moe export: model.safetensors, config.json)") from None


def export_config(folder: Path) -> dict:
    """An export's config.json (:class:`CheckpointError` when it is not one this version reads)."""
    try:
        return read_export_config(folder)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"cannot read export {folder}: {e}") from None


def load_model_weights(
    module: nn.Module, source: str | os.PathLike, *, model_config: dict, expert_parallel_size: int = 1
) -> None:
    """The weights of ``source`` (from :func:`resolve_weights`) into ``module``: every expert by global
    id, so any expert-parallel size loads any source; everything else strictly."""
    source = Path(source)
    if not is_export(source):
        checked_meta(source, model_config, module, expert_parallel_size)
        load_weights(module, source)  # DeepSpeed's own loader cannot cross expert-parallel layouts
        return
    check_compatible(
        export_config(source), model_config, module, where=source, expert_parallel_size=expert_parallel_size
    )
    load_module(load_export_state(source), module, source)
