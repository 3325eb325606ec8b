"""CVMM autograd Functions and their functional aliases, on top of any backend's three primitives.

Shapes: N tokens, R = N·K sorted rows, E experts; ``w`` is [E, d_in, d_out].
- ``cvmm(x, sel, w)``: x [N, d_in] -> [R, d_out]
- ``cvmm_combine(h, sel, w, gates)``: h [R, d_in], gates [R] or None -> [N, d_out]
A σ-MoE expert MLP is ``cvmm_combine(relu(cvmm(x, sel, w1)), sel, w2, gates)``.

The backward of ``cvmm_combine`` is the backend's ``mm_scatter_backward`` (``primitives.py``): composed
from the three primitives, or one fused pass (the torch backend's, which gathers grad_out only once).
"""

from __future__ import annotations

import torch

from . import backends
from .primitives import CVMMBackend
from .reference import cvmm_combine_reference, cvmm_reference
from .selection import ExpertSelection


def _check(x: torch.Tensor, sel: ExpertSelection, w: torch.Tensor, expected_rows: int, what: str) -> None:
    if w.dim() != 3 or w.shape[0] != sel.n_experts:
        raise ValueError(f"weights must be [n_experts={sel.n_experts}, d_in, d_out], got {tuple(w.shape)}")
    if x.dim() != 2 or x.shape[0] != expected_rows or x.shape[1] != w.shape[1]:
        raise ValueError(f"{what} must be [{expected_rows}, {w.shape[1]}], got {tuple(x.shape)}")
    if x.dtype != w.dtype:
        raise ValueError(f"{what} dtype {x.dtype} differs from weight dtype {w.dtype}; cast one of them")


class _GatherMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, sel, backend):
        ctx.sel, ctx.backend = sel, backend
        ctx.save_for_backward(x, w)
        return backend.gather_mm(x, sel, w)

    @staticmethod
    def backward(ctx, grad_out):
        x, w = ctx.saved_tensors
        sel, backend = ctx.sel, ctx.backend
        grad_out = grad_out.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = backend.mm_scatter(grad_out, sel, w.transpose(1, 2), None)
        if ctx.needs_input_grad[1]:
            grad_w = backend.weight_grad(x, grad_out, sel, a_is_tokens=True, b_is_tokens=False)
        return grad_x, grad_w, None, None


class _MMScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, gates, sel, backend):
        ctx.sel, ctx.backend = sel, backend
        ctx.save_for_backward(h, w, gates)
        return backend.mm_scatter(h, sel, w, gates)

    @staticmethod
    def backward(ctx, grad_out):
        h, w, gates = ctx.saved_tensors
        sel, backend = ctx.sel, ctx.backend
        grad_out = grad_out.contiguous()
        need_h, need_w, need_gates = ctx.needs_input_grad[:3]
        grad_h, grad_w, grad_gates = backend.mm_scatter_backward(
            grad_out, h, w, gates, sel, need_h=need_h, need_w=need_w, need_gates=need_gates
        )
        return grad_h, grad_w, grad_gates, None, None


def _backend(backend: str | CVMMBackend, device: torch.device) -> CVMMBackend | None:
    """A registered name ("auto" picks by device), or a backend instance (e.g. ``TorchBackend(block_rows=64)``);
    None for "reference", which is not built from primitives."""
    if not isinstance(backend, str):
        return backend
    name = backends.resolve_backend_name(backend, device)
    return None if name == "reference" else backends.get_backend(name)


def cvmm(
    x: torch.Tensor, sel: ExpertSelection, w: torch.Tensor, *, backend: str | CVMMBackend = "auto"
) -> torch.Tensor:
    """``out[r] = x[token(r)] @ w[expert(r)]`` for every sorted row r."""
    _check(x, sel, w, sel.n_tokens, "x")
    impl = _backend(backend, x.device)
    if impl is None:
        return cvmm_reference(x, sel, w)
    return _GatherMM.apply(x, w, sel, impl)


def cvmm_combine(
    h: torch.Tensor,
    sel: ExpertSelection,
    w: torch.Tensor,
    gates: torch.Tensor | None = None,
    *,
    backend: str | CVMMBackend = "auto",
) -> torch.Tensor:
    """``out[token(r)] += gates[r] · h[r] @ w[expert(r)]``: the second projection fused with the
    gate-weighted sum over each token's K slots. gates are per sorted row (``sel.sort_rows(g)``)."""
    _check(h, sel, w, sel.n_rows, "h")
    if gates is not None and gates.shape != (sel.n_rows,):
        raise ValueError(f"gates must be [{sel.n_rows}] (one per sorted row), got {tuple(gates.shape)}")
    if gates is not None and gates.dtype != h.dtype:
        raise ValueError(f"gates dtype {gates.dtype} differs from h dtype {h.dtype}; cast the gates")
    impl = _backend(backend, h.device)
    if impl is None:
        return cvmm_combine_reference(h, sel, w, gates)
    return _MMScatter.apply(h, w, gates, sel, impl)
