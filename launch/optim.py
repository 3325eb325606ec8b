"""The optimizer (AdamW whose step the divergence guard can drop), its parameter groups and the
learning-rate schedule (and making a resumed run follow the config's schedule rather than the
checkpoint's)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sigma_moe.distributed import moe_param_groups
from sigma_moe.distributed.deepspeed_compat import report_skipped_step, set_last_lr
from sigma_moe.launch.config import RunConfig


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next step can be dropped (``skip_next = True``, set by the divergence guard): the
    engine then keeps the schedule where it is and counts the step as skipped
    (:func:`~sigma_moe.distributed.deepspeed_compat.report_skipped_step`). Otherwise exactly AdamW."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.skip_next = False
        report_skipped_step(self, False)

    def step(self, closure=None):
        skipped, self.skip_next = self.skip_next, False
        report_skipped_step(self, skipped)
        return None if skipped else super().step(closure)


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (and expert weight stacks), not biases, norms, or 1-D vectors. Expert shards of
    an expert-parallel model get groups of their own, as DeepSpeed's MoE reduction needs."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return moe_param_groups([g for g in groups if g["params"]])


class WarmupCosine:
    """lr multiplier at optimizer step s: linear warm-up to 1, then cosine to ``min_lr / lr`` at
    ``total`` steps, constant afterwards. A callable object (not a lambda) so LambdaLR can save it."""

    def __init__(self, *, warmup_steps: int, total_steps: int, min_ratio: float):
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def config_schedule(cfg: RunConfig) -> WarmupCosine:
    s = cfg.schedule
    total = s.decay_steps if s.decay_steps is not None else cfg.training.steps
    return WarmupCosine(warmup_steps=s.warmup_steps, total_steps=total, min_ratio=s.min_lr / cfg.optimizer.lr)


def follow_config_schedule(engine, cfg: RunConfig) -> str | None:
    """After a resume: make the learning rate follow ``cfg``'s schedule if the checkpoint's differs.

    Loading a checkpoint restores the saved schedule (LambdaLR saves its callable's fields and the
    base lr), which is what an exact resume needs. A run resumed with another ``training.steps``,
    ``schedule.*`` or ``optimizer.lr`` asks for another schedule, though; without this it would, say,
    stay at ``min_lr`` for all the steps added beyond the old end. Returns what changed, or None."""
    scheduler, want, lr = engine.lr_scheduler, config_schedule(cfg), cfg.optimizer.lr
    had = scheduler.lr_lambdas[0]
    if vars(had) == vars(want) and all(base == lr for base in scheduler.base_lrs):
        return None
    old = f"lr {scheduler.base_lrs[0]:g}, {_describe(had)}"
    scheduler.lr_lambdas = [want] * len(scheduler.lr_lambdas)
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group in scheduler.optimizer.param_groups:  # the lr of the next optimizer step
        group["initial_lr"], group["lr"] = lr, lr * want(scheduler.last_epoch)
    set_last_lr(scheduler)
    return f"the learning rate follows the config (lr {lr:g}, {_describe(want)}), not the checkpoint's ({old})"


def _describe(schedule: WarmupCosine) -> str:
    return f"warm-up {schedule.warmup_steps}, cosine to {schedule.min_ratio:g}× over {schedule.total_steps} steps"
