"""The torch backend's primitives as ``torch.library`` custom ops, for ``torch.compile``.

Shapes as in ``torch_backend.py``. The backend walks the sorted rows in chunks whose bounds it reads on
the host (``offsets.tolist()``), which Dynamo cannot trace: inside a compiled region that would break
the graph at every CVMM call, forward and backward. Wrapped as custom ops with fake (shape-only)
kernels, each primitive is one opaque node of the graph instead, and runs the same eager code at run
time: a compiled model's expert matmuls give the eager results bit for bit. :class:`TorchBackend`
calls these only while Dynamo traces (``torch.compiler.is_compiling()``); eager calls skip the op
dispatch (a few µs each).

An :class:`ExpertSelection` crosses the op boundary as its five tensors and two ints, the backend as
its two block sizes (a custom op takes tensors and scalars only). ``mm_scatter_backward`` returns
0-element tensors for the gradients not asked for (an op cannot return None).
"""

from __future__ import annotations

import torch

from .selection import ExpertSelection

_SEL_SCHEMA = "Tensor expert_ids, Tensor order, Tensor token_ids, Tensor counts, Tensor offsets, int n_tokens, int k"


def selection_args(sel: ExpertSelection) -> tuple:
    return (sel.expert_ids, sel.order, sel.token_ids, sel.counts, sel.offsets, sel.n_tokens, sel.k)


def _selection(expert_ids, order, token_ids, counts, offsets, n_tokens, k) -> ExpertSelection:
    return ExpertSelection(expert_ids, order, token_ids, counts, offsets, n_tokens, k)


def _eager(block_rows: int, pack_rows: int):
    from .torch_backend import TorchBackend  # here: torch_backend imports this module

    return TorchBackend(block_rows, pack_rows)


@torch.library.custom_op("sigma_moe::torch_gather_mm", mutates_args=())
def gather_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    expert_ids: torch.Tensor,
    order: torch.Tensor,
    token_ids: torch.Tensor,
    counts: torch.Tensor,
    offsets: torch.Tensor,
    n_tokens: int,
    k: int,
    block_rows: int,
    pack_rows: int,
) -> torch.Tensor:
    sel = _selection(expert_ids, order, token_ids, counts, offsets, n_tokens, k)
    return _eager(block_rows, pack_rows).gather_mm(x, sel, w)


@gather_mm.register_fake
def _(x, w, expert_ids, order, token_ids, counts, offsets, n_tokens, k, block_rows, pack_rows):
    return x.new_empty(expert_ids.shape[0], w.shape[2])


@torch.library.custom_op("sigma_moe::torch_mm_scatter", mutates_args=())
def mm_scatter(
    h: torch.Tensor,
    w: torch.Tensor,
    gates: torch.Tensor | None,
    expert_ids: torch.Tensor,
    order: torch.Tensor,
    token_ids: torch.Tensor,
    counts: torch.Tensor,
    offsets: torch.Tensor,
    n_tokens: int,
    k: int,
    block_rows: int,
    pack_rows: int,
) -> torch.Tensor:
    sel = _selection(expert_ids, order, token_ids, counts, offsets, n_tokens, k)
    return _eager(block_rows, pack_rows).mm_scatter(h, sel, w, gates)


@mm_scatter.register_fake
def _(h, w, gates, expert_ids, order, token_ids, counts, offsets, n_tokens, k, block_rows, pack_rows):
    return h.new_empty(n_tokens, w.shape[2])


@torch.library.custom_op("sigma_moe::torch_weight_grad", mutates_args=())
def weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    expert_ids: torch.Tensor,
    order: torch.Tensor,
    token_ids: torch.Tensor,
    counts: torch.Tensor,
    offsets: torch.Tensor,
    n_tokens: int,
    k: int,
    block_rows: int,
    pack_rows: int,
    a_is_tokens: bool,
    b_is_tokens: bool,
) -> torch.Tensor:
    sel = _selection(expert_ids, order, token_ids, counts, offsets, n_tokens, k)
    return _eager(block_rows, pack_rows).weight_grad(a, b, sel, a_is_tokens=a_is_tokens, b_is_tokens=b_is_tokens)


@weight_grad.register_fake
def _(
    a, b, expert_ids, order, token_ids, counts, offsets, n_tokens, k, block_rows, pack_rows, a_is_tokens, b_is_tokens
):
    return a.new_empty(counts.shape[0], a.shape[1], b.shape[1])


@torch.library.custom_op("sigma_moe::torch_mm_scatter_backward", mutates_args=())
def mm_scatter_backward(
    grad_out: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    gates: torch.Tensor | None,
    expert_ids: torch.Tensor,
    order: torch.Tensor,
    token_ids: torch.Tensor,
    counts: torch.Tensor,
    offsets: torch.Tensor,
    n_tokens: int,
    k: int,
    block_rows: int,
    pack_rows: int,
    need_h: bool,
    need_w: bool,
    need_gates: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sel = _selection(expert_ids, order, token_ids, counts, offsets, n_tokens, k)
    grads = _eager(block_rows, pack_rows).mm_scatter_backward(
        grad_out, h, w, gates, sel, need_h=need_h, need_w=need_w, need_gates=need_gates
    )
    return tuple(h.new_empty(0) if g is None else g for g in grads)


@mm_scatter_backward.register_fake
def _(
    grad_out,
    h,
    w,
    gates,
    expert_ids,
    order,
    token_ids,
    counts,
    offsets,
    n_tokens,
    k,
    block_rows,
    pack_rows,
    need_h,
    need_w,
    need_gates,
):
    n_rows = expert_ids.shape[0]
    return (
        h.new_empty(n_rows, w.shape[1]) if need_h else h.new_empty(0),
        h.new_empty(w.shape) if need_w else h.new_empty(0),
        h.new_empty(n_rows) if need_gates else h.new_empty(0),
    )
