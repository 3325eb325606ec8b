"""What the expert-parallel dispatcher's all-to-alls send under uniform routing: the exchange meter's
bytes, predicted (the benchmarks and the planner use it; tests hold it against the meter).

A token goes once to each *other* rank of its EP group that holds at least one of its K experts. With
the K experts drawn uniformly without replacement from E, spread E / P per rank, another rank is
reached with probability

    reach = 1 − C(E − E/P, K) / C(E, K)

so a rank sends (P − 1) · reach rows per token it routes, and per such row (e = bytes per element of
the activations, d = d_model):

    forward dispatch      d·e + K·e + 8·K   the row, its K gates, its K int64 local expert ids
    forward combine       d·e               the summed expert output, back to the token's rank
    backward              the same two, mirrored (the all-to-all's gradient carries the same rows)
    recompute             activation checkpointing runs the forward's two again in backward
"""

from __future__ import annotations

from math import comb

ID_BYTES = 8  # expert ids travel as int64, bit-copied into the payload's dtype


def other_rank_reach(*, n_experts: int, ep_size: int, k: int) -> float:
    """Probability that one given other rank of the EP group holds one of a token's K experts."""
    if ep_size <= 1:
        return 0.0
    return 1.0 - comb(n_experts - n_experts // ep_size, k) / comb(n_experts, k)


def rows_sent_per_token(*, n_experts: int, ep_size: int, k: int) -> float:
    """Rows a rank sends per routed token in one forward dispatch: (P − 1) · reach."""
    return (ep_size - 1) * other_rank_reach(n_experts=n_experts, ep_size=ep_size, k=k)


def dispatch_row_bytes(*, d_model: int, k: int, element_size: int) -> int:
    """One dispatched row: the token, its K gates, its K int64 ids (the receiver keeps it for backward)."""
    return d_model * element_size + k * element_size + ID_BYTES * k


def a2a_bytes_per_token(
    *, d_model: int, k: int, n_experts: int, ep_size: int, element_size: int, recompute: bool = False
) -> float:
    """Bytes a rank sends to other ranks per token it routes through one layer, forward and backward
    (and the recompute's forward with activation checkpointing)."""
    dispatch = dispatch_row_bytes(d_model=d_model, k=k, element_size=element_size)
    combine = d_model * element_size
    forwards = 2 if recompute else 1
    return rows_sent_per_token(n_experts=n_experts, ep_size=ep_size, k=k) * (dispatch + combine) * (forwards + 1)
