"""The expert-parallel dispatcher: send each (token, slot) row to the rank holding its expert, run the
local experts there, send the results back and sum them per token (dropless: no capacity, no padding,
no dropped tokens).

Shapes: N tokens here, K slots, R = N·K rows sent, P = EP group size, L = N_E / P local experts,
R_in = rows received, d = d_model. EP rank j holds global experts [j·L, (j+1)·L).

    dispatch:  sort rows by global expert           -> grouped by destination rank, then local expert
               all-to-all of the [P, L] row counts  -> rows this rank gets from each source per expert
               all-to-all of the rows [R, d] and of their gates [R]
                                                    -> [R_in, d], [R_in] in (source, expert) order
    experts:   run_experts(x_in, local selection, gates) -> gate · expert(row), [R_in, d], same order
               (the local selection reads the rows expert by expert through a permutation, in blocks:
               the received rows are never copied into expert order, nor the results back)
    combine:   all-to-all back (splits swapped) -> [R, d] in the sorted order; y[token] += row

What costs on a CPU (measured, 2 ranks, 16 × 128, k = 4, d 512, 4096 tokens per rank): every fresh
[R, d] tensor is ~32 MB of page faults (~8 ms), and gloo moves ~1 GB/s over loopback TCP. So the gates
travel with the rows (an [R] all-to-all, and they scale the expert's narrow hidden side instead of an
[R, d] product on the source), and the expert side reads and writes the received rows in place.

Backward mirrors it through the differentiable all-to-all (splits swapped).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from sigma_moe.kernels import ExpertSelection, prepare_selection
from sigma_moe.layers.dispatch import RunExperts

from .all_to_all import all_to_all, exchange_counts
from .groups import check_experts_divisible


@dataclass(frozen=True)
class DispatchPlan:
    """What ``combine`` needs from ``dispatch`` (one forward of one layer)."""

    source: ExpertSelection  # this rank's rows sorted by global expert (token of each sent row)
    send_splits: tuple[int, ...]  # [P] rows sent to each EP rank
    recv_splits: tuple[int, ...]  # [P] rows received from each EP rank
    # Received rows grouped by local expert: [L] counts; token_ids [R_in] = received row (source-major)
    # of each expert-major row, so the experts read and write the received tensors in place.
    local: ExpertSelection


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
        x_in, gates_in, plan = self.dispatch(x, expert_idx, gates)
        y_in = run_experts(x_in, plan.local, plan.local.sort_rows(gates_in))
        return self.combine(y_in, plan)

    def dispatch(
        self, x: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchPlan]:
        """Rows and gates for the local experts, ``[R_in, d]`` and ``[R_in]`` in (source, expert) order,
        and the plan to return the results."""
        if x.dim() != 2 or expert_idx.dim() != 2 or expert_idx.shape[0] != x.shape[0]:
            raise ValueError(
                f"x must be [N, d] and expert_idx [N, K] with the same N, got {tuple(x.shape)} and "
                f"{tuple(expert_idx.shape)}"
            )
        if gates.shape != expert_idx.shape:
            raise ValueError(f"gates must be [N, K] like expert_idx {tuple(expert_idx.shape)}, got {tuple(gates.shape)}")
        p, n_local = self.ep_size, self.n_local
        source = prepare_selection(expert_idx, self.n_experts)
        send_counts = source.counts.view(p, n_local)
        recv_counts = exchange_counts(send_counts, group=self.group)  # [P sources, L]
        # NOTE: host-device sync: all_to_all_single takes its split sizes as Python ints.
        send_splits = tuple(send_counts.sum(1).tolist())
        recv_splits = tuple(recv_counts.sum(1).tolist())

        rows = x.index_select(0, source.token_ids)  # [R, d], sorted by global expert
        x_recv = all_to_all(rows, output_splits=recv_splits, input_splits=send_splits, group=self.group)
        gates_recv = all_to_all(
            source.sort_rows(gates), output_splits=recv_splits, input_splits=send_splits, group=self.group
        )

        # Received rows come as P source blocks, each split into L expert blocks; the stable sort by
        # local expert inside prepare_selection makes them expert-major, keeping the source order
        # inside each expert. Its token_ids (= order, K = 1) index the received rows.
        local_expert = torch.arange(n_local, device=x.device).repeat(p)  # expert of each (source, expert) block
        row_expert = torch.repeat_interleave(local_expert, recv_counts.reshape(-1))
        local = prepare_selection(row_expert.unsqueeze(1), n_local)
        plan = DispatchPlan(source=source, send_splits=send_splits, recv_splits=recv_splits, local=local)
        return x_recv, gates_recv, plan

    def combine(self, y_in: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Gate-weighted expert outputs ``[R_in, d]`` in the order ``dispatch`` returned the rows ->
        their sum per token ``[N, d]`` on the rank that sent them."""
        if y_in.shape[0] != plan.local.n_rows:
            raise ValueError(f"expected {plan.local.n_rows} expert output rows, got {y_in.shape[0]}")
        y_rows = all_to_all(y_in, output_splits=plan.send_splits, input_splits=plan.recv_splits, group=self.group)
        source = plan.source
        return y_rows.new_zeros(source.n_tokens, y_rows.shape[-1]).index_add(0, source.token_ids, y_rows)

    def __repr__(self) -> str:
        return (
            f"AllToAllDispatcher(n_experts={self.n_experts}, ep_size={self.ep_size}, ep_rank={self.ep_rank}, "
            f"experts=[{self.ep_rank * self.n_local}, {(self.ep_rank + 1) * self.n_local}))"
        )
