"""How DeepSpeed's engine learns which parameters are expert shards, so that *it* reduces their gradients.

Target (docs/design.md): the gradient of the global-batch mean loss. A non-expert parameter's gradient is
averaged over all W ranks; an expert shard's gradient already sums the contributions of every token
its EP group sent it, so it is summed over the expert-data-parallel (EDP) group and divided by W.

What DeepSpeed 0.19.8 does (runtime/engine.py, runtime/zero/stage_1_and_2.py, moe/utils.py):
- ``_configure_distributed_model`` sets ``has_moe_layers`` only when some module is an instance of
  ``deepspeed.moe.layer.MoE`` and then calls ``set_deepspeed_parallelism()`` on it; it broadcasts a
  parameter with ``allreduce = False`` from EDP rank 0 of ``groups._get_expert_data_parallel_group(
  param.group_name)`` instead of from rank 0.
- Without ZeRO, ``_reduce_expert_gradients`` all-reduces (sums) those gradients over that EDP group and
  divides by the data-parallel world size W; ZeRO 1/2 divide the bucket by W and reduce expert
  parameters over ``expert_dp_process_group[param.group_name]``, their optimizer partitions over the
  EDP group (the param groups must be split, with ``moe: True``). Both give sum over EDP ÷ W: exactly
  the target. With ``has_moe_layers`` False a tagged parameter is a KeyError in the first step.
- ZeRO 3 refuses native MoE layers (DeepSpeed's own message), so it refuses these.

Choice: make each expert-parallel routed layer an instance of ``MoE`` (a thin adapter), rather than
reducing expert gradients ourselves. Reducing them ourselves would mean keeping the shards out of the
engine's optimizer (ZeRO would otherwise partition and average them over all W ranks, mixing
different experts): a second optimizer outside DeepSpeed, without its ZeRO partitioning, mixed
precision, gradient accumulation, clipping or optimizer checkpoints. The adapter keeps one engine.

The adapter is a class swap, as ``torch.distributed.fsdp.fully_shard`` does: the layer's class
becomes ``ExpertParallel<Cls>(Cls, DeepSpeedMoEAdapter)``, so it stays a ``Cls`` (its forward, its
parameter names, ``isinstance`` checks of the model and monitor) and is also an ``MoE``. ``MoE.__init__``
is never run: the engine reads only ``num_experts``, ``num_local_experts``, ``ep_size``,
``expert_group_name`` and ``set_deepspeed_parallelism``. The swap and the parameter tags are
DeepSpeed internals, so they live in ``deepspeed_compat.py``; the layer's shard itself is its
``expert_shard`` (``expert_shard.py``). DeepSpeed's own MoE checkpoint path treats
state-dict keys of an ``MoE`` containing "expert" as its per-expert files; the routed layers' keys
(``w1``, ``w2``, ``selector``...) contain none, so its save leaves them in the ordinary model file and
expert-sharded checkpoints are ours to write.
"""

from __future__ import annotations

from typing import Any

import torch
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from torch import nn

from .deepspeed_compat import DeepSpeedMoEAdapter, become_moe_layer, is_moe_layer
from .expert_shard import expert_shard

__all__ = ["DeepSpeedMoEAdapter", "adapt_for_deepspeed", "is_expert_param", "moe_param_groups"]


def adapt_for_deepspeed(layer: nn.Module) -> None:
    """Turn ``layer`` (already holding its shard, ``layer.expert_shard``) into a DeepSpeed MoE layer, in
    place, and tag its expert parameters (``layer.expert_param_names``) for the EDP-group gradient
    reduction."""
    if is_moe_layer(layer):
        raise ValueError(f"{type(layer).__name__} is already a DeepSpeed MoE layer; parallelize a model once")
    shard = expert_shard(layer)
    if shard is None:
        raise ValueError(f"{type(layer).__name__} has no expert_shard; parallelize(model, cfg) gives it one")
    become_moe_layer(
        layer,
        n_experts=shard.n_experts,
        n_local=shard.n_local,
        group_name=shard.group_name,
        expert_params=[getattr(layer, name) for name in layer.expert_param_names],
    )


def moe_param_groups(param_groups: list[dict[str, Any]] | list[nn.Parameter]) -> list[dict[str, Any]]:
    """Optimizer param groups for ``deepspeed.initialize`` with a client optimizer: every group's expert
    parameters moved into groups of their own (``moe: True``, same hyper-parameters), as the engine
    and ZeRO need. Groups without a ``name`` get one. Without expert parameters: groups unchanged."""
    if param_groups and isinstance(param_groups[0], torch.Tensor):
        param_groups = [{"params": list(param_groups)}]
    groups = [{"name": f"group{i}", **g, "params": list(g["params"])} for i, g in enumerate(param_groups)]
    names = [g["name"] for g in groups]
    if len(set(names)) != len(names):
        raise ValueError(f"param group names must be distinct (MoE groups are keyed by them), got {names}")
    return split_params_into_different_moe_groups_for_optimizer(groups)


def is_expert_param(param: torch.Tensor) -> bool:
    """True for a parameter DeepSpeed reduces over an expert-data-parallel group."""
    return is_moe_param(param)
