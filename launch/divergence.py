"""Divergence guard: training stops on the step whose loss, gradient norm or weights stop being finite.

Without it a diverged run trains on in NaN, exits 0, and its NaN checkpoints push the last good ones
out (``keep_last``). Both checks are collective (one small all-reduce), so every rank stops on the
same step with the same error; the CLI prints it as one line and exits 2.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from sigma_moe.distributed.collectives import world_all_reduce_

FIX = "Lower optimizer.lr or set training.grad_clip, then resume"


class TrainingDiverged(RuntimeError):
    """The loss, the gradient norm or the weights stopped being finite numbers."""


def stop_if_diverged(step: int, *, loss: float, engine_grad_norm, checkpoint_dir: Path) -> None:
    """After every optimizer step: raise :class:`TrainingDiverged` on every rank if the loss (or the
    gradient norm, where the engine reports it every step: ZeRO, bf16) is not finite on any rank.
    Nothing of the step has been saved yet."""
    figures = {"loss": loss, "gradient norm": 0.0 if engine_grad_norm is None else float(engine_grad_norm)}
    bad = torch.tensor([float(not math.isfinite(v)) for v in figures.values()], dtype=torch.float64)
    if not float(world_all_reduce_(bad).sum()):
        return
    what = " and the ".join(name for name, flag in zip(figures, bad.tolist()) if flag)
    raise TrainingDiverged(f"training diverged at step {step}: the {what} is not finite (this rank's loss: "
                           f"{loss:g}); nothing of this step was saved{_newest(checkpoint_dir)}. {FIX}")


def stop_if_weights_diverged(module: nn.Module, step: int, checkpoint_dir: Path) -> None:
    """Before a save: raise :class:`TrainingDiverged` on every rank unless every rank's parameters
    (expert shards differ between ranks) are finite."""
    bad = torch.zeros(1, dtype=torch.float64)
    with torch.no_grad():
        bad[0] = float(any(not bool(torch.isfinite(p).all()) for p in module.parameters()))
    if float(world_all_reduce_(bad)[0]):
        raise TrainingDiverged(f"training diverged by step {step}: the weights are not finite, so step {step} is "
                               f"not saved{_newest(checkpoint_dir)}. {FIX}")


def _newest(checkpoint_dir: Path) -> str:
    tags = sorted(Path(checkpoint_dir).glob("step_*"))
    return f"; the newest checkpoint is {tags[-1]}" if tags else ""
