"""Divergence guard: a step whose loss or gradients stop being finite, or spike while still finite,
is caught before its update.

Without it a diverged run trains on in NaN (or in finite garbage: |w| ~ 1e6, loss ~ 1e12), exits 0,
and its checkpoints push the last good ones out (``keep_last``). A spike is a loss (mean over ranks)
over ``training.spike_loss_factor`` × its median over the last ``spike_window`` healthy steps, or a
gradient norm over ``spike_grad_factor`` × its median; the history is saved with each checkpoint.
:class:`DivergenceGuard` checks every step at the accumulation boundary, after the
backward and before the optimizer step (one small all-reduce, so every rank decides alike), and
either stops (``training.on_divergence: stop``, the default: an error naming the step, printed by the
CLI as one line with exit 2; the weights are those before the step) or drops the step's update
(``skip``: it sets the optimizer's ``skip_next``, :class:`sigma_moe.launch.optim.SkippableAdamW`; the
batch is consumed, the schedule does not advance), stopping
after ``training.max_skipped_steps`` skipped steps in a row. Before every save the weights are checked
too, so a non-finite model is never checkpointed, and a final validation loss that is not finite
fails the run. What the guard misses (an update that ruins the weights is seen only at the next
step) is covered by the checkpoint folder's known good checkpoint (``launch/checkpoint/finding.py``).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from typing import Any

import torch
from torch import nn

from sigma_moe.distributed import global_grad_norm
from sigma_moe.distributed.collectives import world_all_reduce_

logger = logging.getLogger(__name__)
FIX = "Lower optimizer.lr or set training.grad_clip, then resume"
SPIKE = " (a spike against the run's recent history: training.spike_loss_factor, spike_grad_factor)"
GRAD_HISTORY = 10  # gradient norms vary more than losses early on: measure spikes once this many are known


class TrainingDiverged(RuntimeError):
    """The loss, the gradients or the weights stopped being finite numbers."""


class DivergenceGuard:
    """One run's policy for diverged steps (see the module docstring): a non-finite loss or gradient,
    or a finite spike, a loss over ``loss_factor`` × (a gradient norm over ``grad_factor`` ×) its
    median over the last ``window`` healthy steps. The history and the skip counts are part of the
    checkpoint (:meth:`state_dict`), so a resumed run measures against the same past."""

    def __init__(
        self,
        *,
        policy: str,
        max_skipped_steps: int,
        loss_factor: float = 3.0,
        grad_factor: float = 10.0,
        window: int = 50,
    ):
        self.policy = policy
        self.max_skipped_steps = max_skipped_steps
        self.loss_factor, self.grad_factor = loss_factor, grad_factor
        self.losses: deque[float] = deque(maxlen=window)  # mean over ranks, healthy steps only
        self.grad_norms: deque[float] = deque(maxlen=window)
        self.skipped_in_a_row = 0
        self.skipped = 0  # over the run, resumes included
        self.healthy_weights_step: int | None = None  # the weights after this step passed the last check
        self._grads_checked = False
        self.grad_norm = math.nan  # the last step's norm of the module's gradients (NaN: it holds none)

    def state_dict(self) -> dict:
        return {
            "skipped": self.skipped,
            "skipped_in_a_row": self.skipped_in_a_row,
            "losses": list(self.losses),
            "grad_norms": list(self.grad_norms),
        }

    def load_state_dict(self, state: dict | None) -> None:
        if not state:  # a checkpoint from before the guard kept a history
            return
        self.skipped, self.skipped_in_a_row = int(state["skipped"]), int(state["skipped_in_a_row"])
        self.losses.extend(float(v) for v in state["losses"])
        self.grad_norms.extend(float(v) for v in state["grad_norms"])

    def before_update(self, step: int, engine: Any, *, loss: float) -> bool:
        """At the accumulation boundary, after backward, before ``engine.step()``; ``loss``: this rank's
        mean training loss of the step. Collective. Returns True when this step's update is dropped
        (skip policy); raises :class:`TrainingDiverged` on stop."""
        grads = [p for p in engine.module.parameters() if p.grad is not None]  # none under ZeRO/bf16
        self._grads_checked = bool(grads)
        grad_norm = float(global_grad_norm(grads)) if grads else 0.0
        self.grad_norm = grad_norm if grads else math.nan
        finite = math.isfinite(loss)
        seen = torch.tensor(  # the last entry counts the ranks
            [float(not finite), float(not math.isfinite(grad_norm)), loss if finite else 0.0, 1.0], dtype=torch.float64
        )
        world_all_reduce_(seen)
        loss_bad, grads_bad = bool(seen[0]), bool(seen[1])
        what = []
        if loss_bad or grads_bad:
            what = [
                (
                    "the loss and the gradients are"
                    if loss_bad and grads_bad
                    else "the loss is"
                    if loss_bad
                    else "the gradients are"
                )
                + " not finite"
            ]
        else:
            mean_loss = float(seen[2]) / float(seen[3])
            what = self._spikes(mean_loss, grad_norm if grads else None)
            if what:
                what[-1] += SPIKE
            else:
                self.losses.append(mean_loss)
                if grads:
                    self.grad_norms.append(grad_norm)
        if not what:
            self.skipped_in_a_row = 0
            self.healthy_weights_step = step - 1  # this step's forward ran on them
            return False
        return self._diverged(step, "; ".join(what), engine)

    def _spikes(self, loss: float, grad_norm: float | None) -> list[str]:
        out = []
        if self.loss_factor and self.losses and loss > self.loss_factor * (ref := statistics.median(self.losses)):
            out.append(
                f"the loss {loss:.4g} is {loss / ref:.3g}× its median {ref:.4g} over the last {len(self.losses)} steps"
            )
        if (
            grad_norm is not None
            and self.grad_factor
            and len(self.grad_norms) >= GRAD_HISTORY
            and grad_norm > self.grad_factor * (ref := statistics.median(self.grad_norms))
        ):
            out.append(
                f"the gradient norm {grad_norm:.4g} is {grad_norm / ref:.3g}× its median {ref:.4g} over the last "
                f"{len(self.grad_norms)} steps"
            )
        return out

    def _diverged(self, step: int, what: str, engine: Any) -> bool:
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
            f"training diverged at step {step}: {what}{row}; the step was not applied and nothing of it saved"
        )

    def after_update(self, step: int, engine_grad_norm: Any) -> None:
        """After ``engine.step()``: the gradient norm DeepSpeed's ZeRO and mixed-precision optimizers
        report (the same on every rank; those keep no full gradients in the module to check before)."""
        if engine_grad_norm is None or self._grads_checked:
            return
        norm = float(engine_grad_norm)
        what = ["the gradient norm is not finite"] if not math.isfinite(norm) else self._spikes(0.0, norm)
        if what:
            what[-1] += SPIKE if math.isfinite(norm) else ""
            raise TrainingDiverged(
                f"training diverged at step {step}: {'; '.join(what)}; nothing of this step was saved"
            )
        self.grad_norms.append(norm)

    def check_final(self, step: int, valid_loss: float) -> None:
        """After the final validation: a validation loss that is not finite, or a run that ended in a
        row of skipped steps with a validation loss that is a spike against training's, means the model
        diverged, and the run must not end as if it had trained."""
        if math.isfinite(valid_loss) and not (self.skipped_in_a_row and self._spikes(valid_loss, None)):
            return
        what = "is not finite" if not math.isfinite(valid_loss) else f"{valid_loss:.4g} is a spike{SPIKE}"
        row = f" after {self.skipped_in_a_row} skipped steps in a row" if self.skipped_in_a_row else ""
        raise TrainingDiverged(f"training diverged by step {step}: the final validation loss {what}{row}")


def stop_if_weights_diverged(module: nn.Module, step: int) -> None:
    """Before a save: raise :class:`TrainingDiverged` on every rank unless every rank's parameters
    (expert shards differ between ranks) are finite."""
    bad = torch.zeros(1, dtype=torch.float64)
    with torch.no_grad():
        bad[0] = float(any(not bool(torch.isfinite(p).all()) for p in module.parameters()))
    if float(world_all_reduce_(bad)[0]):
        raise TrainingDiverged(
            f"training diverged by step {step}: the weights are not finite, so step {step} is not saved"
        )
