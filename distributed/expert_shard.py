"""Which experts of a routed layer this rank holds: one frozen :class:`ExpertShard`, set on the layer as
``layer.expert_shard`` by ``parallelize`` and read by everything that needs it (the dispatcher, the
DeepSpeed adapter, checkpoints, the all-to-all figures, the training loop). A layer without one holds
all its experts; :func:`is_expert_parallel` is the one test for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ExpertShard:
    """EP rank j of P holds the global experts ``[j·E_loc, (j+1)·E_loc)``, E_loc = E / P (``groups.py``)."""

    experts: range  # global ids of the experts held here, consecutive
    ep_size: int  # P: ranks of the EP group, which together hold every expert once
    group_name: str  # DeepSpeed's name of the EP/EDP groups (what the expert parameters are tagged with)

    def __post_init__(self) -> None:
        n_local = len(self.experts)
        if self.experts.step != 1 or n_local == 0 or self.experts.start % n_local or self.ep_rank >= self.ep_size:
            raise ValueError(
                f"an expert shard is a non-empty block [j·E_loc, (j+1)·E_loc) of the experts with j < "
                f"ep_size = {self.ep_size}, got {self.experts}"
            )

    @property
    def n_local(self) -> int:
        return len(self.experts)

    @property
    def n_experts(self) -> int:
        """Experts of the layer over all ranks."""
        return self.n_local * self.ep_size

    @property
    def ep_rank(self) -> int:
        return self.experts.start // self.n_local


def expert_shard(layer: nn.Module) -> ExpertShard | None:
    """The layer's shard; None when it holds all its experts (or is not a routed layer)."""
    shard = getattr(layer, "expert_shard", None)
    return shard if isinstance(shard, ExpertShard) else None


def is_expert_parallel(layer: nn.Module) -> bool:
    """True when ``layer``'s experts are spread over the ranks of an EP group (its tokens cross ranks)."""
    return expert_shard(layer) is not None


def local_experts(layer: nn.Module) -> range:
    """Global ids of the experts a routed layer holds here: its shard, or all of them."""
    shard = expert_shard(layer)
    return shard.experts if shard is not None else range(layer.n_experts)
