"""Monitoring figures of the expert-parallel all-to-all, from the routing counts the layers report.

Per expert-parallel routed layer (P > 1), for the (token, slot) rows routed over a logging interval:
    a2a_remote_share    rows sent to another rank / all rows            (all-to-all traffic)
    ep_max_mean_load    rows of the busiest EP position / the mean      (1 = every rank's experts
                        get the same work; the step waits for the busiest)
The first needs each rank's own counts summed over ranks (:func:`remote_rows` gives this rank's part,
the caller sums it with the rest of its figures in one reduction); the second the global counts.
No collective here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .exchange_meter import ExchangeMeter
from .expert_shard import expert_shard, is_expert_parallel


def expert_parallel_layers(ff_layers: Sequence[nn.Module]) -> list[int]:
    """Positions in ``ff_layers`` of the layers whose experts are spread over ranks."""
    return [i for i, ff in enumerate(ff_layers) if is_expert_parallel(ff)]


def exchange_meters(ff_layers: Sequence[nn.Module]) -> list[ExchangeMeter]:
    """The all-to-all meters of the expert-parallel layers' dispatchers (empty without expert parallelism)."""
    return [ff.dispatcher.meter for ff in ff_layers if is_expert_parallel(ff)]


def remote_rows(ff: nn.Module, local_counts: torch.Tensor) -> tuple[float, float]:
    """(rows this rank sent to experts on other ranks, all its rows), from its rows per global expert,
    for an expert-parallel layer."""
    counts = local_counts.to(torch.float64)
    own = expert_shard(ff).experts
    return float(counts.sum() - counts[own.start : own.stop].sum()), float(counts.sum())


def exchange_figures(
    ff_layers: Sequence[nn.Module],
    remote: Mapping[int, tuple[float, float]],
    global_counts: Mapping[int, torch.Tensor],
) -> dict[str, float]:
    """``{"layer_XX/a2a_remote_share": ..., "layer_XX/ep_max_mean_load": ...}`` for the expert-parallel
    layers among ``ff_layers`` (keys: position in that list). ``remote[i]``: :func:`remote_rows` summed
    over all ranks; ``global_counts[i]``: the rows per global expert summed over all ranks."""
    out = {}
    for i in expert_parallel_layers(ff_layers):
        if i not in remote or i not in global_counts:
            continue
        shard = expert_shard(ff_layers[i])
        loads = global_counts[i].to(torch.float64).view(shard.ep_size, shard.n_local).sum(1)
        sent, total = remote[i]
        out[f"layer_{i:02d}/a2a_remote_share"] = sent / total if total else 0.0
        out[f"layer_{i:02d}/ep_max_mean_load"] = float(loads.max() / loads.mean()) if total else 0.0
    return out
