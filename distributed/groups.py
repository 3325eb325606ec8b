"""Process groups for expert parallelism: expert-parallel (EP) groups × expert-data-parallel (EDP) groups.

W ranks, expert-parallel size P (P divides W). EP groups are P consecutive ranks; a rank's EDP group
is the ranks at the same position in every EP group. EP rank j holds the global experts
``[j·E/P, (j+1)·E/P)`` of every routed layer. Example, W = 4, P = 2:

    EP groups  [0, 1] [2, 3]     all-to-all of tokens inside each
    EDP groups [0, 2] [1, 3]     ranks holding the same experts: expert gradients are summed here
    rank 3 = EP rank 1, holds the second half of the experts

The groups themselves are DeepSpeed's (``deepspeed.utils.groups``, named ``ep_size_{P}``): its engine
reduces the gradients of parameters tagged with that ``group_name`` over exactly these EDP groups and
broadcasts expert parameters from EDP rank 0, so both must agree with the layout here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from .expert_shard import ExpertShard


@dataclass(frozen=True)
class ExpertParallelLayout:
    """The rank arithmetic of expert parallelism (no communication; usable before any process starts)."""

    world_size: int
    expert_parallel_size: int

    def __post_init__(self) -> None:
        """The one check of the expert-parallel size against the number of processes."""
        w, e = self.world_size, self.expert_parallel_size
        if w < 1:
            raise ValueError(f"world size must be >= 1, got {w}")
        _check_size(e)
        divisors = [d for d in range(1, w + 1) if w % d == 0]
        if e > w:
            raise ValueError(
                f"distributed.expert_parallel_size = {e} needs {e} or more processes, this job has {w}: choose "
                f"one of {divisors}, or launch a multiple of {e} processes with deepspeed, torchrun or mpirun "
                "(and call deepspeed.init_distributed() before parallelize)"
            )
        if w % e:
            raise ValueError(
                f"distributed.expert_parallel_size = {e} must divide the number of processes ({w}); "
                f"choose one of {divisors} or launch a multiple of {e} processes"
            )

    @property
    def expert_data_parallel_size(self) -> int:
        return self.world_size // self.expert_parallel_size

    @property
    def group_name(self) -> str:
        """DeepSpeed's name for these groups (what expert parameters carry as ``group_name``)."""
        return f"ep_size_{self.expert_parallel_size}"

    def ep_groups(self) -> list[list[int]]:
        e = self.expert_parallel_size
        return [list(range(s, s + e)) for s in range(0, self.world_size, e)]

    def edp_groups(self) -> list[list[int]]:
        e = self.expert_parallel_size
        return [list(range(j, self.world_size, e)) for j in range(e)]

    def ep_rank(self, rank: int) -> int:
        """Position of ``rank`` in its EP group = which slice of the experts it holds."""
        self._check_rank(rank)
        return rank % self.expert_parallel_size

    def edp_rank(self, rank: int) -> int:
        self._check_rank(rank)
        return rank // self.expert_parallel_size

    def shard(self, n_experts: int, ep_rank: int, where: str = "") -> ExpertShard:
        """What EP rank ``ep_rank`` holds of a layer with ``n_experts`` experts (``where``: the layer's name)."""
        if not 0 <= ep_rank < self.expert_parallel_size:
            raise ValueError(f"EP rank must lie in [0, {self.expert_parallel_size}), got {ep_rank}")
        check_experts_divisible(n_experts, self.expert_parallel_size, where)
        n_local = n_experts // self.expert_parallel_size
        return ExpertShard(
            range(ep_rank * n_local, (ep_rank + 1) * n_local), self.expert_parallel_size, self.group_name
        )

    def expert_range(self, n_experts: int, ep_rank: int) -> range:
        """Global expert ids held by EP rank ``ep_rank``."""
        return self.shard(n_experts, ep_rank).experts

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must lie in [0, {self.world_size}), got {rank}")


def _check_size(expert_parallel_size: int) -> None:
    e = expert_parallel_size
    if isinstance(e, bool) or not isinstance(e, int) or e < 1:
        raise ValueError(f"distributed.expert_parallel_size must be >= 1, got {e!r}")


def check_experts_divisible(n_experts: int, expert_parallel_size: int, where: str = "") -> None:
    """Every EP rank must hold the same number of experts."""
    _check_size(expert_parallel_size)
    if n_experts % expert_parallel_size:
        at = f" (layer {where})" if where else ""
        raise ValueError(
            f"n_experts = {n_experts}{at} is not divisible by distributed.expert_parallel_size = "
            f"{expert_parallel_size}; choose an expert_parallel_size that divides n_experts"
        )


@dataclass(frozen=True)
class ExpertParallelGroups:
    """This rank's process groups. ``dp_group`` spans all W ranks (non-expert gradients, token sums)."""

    layout: ExpertParallelLayout
    rank: int
    ep_group: dist.ProcessGroup
    edp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup

    @property
    def ep_rank(self) -> int:
        return self.layout.ep_rank(self.rank)

    @property
    def group_name(self) -> str:
        return self.layout.group_name


def expert_parallel_groups(expert_parallel_size: int) -> ExpertParallelGroups:
    """Create (once; later calls reuse them) and return DeepSpeed's EP and EDP groups for this rank.

    Collective: every rank must call it, in the same order. Needs ``deepspeed.init_distributed()``.
    """
    from deepspeed import comm as ds_dist

    from . import deepspeed_compat as compat

    if not ds_dist.is_initialized():
        raise RuntimeError(
            "expert parallelism needs the process group: call deepspeed.init_distributed() first "
            "(it finds the world under deepspeed, torchrun or mpirun)"
        )
    layout = ExpertParallelLayout(dist.get_world_size(), expert_parallel_size)
    name = layout.group_name
    if not compat.has_expert_groups(name):
        compat.create_expert_groups(expert_parallel_size)
    rank = dist.get_rank()
    got_ep, got_edp = compat.expert_group_ranks(name)
    want_ep = layout.ep_groups()[layout.edp_rank(rank)]
    want_edp = layout.edp_groups()[layout.ep_rank(rank)]
    if got_ep != want_ep or got_edp != want_edp:
        # DeepSpeed lays groups out otherwise with "use_data_before_expert_parallel" or model parallelism.
        raise RuntimeError(
            f"DeepSpeed's groups {name!r} on rank {rank} are EP {got_ep} / EDP {got_edp}, expected EP "
            f"{want_ep} / EDP {want_edp}; turn off use_data_before_expert_parallel and tensor/pipeline parallelism"
        )
    return ExpertParallelGroups(
        layout=layout,
        rank=rank,
        ep_group=compat.expert_parallel_group(name),
        edp_group=compat.expert_data_parallel_group(name),
        dp_group=compat.data_parallel_group(),
    )
