"""The global gradient norm of an expert-parallel model, and exact clipping with it.

After the reduction every rank holds the same non-expert gradients and the gradients of its own expert
shard; the shards of one EP group cover every expert once (EDP groups hold copies). So

    |g|² = |g_non-expert|²  +  Σ over the EP group of |g_shard|²       (one all-reduce per EP group)

DeepSpeed 0.19.8 without ZeRO (fp32) clips with ``runtime.utils.clip_grad_norm_``, which averages each
rank's local norm over the ranks: with expert shards that is sqrt(|g_ne|² + |g_shard|²) on average, not
the norm above, so the clip factor differs from the one-process run (a step of a 2-rank P = 2 test
model came out 7% larger). ZeRO 1/2 and the bf16 optimizer compute the norm right.
:func:`use_exact_clipping` replaces that one method on a non-ZeRO fp32 engine with expert layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .collectives import all_reduce_
from .deepspeed_compat import expert_parallel_group, replace_fp32_clipping
from .deepspeed_moe import is_expert_param
from .expert_shard import is_expert_parallel


def global_grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """L2 norm of the whole model's reduced gradient (float32 scalar). Collective when the model has
    expert shards: every rank calls it with the same parameters."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    device = params[0].grad.device
    dense_sq = torch.zeros((), device=device)
    shard_sq: dict[str, torch.Tensor] = {}
    for p in params:
        sq = p.grad.detach().float().square().sum()
        if is_expert_param(p):
            shard_sq[p.group_name] = shard_sq.get(p.group_name, torch.zeros((), device=device)) + sq
        else:
            dense_sq = dense_sq + sq
    for name in sorted(shard_sq):  # the same order on every rank
        all_reduce_(shard_sq[name], group=expert_parallel_group(name))
        dense_sq = dense_sq + shard_sq[name]
    return dense_sq.sqrt()


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients so that the global norm is at most ``max_norm`` (the coefficient of
    ``torch.nn.utils.clip_grad_norm_``); returns the norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    norm = global_grad_norm(params)
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.detach().mul_(coef.to(p.grad.device, p.grad.dtype))
    return norm


def use_exact_clipping(engine: Any) -> None:
    """On a DeepSpeed engine that clips with its non-ZeRO fp32 path and has expert-parallel layers,
    clip with the global norm instead (and report it as ``engine.get_global_grad_norm()``)."""
    fp32_path = not (engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization())
    expert_parallel = any(is_expert_parallel(m) for m in engine.module.modules())
    if not (expert_parallel and fp32_path and engine.gradient_clipping() > 0):
        return
    replace_fp32_clipping(engine, lambda: clip_grad_norm_(engine.module.parameters(), engine.gradient_clipping()))
