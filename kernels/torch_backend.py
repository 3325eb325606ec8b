"""Fast PyTorch CVMM path (CPU, and any device without Triton).

Implements the three primitives every backend provides (see ``backends.CVMMBackend``) with one
matmul per expert segment of the sorted rows.
"""
from __future__ import annotations

import torch

from .selection import ExpertSelection


def _segments(sel: ExpertSelection):
    """(expert, start, end) for every expert that has rows. NOTE: host-device sync on offsets."""
    offsets = sel.offsets.tolist()
    return [(e, offsets[e], offsets[e + 1]) for e in range(sel.n_experts) if offsets[e + 1] > offsets[e]]


def _rows(t: torch.Tensor, sel: ExpertSelection, is_tokens: bool) -> torch.Tensor:
    return t.index_select(0, sel.token_ids) if is_tokens and sel.token_ids is not None else t


class TorchBackend:
    name = "torch"

    def gather_mm(self, x: torch.Tensor, sel: ExpertSelection, w: torch.Tensor) -> torch.Tensor:
        """out[r] = x[token(r)] @ w[expert(r)]; x [n_tokens, d_in] -> [R, d_out]."""
        rows = _rows(x, sel, True)
        out = rows.new_empty(sel.n_rows, w.shape[-1])
        for e, lo, hi in _segments(sel):
            torch.mm(rows[lo:hi], w[e], out=out[lo:hi])
        return out

    def mm_scatter(
        self, h: torch.Tensor, sel: ExpertSelection, w: torch.Tensor, gates: torch.Tensor | None
    ) -> torch.Tensor:
        """out[token(r)] += gates[r] · h[r] @ w[expert(r)]; h [R, d_in] -> [n_tokens, d_out]."""
        y_rows = h.new_empty(sel.n_rows, w.shape[-1])
        for e, lo, hi in _segments(sel):
            torch.mm(h[lo:hi], w[e], out=y_rows[lo:hi])
        if gates is not None:
            y_rows.mul_(gates.unsqueeze(-1))
        if sel.token_ids is None:
            return y_rows
        return y_rows.new_zeros(sel.n_tokens, w.shape[-1]).index_add_(0, sel.token_ids, y_rows)

    def weight_grad(
        self, a: torch.Tensor, b: torch.Tensor, sel: ExpertSelection, *, a_is_tokens: bool, b_is_tokens: bool
    ) -> torch.Tensor:
        """grad[e] = Σ_{rows r of e} A[r]ᵀ B[r], where A, B are a, b read per row ([E, d_a, d_b])."""
        a_rows, b_rows = _rows(a, sel, a_is_tokens), _rows(b, sel, b_is_tokens)
        grad = a.new_zeros(sel.n_experts, a.shape[-1], b.shape[-1])
        for e, lo, hi in _segments(sel):
            torch.mm(a_rows[lo:hi].t(), b_rows[lo:hi], out=grad[e])
        return grad
