"""Loading a checkpoint never runs code from it: DeepSpeed's own loader unpickles everything
(``weights_only=False``), so every ``.pt`` file of a tag folder is first read, without running it, for the
globals its pickle names (:func:`refuse_unsafe_pickles`); each rank's own state is loaded with torch's
weights-only unpickler (:func:`load_rank_state`).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from sigma_moe.distributed.checkpoint import CheckpointError

# Plain state classes DeepSpeed pickles into its optimizer files (ZeRO, bf16/fp16): rebuilding them sets
# fields, it calls nothing else. Named one by one: allowing a whole module would allow its functions.
_DEEPSPEED_STATE_CLASSES = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
}


def refuse_unsafe_pickles(tag_dir: Path) -> None:
    """Fail before loading if a ``.pt`` file of ``tag_dir`` would unpickle anything but tensors, plain
    data and numpy arrays. DeepSpeed's own loader unpickles everything (``weights_only=False``), so
    each file's pickle is read first, without running it, for the globals it names."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _numpy_array_globals()} | _DEEPSPEED_STATE_CLASSES
    for path in sorted(Path(tag_dir).glob("*.pt")):
        try:
            unsafe = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - allowed)
        except (RuntimeError, pickle.UnpicklingError, OSError) as e:
            raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0][:200]}") from None
        if unsafe:
            raise CheckpointError(
                f"refusing to load {path}: its pickle would build {unsafe[:5]}, which may run "
                f"code; load only checkpoints you trust, as saved by sigma-moe"
            )


def _numpy_array_globals() -> list:
    """What unpickling a numpy array (the numpy RNG state) needs beyond tensors and plain data."""
    reconstruct = np.zeros(1).__reduce__()[0]
    return [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_rank_state(path: Path) -> dict:
    """A rank's saved state (step, RNG states, sampler, memory) with torch's weights-only unpickler: a
    file that would run code or build other objects is refused, not loaded."""
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors, numbers, "
            f"strings and numpy arrays ({str(e).splitlines()[-1][:200]})"
        ) from None
