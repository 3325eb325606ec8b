"""Routing-sort prep: turn per-token expert choices into rows grouped by expert.

Shapes: N tokens, K slots per token, R = N·K rows, E experts.
A *row* is one (token, slot) pair. Sorting rows by expert (stably) makes every expert's rows one
contiguous segment, which is what the grouped matmuls of every CVMM backend consume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertSelection:
    """Rows grouped by expert; produced by :func:`prepare_selection`."""

    expert_ids: torch.Tensor  # [R] long, expert of each sorted row (non-decreasing)
    order: torch.Tensor  # [R] long, flat index token·K + slot of each sorted row
    token_ids: torch.Tensor  # [R] long, input row each sorted row reads (order // K)
    counts: torch.Tensor  # [E] long, rows per expert
    offsets: torch.Tensor  # [E + 1] long, rows of expert e are offsets[e]:offsets[e + 1]
    n_tokens: int  # rows of the token-ordered tensor that token_ids index into
    k: int

    @property
    def n_experts(self) -> int:
        return self.counts.numel()

    @property
    def n_rows(self) -> int:
        return self.expert_ids.numel()

    def sort_rows(self, values: torch.Tensor) -> torch.Tensor:
        """Reorder a per-(token, slot) tensor ``[N, K, ...]`` into sorted row order ``[R, ...]``."""
        flat = values.reshape(self.n_tokens * self.k, *values.shape[2:])
        return flat.index_select(0, self.order)


def prepare_selection(expert_idx: torch.Tensor, n_experts: int, *, empty_slots: bool = False) -> ExpertSelection:
    """Sort the (token, slot) pairs of ``expert_idx [N, K]`` by expert id, stably.

    ``empty_slots``: ids < 0 mark slots that route nowhere here (no row), so a token may have fewer
    than K rows; the expert-parallel dispatcher receives tokens with only some slots on this rank."""
    if expert_idx.dim() != 2:
        raise ValueError(f"expert_idx must be [n_tokens, k], got shape {tuple(expert_idx.shape)}")
    n_tokens, k = expert_idx.shape
    flat = expert_idx.reshape(-1).long()
    lowest = -1 if empty_slots else 0
    # Under torch.compile the check is left out: reading the bounds on the host would break the graph
    # (a compiled model's ids come from its own top-K, in range by construction).
    if flat.numel() and not torch.compiler.is_compiling():
        lo, hi = torch.stack(torch.aminmax(flat)).tolist()  # NOTE: one host-device sync
        if lo < lowest or hi >= n_experts:
            raise ValueError(f"expert ids must lie in [{lowest}, {n_experts}), got [{lo}, {hi}]")
    if empty_slots:  # empty slots sort last as a pseudo-expert n_experts, then are cut off
        flat = torch.where(flat < 0, n_experts, flat)
    expert_ids, order = torch.sort(flat, stable=True)
    counts = count_per_expert(flat, n_experts + empty_slots)[:n_experts]
    if empty_slots:
        n_rows = int(counts.sum())  # NOTE: host-device sync
        expert_ids, order = expert_ids[:n_rows], order[:n_rows]
    return ExpertSelection(
        expert_ids=expert_ids,
        order=order,
        token_ids=order // k,
        counts=counts,
        offsets=_offsets(counts),
        n_tokens=n_tokens,
        k=k,
    )


def count_per_expert(expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """[n_experts] long: how often each id in ``[0, n_experts)`` occurs in ``expert_ids``. A scatter-add
    into a fixed-size result, not ``bincount``, whose data-dependent output size breaks a compiled graph."""
    flat = expert_ids.reshape(-1)
    return flat.new_zeros(n_experts).scatter_add_(0, flat, torch.ones_like(flat))


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
