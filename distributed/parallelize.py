"""``parallelize(model, cfg)``: turn a single-device model into this rank's part of an expert-parallel
model, from outside (the layers' code does not change). Call it on every rank, after
``deepspeed.init_distributed()`` and before building the optimizer / ``deepspeed.initialize``.

For every routed layer (``sigma_moe.layers.routed.RoutedExperts``), with W ranks and P =
``cfg.expert_parallel_size``:
- P > 1: its expert parameters (``expert_param_names``: ``w1 [E, d, G]``, ``w2 [E, G, d]``) are
  replaced by this rank's slice of global experts ``[j·E/P, (j+1)·E/P)`` (j = EP rank), cut from
  the full initialisation, so a W-rank model equals the one-process model built with the same seed;
  ``layer.expert_shard`` (:class:`ExpertShard`) records which experts it holds; its dispatcher
  becomes the all-to-all one over the EP group; it becomes a DeepSpeed MoE layer whose expert
  gradients the engine sums over the expert-data-parallel group and divides by W (see
  ``deepspeed_moe.py`` for why and how).
- W > 1: its ``token_sum`` becomes a differentiable all-reduce over all ranks, so the regulariser's
  batch mean is over the global batch.
Non-expert parameters are left to the engine's ordinary data-parallel average.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from sigma_moe.layers.routed import RoutedExperts

from .all_to_all import GlobalTokenSum, Transport
from .deepspeed_compat import check_deepspeed_version
from .deepspeed_moe import adapt_for_deepspeed
from .dispatcher import AllToAllDispatcher
from .expert_shard import ExpertShard
from .groups import ExpertParallelGroups, ExpertParallelLayout, check_experts_divisible, expert_parallel_groups
from .mpi_all_to_all import MPIAllToAll, choose_transport


class ParallelConfig(Protocol):
    expert_parallel_size: int  # P: ranks that share one copy of every layer's experts
    transport: str  # what moves the expert all-to-all's rows: "auto" | "torch" (torch.distributed) | "mpi"


def parallelize(model: nn.Module, cfg: ParallelConfig, *, launched_by_mpirun: bool = False) -> nn.Module:
    """Apply expert and data parallelism to ``model`` in place (and return it). ``launched_by_mpirun``:
    the launcher's word (``sigma_moe.launch.world_env``) for ``transport: auto``."""
    check_deepspeed_version()  # what deepspeed_compat relies on, before the model is changed
    ep_size = cfg.expert_parallel_size
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, RoutedExperts)]
    for name, layer in layers:  # before the world size: the model's own mistake is named first
        check_experts_divisible(layer.n_experts, ep_size, where=name)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    ExpertParallelLayout(world_size, ep_size)  # P <= W and P | W, with or without a process group
    if world_size == 1:
        return model

    groups = expert_parallel_groups(ep_size)
    transport = None
    if ep_size > 1:
        chosen = choose_transport(cfg.transport, backend=dist.get_backend(), launched_by_mpirun=launched_by_mpirun)
        transport = MPIAllToAll(groups.ep_group) if chosen == "mpi" else None
    for name, layer in layers:
        layer.token_sum = GlobalTokenSum(groups.dp_group)
        if ep_size > 1:
            _shard_experts(layer, groups.layout.shard(layer.n_experts, groups.ep_rank, where=name), groups, transport)
    return model


def _shard_experts(
    layer: RoutedExperts, shard: ExpertShard, groups: ExpertParallelGroups, transport: Transport | None
) -> None:
    for name in layer.expert_param_names:
        full = getattr(layer, name)
        if full.shape[0] != shard.n_experts:
            raise ValueError(
                f"{type(layer).__name__}.{name} has {full.shape[0]} experts, expected all {shard.n_experts}: "
                "parallelize a freshly built model, once"
            )
        with torch.no_grad():
            part = full[shard.experts.start : shard.experts.stop].clone()
        setattr(layer, name, nn.Parameter(part, requires_grad=full.requires_grad))
    layer.expert_shard = shard
    layer.dispatcher = AllToAllDispatcher(shard, group=groups.ep_group, transport=transport)
    adapt_for_deepspeed(layer)
