"""Differentiable collectives for expert parallelism.

- ``all_to_all(x, output_splits=, input_splits=, group=)``: rows ``[sum(input_splits), ...]`` are sent
  in consecutive chunks, chunk i to rank i of ``group``; the result holds ``output_splits[i]`` rows
  from rank i, in rank order. Uneven and zero splits are fine. Backward is the same all-to-all with
  the splits swapped (the gradient of each row goes back to the rank that sent it). Both directions
  feed ``meter`` when one is given (bytes to other ranks, time; the dispatcher passes its own).
- ``all_reduce_sum(t, group=)``: sum over the group whose backward also sums the incoming gradients:
  every rank's loss depends on the sum, so each input's gradient is the sum over ranks. (A plain
  ``dist.all_reduce`` inside a forward leaves the gradient W times too small.)
- ``exchange_counts(counts, group=)``: plain all-to-all of an integer ``[P]`` vector, entry i to rank i.

All are collectives: every rank of ``group`` calls them in the same order, backward included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.distributed as dist

from .collectives import all_reduce_, all_to_all_single_
from .exchange_meter import ExchangeMeter


def _check_splits(splits: Sequence[int], group_size: int, what: str) -> tuple[int, ...]:
    splits = tuple(int(s) for s in splits)
    if len(splits) != group_size or min(splits, default=0) < 0:
        raise ValueError(f"{what} must be {group_size} non-negative row counts (one per rank), got {splits}")
    return splits


# transport(out, x, output_splits, input_splits): fills ``out`` with the rows, like all_to_all_single
Transport = Callable[[torch.Tensor, torch.Tensor, list[int], list[int]], object]


def _torch_all_to_all(out, x, output_splits, input_splits, *, group):
    all_to_all_single_(out, x, output_splits, input_splits, group=group)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group, transport, meter):
        ctx.splits, ctx.group, ctx.transport, ctx.meter = (output_splits, input_splits), group, transport, meter
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        x = x.contiguous()
        move = lambda: transport(out, x, list(output_splits), list(input_splits))  # noqa: E731
        if meter is None:
            move()
        else:
            meter.measure(move, x, input_splits, dist.get_rank(group))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        output_splits, input_splits = ctx.splits
        grad_x = _AllToAll.apply(
            grad_out.contiguous(), input_splits, output_splits, ctx.group, ctx.transport, ctx.meter
        )
        return grad_x, None, None, None, None, None


def all_to_all(
    x: torch.Tensor,
    *,
    output_splits: Sequence[int],
    input_splits: Sequence[int],
    group: dist.ProcessGroup,
    transport: Transport | None = None,
    meter: ExchangeMeter | None = None,
) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` along dim 0 with (uneven) split sizes given on the host;
    ``transport`` moves the rows instead of torch.distributed (e.g. :class:`MPIAllToAll` over the same
    ranks as ``group``); ``meter`` records the bytes and time of both directions."""
    size = dist.get_world_size(group)
    input_splits = _check_splits(input_splits, size, "input_splits")
    output_splits = _check_splits(output_splits, size, "output_splits")
    if sum(input_splits) != x.shape[0]:
        raise ValueError(f"input_splits {input_splits} sum to {sum(input_splits)}, but x has {x.shape[0]} rows")
    transport = transport or partial(_torch_all_to_all, group=group)
    return _AllToAll.apply(x, output_splits, input_splits, group, transport, meter)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        out = t.clone(memory_format=torch.contiguous_format)
        all_reduce_(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _AllReduceSum.apply(grad_out, ctx.group), None


def all_reduce_sum(t: torch.Tensor, *, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum of ``t`` over the ranks of ``group``; the gradient is summed over the ranks as well."""
    return _AllReduceSum.apply(t, group)


def exchange_counts(counts: torch.Tensor, *, group: dist.ProcessGroup) -> torch.Tensor:
    """``counts [P]`` (P = group size): entry i goes to rank i. Returns ``[P]``, entry i from rank i."""
    size = dist.get_world_size(group)
    if counts.dim() != 1 or counts.shape[0] != size:
        raise ValueError(f"counts must be [{size} ranks], got {tuple(counts.shape)}")
    return all_to_all_single_(torch.empty_like(counts), counts.contiguous(), group=group)


class GlobalTokenSum:
    """A routed layer's ``token_sum`` under data parallelism: the sum over every rank's tokens
    (replaces :class:`sigma_moe.layers.reduction.LocalTokenSum`)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    # Eager inside a compiled block (training.compile): the collective runs between two graphs.
    @torch.compiler.disable
    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t, group=self.group)

    def __repr__(self) -> str:
        return f"GlobalTokenSum(ranks={dist.get_world_size(self.group)})"
