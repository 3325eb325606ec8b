"""Loading a checkpoint never runs code from it, nor lets it allocate more than it holds: every file
loads through torch's weights-only unpickler within bounds (:mod:`sigma_moe.distributed.safe_load`),
DeepSpeed's own files included (:func:`load_deepspeed_files_safely` points its checkpoint engine
there). Before any of it, every ``.pt`` file of the tag folder is read without running it, for the
globals its pickle names and what it would allocate (:func:`refuse_unsafe_pickles`), so a refused
checkpoint is refused before anything of it is loaded.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from sigma_moe.distributed.deepspeed_compat import DEEPSPEED_STATE_CLASSES, load_files_with
from sigma_moe.distributed.safe_load import CheckpointError, check_bounds, numpy_array_globals, safe_load


def _name(g: Any) -> str:
    return f"{g.__module__}.{g.__qualname__}"


def refuse_unsafe_pickles(tag_dir: Path) -> None:
    """Fail before loading if a ``.pt`` file of ``tag_dir`` would unpickle anything but tensors, plain
    data, numpy arrays and DeepSpeed's state classes, or allocate more than the file holds."""
    allowed = {_name(g) for g in [*numpy_array_globals(), *DEEPSPEED_STATE_CLASSES]}
    for path in sorted(Path(tag_dir).glob("*.pt")):
        check_bounds(path)
        try:
            unsafe = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - allowed)
        except (RuntimeError, pickle.UnpicklingError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0][:200]}") from None
        if unsafe:
            raise CheckpointError(
                f"refusing to load {path}: its pickle would build {unsafe[:5]}, which may run "
                f"code; load only checkpoints you trust, as saved by sigma-moe"
            )


def load_deepspeed_files_safely(engine: Any) -> None:
    """Every file ``engine.load_checkpoint`` opens goes through :func:`safe_load` (DeepSpeed's own
    loader would unpickle anything)."""
    load_files_with(
        engine, lambda path, map_location: safe_load(path, map_location or "cpu", safe_globals=DEEPSPEED_STATE_CLASSES)
    )


def load_rank_state(path: Path) -> dict:
    """A rank's saved state (step, RNG states, sampler, memory, divergence history): tensors, plain
    data and numpy arrays only."""
    return safe_load(path)
