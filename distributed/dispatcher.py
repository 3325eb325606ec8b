"""The expert-parallel dispatcher: the slots whose expert is on this rank run in place; every other
token goes once to each other rank holding one of its experts, runs there, and comes back summed
(dropless: no capacity, no padding, no dropped tokens).

Shapes: N tokens here, K slots, P = EP group size, E_loc = E / P local experts, U = (token, other
rank) pairs with at least one slot on that rank (U ≤ N·min(K, P − 1)), U_in = token rows received,
d = d_model. EP rank j holds global experts [j·E_loc, (j+1)·E_loc).

    dispatch:  (token, other rank) pairs, grouped by rank -> U rows to send (a token once per rank)
               all-to-all of the [P] row counts
               all-to-all of the rows [U, d] with each row's K gates and K local expert ids (-1: that
               slot is not on the receiving rank) side by side -> [U_in, d], [U_in, K], [U_in, K]
    experts:   run_experts(x, slots here)                 -> [N, d]     (reads x in place)
               run_experts(x_in, received slots here)     -> [U_in, d]  (Σ over a row's slots here)
    combine:   all-to-all back (splits swapped) -> [U, d]; y[token] += row

A token goes to a rank once, not once per slot: with K = 4 of 16 experts on 2 ranks that is ~0.96
rows per token instead of 2, and the slots of a token that meet on one rank are summed there before
the return trip. Nothing is sent to this rank itself, so its own slots cost no copy. On a CPU this
is what matters (measured, 2 ranks, 4096 tokens per rank, d 512): the bytes over gloo's loopback
TCP and the [rows, d] gathers and scatters around them.

Backward mirrors it through the differentiable all-to-all (splits swapped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from sigma_moe.kernels import ExpertSelection, prepare_selection
from sigma_moe.layers.dispatch import RunExperts

from .all_to_all import Transport, all_to_all, exchange_counts
from .exchange_meter import ExchangeMeter
from .expert_shard import ExpertShard


@dataclass(frozen=True)
class DispatchPlan:
    """What the experts and ``combine`` need from ``dispatch`` (one forward of one layer)."""

    here: ExpertSelection  # this rank's own slots whose expert is here, over its N tokens
    received: ExpertSelection  # the slots of the received rows (all are here), over the U_in rows
    send_token_ids: torch.Tensor  # [U] token of each sent row, grouped by destination rank
    send_splits: tuple[int, ...]  # [P] rows sent to each EP rank (0 to itself)
    recv_splits: tuple[int, ...]  # [P] rows received from each EP rank (0 from itself)


class AllToAllDispatcher:
    """``dispatcher(x [N, d], expert_idx [N, K] global ids, gates [N, K], run_experts) -> y [N, d]``.

    ``run_experts`` applies this rank's E_loc experts (the layer's ``shard`` of ``w1``/``w2``). ``group``: the
    EP group, in which this rank is ``shard.ep_rank``. ``meter`` accumulates what this layer's
    all-to-alls cost this rank (bytes, time, rows; the monitor reads it).
    """

    def __init__(self, shard: ExpertShard, *, group: dist.ProcessGroup, transport: Transport | None = None) -> None:
        if (dist.get_world_size(group), dist.get_rank(group)) != (shard.ep_size, shard.ep_rank):
            raise ValueError(
                f"the EP group has {dist.get_world_size(group)} ranks and this is rank "
                f"{dist.get_rank(group)}, but the shard is EP rank {shard.ep_rank} of {shard.ep_size}"
            )
        self.shard, self.group, self.transport = shard, group, transport  # transport None: torch.distributed
        self.meter = ExchangeMeter()

    @property
    def n_experts(self) -> int:
        return self.shard.n_experts

    @property
    def ep_size(self) -> int:
        return self.shard.ep_size

    @property
    def ep_rank(self) -> int:
        return self.shard.ep_rank

    @property
    def n_local(self) -> int:
        return self.shard.n_local

    # Eager inside a compiled block (training.compile): the split sizes are read on the host and the
    # rows move through torch.distributed or mpi4py, none of which a graph can hold; the routing before
    # and the residual after stay compiled, the experts here run the eager CVMM.
    @torch.compiler.disable
    def __call__(
        self, x: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor, run_experts: RunExperts
    ) -> torch.Tensor:
        x_in, gates_in, plan = self.dispatch(x, expert_idx, gates)
        y = run_experts(x, plan.here, plan.here.sort_rows(gates))
        y_in = run_experts(x_in, plan.received, plan.received.sort_rows(gates_in))
        return self.combine(y, y_in, plan)

    def dispatch(
        self, x: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchPlan]:
        """Received token rows ``[U_in, d]`` and their gates ``[U_in, K]`` (only the slots in
        ``plan.received`` are read), and the plan."""
        if x.dim() != 2 or expert_idx.dim() != 2 or expert_idx.shape[0] != x.shape[0]:
            raise ValueError(
                f"x must be [N, d] and expert_idx [N, K] with the same N, got {tuple(x.shape)} and "
                f"{tuple(expert_idx.shape)}"
            )
        if gates.shape != expert_idx.shape:
            raise ValueError(
                f"gates must be [N, K] like expert_idx {tuple(expert_idx.shape)}, got {tuple(gates.shape)}"
            )
        expert_idx = expert_idx.long()
        if expert_idx.numel():
            lo, hi = torch.stack(torch.aminmax(expert_idx)).tolist()  # NOTE: one host-device sync
            if lo < 0 or hi >= self.n_experts:
                raise ValueError(f"expert ids must lie in [0, {self.n_experts}), got [{lo}, {hi}]")
        n_tokens, p, n_local = x.shape[0], self.ep_size, self.n_local
        rank_of_slot, local_expert = expert_idx // n_local, expert_idx % n_local  # [N, K]
        here = prepare_selection(torch.where(rank_of_slot == self.ep_rank, local_expert, -1), n_local, empty_slots=True)
        to_rank = torch.zeros(n_tokens, p, dtype=torch.bool, device=x.device).scatter_(1, rank_of_slot, True)
        to_rank[:, self.ep_rank] = False
        row_rank, send_token_ids = to_rank.t().nonzero(as_tuple=True)  # rank-major, tokens ascending
        send_counts = to_rank.sum(0)
        recv_counts = exchange_counts(send_counts, group=self.group)
        # NOTE: host-device sync: all_to_all_single takes its split sizes as Python ints.
        send_splits, recv_splits = tuple(send_counts.tolist()), tuple(recv_counts.tolist())

        def send(t: torch.Tensor) -> torch.Tensor:
            return all_to_all(
                t,
                output_splits=recv_splits,
                input_splits=send_splits,
                group=self.group,
                transport=self.transport,
                meter=self.meter,
            )

        on_row_rank = rank_of_slot.index_select(0, send_token_ids) == row_rank.unsqueeze(1)  # [U, K]
        ids_there = torch.where(on_row_rank, local_expert.index_select(0, send_token_ids), -1)
        # One all-to-all carries a row, its K gates and its K local expert ids side by side: each
        # collective costs ~1 ms of latency on a small CPU machine.
        d, k = x.shape[1], expert_idx.shape[1]
        ids_words = _ids_as_words(ids_there, x.dtype)
        payload = send(
            torch.cat([x.index_select(0, send_token_ids), gates.index_select(0, send_token_ids), ids_words], dim=1)
        )
        x_recv, gates_recv, ids_recv = payload.split([d, k, ids_words.shape[1]], dim=1)
        received = prepare_selection(_ids_from_words(ids_recv.detach(), k), n_local, empty_slots=True)
        self.meter.count_rows(received=sum(recv_splits), computed=here.n_rows + received.n_rows)
        plan = DispatchPlan(
            here=here,
            received=received,
            send_token_ids=send_token_ids,
            send_splits=send_splits,
            recv_splits=recv_splits,
        )
        return x_recv, gates_recv, plan

    def combine(self, y: torch.Tensor, y_in: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """``y [N, d]`` from the slots here, plus the expert outputs of the received rows ``y_in
        [U_in, d]`` (summed per row, in the order ``dispatch`` returned the rows), each sent back and
        added to its token -> ``[N, d]``."""
        if y_in.shape[0] != plan.received.n_tokens:
            raise ValueError(f"expected {plan.received.n_tokens} expert output rows, got {y_in.shape[0]}")
        y_back = all_to_all(
            y_in,
            output_splits=plan.send_splits,
            input_splits=plan.recv_splits,
            group=self.group,
            transport=self.transport,
            meter=self.meter,
        )
        return y.index_add_(0, plan.send_token_ids, y_back)  # y: this layer's fresh output, not saved for backward

    def __repr__(self) -> str:
        return (
            f"AllToAllDispatcher(n_experts={self.n_experts}, ep_size={self.ep_size}, ep_rank={self.ep_rank}, "
            f"experts=[{self.shard.experts.start}, {self.shard.experts.stop})"
            + (f", transport={self.transport!r})" if self.transport is not None else ")")
        )


def _ids_as_words(ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int64 ``[U, K]`` -> the same bytes as ``[U, K·8 / itemsize]`` words of ``dtype``, to travel in a
    payload of that dtype. The words are only copied, never computed with, so every bit arrives."""
    width = ids.shape[1] * 8 // torch.empty((), dtype=dtype).element_size()
    return ids.contiguous().reshape(-1).view(dtype).view(-1, width)


def _ids_from_words(words: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`_ids_as_words` on a (strided) column slice of a received payload."""
    return words.clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.int64).view(-1, k)
