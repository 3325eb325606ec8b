"""The expert-parallel dispatcher: send each (token, slot) row to the rank holding its expert, run the
local experts there, send the results back and combine them with the gates (dropless: no capacity,
no padding, no dropped tokens).

Shapes: N tokens here, K slots, R = N·K rows sent, P = EP group size, L = N_E / P local experts,
R_in = rows received, d = d_model. EP rank j holds global experts [j·L, (j+1)·L).

    dispatch:  sort rows by global expert           -> grouped by destination rank, then local expert
               all-to-all of the [P, L] row counts  -> rows this rank gets from each source per expert
               all-to-all of the rows [R, d]        -> [R_in, d] in (source, expert) order
               reorder to (expert, source)          -> one contiguous segment per local expert
    experts:   run_experts(x_in, grouped_selection(counts per local expert), None) -> [R_in, d]
    combine:   undo the reorder, all-to-all back (splits swapped) -> [R, d] in the sorted order,
               y[token] += gate · row on the source rank

Backward mirrors it through the differentiable all-to-all (splits swapped).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from sigma_moe.kernels import ExpertSelection, grouped_selection, prepare_selection
from sigma_moe.layers.dispatch import RunExperts

from .all_to_all import all_to_all, exchange_counts
from .groups import check_experts_divisible


@dataclass(frozen=True)
class DispatchPlan:
    """What ``combine`` needs from ``dispatch`` (one forward of one layer)."""

    source: ExpertSelection  # this rank's rows sorted by global expert (token of each sent row)
    send_splits: tuple[int, ...]  # [P] rows sent to each EP rank
    recv_splits: tuple[int, ...]  # [P] rows received from each EP rank
    local: ExpertSelection  # received rows grouped by local expert: [L] counts
    local_order: torch.Tensor  # [R_in] long: received row (source-major) of each expert-major row
    restore_order: torch.Tensor  # [R_in] long: inverse permutation of local_order


class AllToAllDispatcher:
    """``dispatcher(x [N, d], expert_idx [N, K] global ids, gates [N, K], run_experts) -> y [N, d]``.

    ``run_experts`` applies this rank's L experts (the layer's shard of ``w1``/``w2``).
    """

    def __init__(self, *, n_experts: int, group: dist.ProcessGroup) -> None:
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        check_experts_divisible(n_experts, self.ep_size)
        self.n_experts = n_experts
        self.n_local = n_experts // self.ep_size

    def __call__(
        self, x: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor, run_experts: RunExperts
    ) -> torch.Tensor:
        x_in, plan = self.dispatch(x, expert_idx)
        y_in = run_experts(x_in, plan.local, None)
        return self.combine(y_in, gates, plan)

    def dispatch(self, x: torch.Tensor, expert_idx: torch.Tensor) -> tuple[torch.Tensor, DispatchPlan]:
        """Rows for the local experts ``[R_in, d]`` (grouped by local expert) and the plan to return them."""
        if x.dim() != 2 or expert_idx.dim() != 2 or expert_idx.shape[0] != x.shape[0]:
            raise ValueError(
                f"x must be [N, d] and expert_idx [N, K] with the same N, got {tuple(x.shape)} and "
                f"{tuple(expert_idx.shape)}"
            )
        p, n_local = self.ep_size, self.n_local
        source = prepare_selection(expert_idx, self.n_experts)
        send_counts = source.counts.view(p, n_local)
        recv_counts = exchange_counts(send_counts, group=self.group)  # [P sources, L]
        # NOTE: host-device sync: all_to_all_single takes its split sizes as Python ints.
        send_splits = tuple(send_counts.sum(1).tolist())
        recv_splits = tuple(recv_counts.sum(1).tolist())

        rows = x.index_select(0, source.token_ids)  # [R, d], sorted by global expert
        x_recv = all_to_all(rows, output_splits=recv_splits, input_splits=send_splits, group=self.group)

        # Received rows come as P source blocks, each split into L expert blocks; a stable sort by
        # local expert makes them expert-major and keeps the source order inside each expert.
        local_expert = torch.arange(n_local, device=x.device).repeat(p)  # expert of each (source, expert) block
        row_expert = torch.repeat_interleave(local_expert, recv_counts.reshape(-1))
        local_order = torch.sort(row_expert, stable=True).indices
        restore_order = torch.empty_like(local_order)
        restore_order[local_order] = torch.arange(local_order.numel(), device=x.device)

        plan = DispatchPlan(
            source=source,
            send_splits=send_splits,
            recv_splits=recv_splits,
            local=grouped_selection(recv_counts.sum(0)),
            local_order=local_order,
            restore_order=restore_order,
        )
        return x_recv.index_select(0, local_order), plan

    def combine(self, y_in: torch.Tensor, gates: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Expert outputs ``[R_in, d]`` (as returned by ``dispatch``) -> gate-weighted sum per token ``[N, d]``."""
        if y_in.shape[0] != plan.local.n_rows:
            raise ValueError(f"expected {plan.local.n_rows} expert output rows, got {y_in.shape[0]}")
        y_recv = y_in.index_select(0, plan.restore_order)  # back to (source, expert) order
        y_rows = all_to_all(y_recv, output_splits=plan.send_splits, input_splits=plan.recv_splits, group=self.group)
        source = plan.source
        weighted = y_rows * source.sort_rows(gates).unsqueeze(-1)
        return weighted.new_zeros(source.n_tokens, y_rows.shape[-1]).index_add(0, source.token_ids, weighted)

    def __repr__(self) -> str:
        return (
            f"AllToAllDispatcher(n_experts={self.n_experts}, ep_size={self.ep_size}, ep_rank={self.ep_rank}, "
            f"experts=[{self.ep_rank * self.n_local}, {(self.ep_rank + 1) * self.n_local}))"
        )
