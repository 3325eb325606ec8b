"""Divergence guard: a step whose loss or gradients stop being finite is caught before its update.

Without it a diverged run trains on in NaN, exits 0, and its NaN checkpoints push the last good ones
out (``keep_last``). :class:`DivergenceGuard` checks every step at the accumulation boundary, after the
backward and before the optimizer step (one small all-reduce, so every rank decides alike), and
either stops (``training.on_divergence: stop``, the default: an error naming the step, printed by the
CLI as one line with exit 2; the weights are those before the step) or drops the step's update
(``skip``: :class:`SkippableAdamW`; the batch is consumed, the schedule does not advance), stopping
after ``training.max_skipped_steps`` skipped steps in a row. Before every save the weights are checked
too, so a non-finite model is never checkpointed.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sigma_moe.distributed.collectives import world_all_reduce_

logger = logging.getLogger(__name__)
FIX = "Lower optimizer.lr or set training.grad_clip, then resume"


class TrainingDiverged(RuntimeError):
    """The loss, the gradients or the weights stopped being finite numbers."""


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next step can be dropped (``skip_next = True``). DeepSpeed's engine reads the
    optimizer's ``overflow`` after ``step()`` (as for an fp16 overflow): True keeps the schedule where it
    is and counts the step in ``engine.skipped_steps``. Otherwise exactly AdamW."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.skip_next = False
        self.overflow = False

    def step(self, closure=None):
        self.overflow, self.skip_next = self.skip_next, False
        return None if self.overflow else super().step(closure)


class DivergenceGuard:
    """One run's policy for non-finite steps (see the module docstring)."""

    def __init__(self, *, policy: str, max_skipped_steps: int, checkpoint_dir: Path):
        self.policy = policy
        self.max_skipped_steps = max_skipped_steps
        self.checkpoint_dir = Path(checkpoint_dir)
        self.skipped_in_a_row = 0
        self.skipped = 0  # over the run

    def before_update(self, step: int, engine: Any, *, losses_finite: bool) -> bool:
        """At the accumulation boundary, after backward, before ``engine.step()``. Collective. Returns
        True when this step's update is dropped (skip policy); raises :class:`TrainingDiverged` on stop."""
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]  # none under ZeRO/bf16
        grads_finite = bool(torch.stack([g.isfinite().all() for g in grads]).all()) if grads else True
        bad = torch.tensor([float(not losses_finite), float(not grads_finite)], dtype=torch.float64)
        world_all_reduce_(bad)
        if not float(bad.sum()):
            self.skipped_in_a_row = 0
            return False
        loss_bad, grads_bad = (bool(v) for v in bad.tolist())
        what = (
            "the loss and the gradients are"
            if loss_bad and grads_bad
            else "the loss is"
            if loss_bad
            else "the gradients are"
        ) + " not finite"
        if self.policy == "skip" and self.skipped_in_a_row < self.max_skipped_steps:
            self.skipped_in_a_row += 1
            self.skipped += 1
            engine.optimizer.skip_next = True
            logger.warning(
                "step %d skipped: %s on some rank (%d in a row, %d in this run)",
                step,
                what,
                self.skipped_in_a_row,
                self.skipped,
            )
            return True
        row = (
            f" after {self.skipped_in_a_row} skipped steps in a row (training.max_skipped_steps)"
            if self.policy == "skip"
            else ""
        )
        raise TrainingDiverged(
            f"training diverged at step {step}: {what}{row}; the step was not applied and "
            f"nothing of it saved{_newest(self.checkpoint_dir)}. {FIX}"
        )

    def after_update(self, step: int, engine_grad_norm: Any) -> None:
        """After ``engine.step()``: the gradient norm DeepSpeed's ZeRO and mixed-precision optimizers
        report (the same on every rank; those keep no full gradients in the module to check before)."""
        if engine_grad_norm is not None and not math.isfinite(float(engine_grad_norm)):
            raise TrainingDiverged(
                f"training diverged at step {step}: the gradient norm is not finite; nothing "
                f"of this step was saved{_newest(self.checkpoint_dir)}. {FIX}"
            )


def stop_if_weights_diverged(module: nn.Module, step: int, checkpoint_dir: Path) -> None:
    """Before a save: raise :class:`TrainingDiverged` on every rank unless every rank's parameters
    (expert shards differ between ranks) are finite."""
    bad = torch.zeros(1, dtype=torch.float64)
    with torch.no_grad():
        bad[0] = float(any(not bool(torch.isfinite(p).all()) for p in module.parameters()))
    if float(world_all_reduce_(bad)[0]):
        raise TrainingDiverged(
            f"training diverged by step {step}: the weights are not finite, so step {step} is "
            f"not saved{_newest(checkpoint_dir)}. {FIX}"
        )


def _newest(checkpoint_dir: Path) -> str:
    tags = sorted(Path(checkpoint_dir).glob("step_*"))
    return f"; the newest checkpoint is {tags[-1]}" if tags else ""
