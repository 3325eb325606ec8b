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
0-element tensors for the gradients not asked for (an op cannot return None). Every op has the same
middle (the selection, the block sizes), so one function defines them: :func:`_define`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .selection import ExpertSelection

# What every op takes between its own leading tensors and its trailing flags.
_SELECTION_SCHEMA = (
    "Tensor expert_ids, Tensor order, Tensor token_ids, Tensor counts, Tensor offsets, int n_tokens, int k, "
    "int block_rows, int pack_rows"
)
_SELECTION_ARGS = 7


def selection_args(sel: ExpertSelection) -> tuple:
    return (sel.expert_ids, sel.order, sel.token_ids, sel.counts, sel.offsets, sel.n_tokens, sel.k)


def _define(name: str, schema: str, run: Callable, fake: Callable):
    """The op ``sigma_moe::torch_<name>``; ``schema`` is its signature with ``SELECTION`` standing for
    the selection and block sizes. At run time it calls ``run(backend, *lead, sel, *flags)`` (``backend``
    the eager :class:`TorchBackend` of those block sizes), while tracing ``fake(*lead, sel, *flags)``."""
    n_lead = schema[: schema.index("SELECTION")].count("Tensor")

    def unpack(args: tuple) -> tuple:
        lead, rest = args[:n_lead], args[n_lead:]
        sel = ExpertSelection(*rest[:_SELECTION_ARGS])
        block_rows, pack_rows = rest[_SELECTION_ARGS : _SELECTION_ARGS + 2]
        return (block_rows, pack_rows), (*lead, sel, *rest[_SELECTION_ARGS + 2 :])

    def eager(*args):
        blocks, op_args = unpack(args)
        return run(_eager(*blocks), *op_args)

    op = torch.library.custom_op(
        f"sigma_moe::torch_{name}", eager, mutates_args=(), schema=schema.replace("SELECTION", _SELECTION_SCHEMA)
    )
    op.register_fake(lambda *args: fake(*unpack(args)[1]))
    return op


def _eager(block_rows: int, pack_rows: int):
    from .torch_backend import TorchBackend  # here: torch_backend imports this module

    return TorchBackend(block_rows, pack_rows)


def _no_grad(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


gather_mm = _define(
    "gather_mm",
    "(Tensor x, Tensor w, SELECTION) -> Tensor",
    lambda backend, x, w, sel: backend.gather_mm(x, sel, w),
    lambda x, w, sel: x.new_empty(sel.expert_ids.shape[0], w.shape[2]),
)
mm_scatter = _define(
    "mm_scatter",
    "(Tensor h, Tensor w, Tensor? gates, SELECTION) -> Tensor",
    lambda backend, h, w, gates, sel: backend.mm_scatter(h, sel, w, gates),
    lambda h, w, gates, sel: h.new_empty(sel.n_tokens, w.shape[2]),
)
weight_grad = _define(
    "weight_grad",
    "(Tensor a, Tensor b, SELECTION, bool a_is_tokens, bool b_is_tokens) -> Tensor",
    lambda backend, a, b, sel, a_tok, b_tok: backend.weight_grad(a, b, sel, a_is_tokens=a_tok, b_is_tokens=b_tok),
    lambda a, b, sel, a_tok, b_tok: a.new_empty(sel.counts.shape[0], a.shape[1], b.shape[1]),
)


def _mm_scatter_backward(backend, grad_out, h, w, gates, sel, need_h, need_w, need_gates):
    grads = backend.mm_scatter_backward(grad_out, h, w, gates, sel, need_h=need_h, need_w=need_w, need_gates=need_gates)
    return tuple(_no_grad(h) if g is None else g for g in grads)


def _mm_scatter_backward_shapes(grad_out, h, w, gates, sel, need_h, need_w, need_gates):
    n_rows = sel.expert_ids.shape[0]
    return (
        h.new_empty(n_rows, w.shape[1]) if need_h else _no_grad(h),
        h.new_empty(w.shape) if need_w else _no_grad(h),
        h.new_empty(n_rows) if need_gates else _no_grad(h),
    )


mm_scatter_backward = _define(
    "mm_scatter_backward",
    "(Tensor grad_out, Tensor h, Tensor w, Tensor? gates, SELECTION, bool need_h, bool need_w, bool need_gates) "
    "-> (Tensor, Tensor, Tensor)",
    _mm_scatter_backward,
    _mm_scatter_backward_shapes,
)
