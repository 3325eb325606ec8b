"""Monitoring figures of the expert-parallel all-to-all, from the routing counts the layers report.

Per expert-parallel routed layer (E > 1), for the (token, slot) rows routed over a logging interval:
    a2a_remote_share    rows sent to another rank / all rows            (all-to-all traffic)
    ep_max_mean_load    rows of the busiest EP position / the mean      (1 = every rank's experts
                        get the same work; the step waits for the busiest)
The first needs each rank's own counts (one all-reduce for all layers); the second the global ones.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .collectives import world_all_reduce_
from .deepspeed_moe import DeepSpeedMoEAdapter


def exchange_figures(
    ff_layers: Sequence[nn.Module],
    local_counts: Mapping[int, torch.Tensor],
    global_counts: Mapping[int, torch.Tensor],
) -> dict[str, float]:
    """``{"layer_XX/a2a_remote_share": ..., "layer_XX/ep_max_mean_load": ...}`` for the expert-parallel
    layers among ``ff_layers`` (keys: position in that list). ``local_counts[i]``: this rank's rows per
    global expert; ``global_counts[i]``: the same summed over all ranks. Collective when any layer is
    expert-parallel (every rank calls it with the same layers)."""
    layers = [(i, ff) for i, ff in enumerate(ff_layers) if isinstance(ff, DeepSpeedMoEAdapter) and i in local_counts]
    if not layers:
        return {}
    remote = torch.zeros(len(layers), 2, dtype=torch.float64)  # [layer, (remote rows, all rows)]
    for row, (i, ff) in enumerate(layers):
        counts = local_counts[i].to(torch.float64)
        own = ff.global_experts
        remote[row, 0] = counts.sum() - counts[own.start : own.stop].sum()
        remote[row, 1] = counts.sum()
    world_all_reduce_(remote)
    out = {}
    for row, (i, ff) in enumerate(layers):
        loads = global_counts[i].to(torch.float64).view(ff.ep_size, ff.num_local_experts).sum(1)
        total = float(remote[row, 1])
        out[f"layer_{i:02d}/a2a_remote_share"] = float(remote[row, 0]) / total if total else 0.0
        out[f"layer_{i:02d}/ep_max_mean_load"] = float(loads.max() / loads.mean()) if total else 0.0
    return out
