"""Fast PyTorch CVMM path (CPU, and any device without Triton).

Shapes: N tokens, R sorted rows, E experts, B <= ``block_rows`` rows per block; ``w`` is [E, d_in, d_out].

What costs on a CPU besides the matmul FLOPs (measured at R = 32768, d_model 512, fp32, 2 threads):
- Fresh memory. A new [R, d_model] tensor (64 MB; glibc maps anything over 32 MB fresh from the OS)
  costs ~15 ms of page faults: a gather into it takes ~18 ms, into a reused buffer ~3 ms. So nothing
  here materialises an [R, d_model] tensor: each expert's rows are gathered block by block into one
  scratch buffer (``index_select(out=)``), and the combine scatters each block's product straight into
  the [N, d_out] output (``index_add_``). ``F.grouped_mm`` would need those gathered copies; with
  them it measured no faster than a plain per-expert loop (~1.8x this path's time per step).
- Call overhead: every ``torch.mm`` costs ~20-40 µs of BLAS/OpenMP set-up, so blocks are large
  (up to 4096 rows: one block per expert at σ-MoE sizes) rather than cache-sized.
- The gates go on the d_in side of the combine ((g·h) @ w == g·(h @ w)), the narrower one in σ-MoE's
  second matmul, scaled per block into scratch; the combine's backward gathers grad_out once for
  grad_h, grad_w and grad_gates (``mm_scatter_backward``).
The matmuls then run as fast as a dense MLP's of the same FLOPs; what σ-MoE pays on top is the three
d_model-wide gathers and two scatters (~25 ms), routing, and per-block Python (benchmarks/README.md).
"""
from __future__ import annotations

from typing import Iterator

import torch

from .selection import ExpertSelection

# Rows per block: few mm calls (see above); a [4096, 512] fp32 scratch buffer is 8 MB.
DEFAULT_BLOCK_ROWS = 4096

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _blocks(sel: ExpertSelection, block_rows: int) -> Iterator[tuple[int, int, int]]:
    """(expert, lo, hi) for every block of <= block_rows sorted rows inside one expert's segment.
    NOTE: host-device sync on offsets (free on CPU; this backend's loop needs the bounds on the host)."""
    offsets = sel.offsets.tolist()
    for e in range(sel.n_experts):
        for lo in range(offsets[e], offsets[e + 1], block_rows):
            yield e, lo, min(lo + block_rows, offsets[e + 1])


class _RowReader:
    """Reads sorted rows lo:hi of a tensor that is either already in row order or indexed per token
    (gathered into one reused scratch buffer, so the [R, d] gather is never materialised)."""

    def __init__(self, t: torch.Tensor, sel: ExpertSelection, is_tokens: bool, block_rows: int) -> None:
        self.t = t
        self.token_ids = sel.token_ids if is_tokens else None
        if self.token_ids is not None:
            self.buf = t.new_empty(min(block_rows, sel.n_rows), t.shape[1])

    def __call__(self, lo: int, hi: int) -> torch.Tensor:
        if self.token_ids is None:
            return self.t[lo:hi]
        return torch.index_select(self.t, 0, self.token_ids[lo:hi], out=self.buf[: hi - lo])


class _ScaledRows:
    """Rows lo:hi of ``gates[:, None] · h``, scaled block by block into one reused scratch buffer.
    (g·h) @ w == g·(h @ w): the gates go on the d_in side, the narrower one in σ-MoE's second matmul."""

    def __init__(self, h: torch.Tensor, gates: torch.Tensor | None, block_rows: int) -> None:
        self.h, self.gates = h, None if gates is None else gates.unsqueeze(1)
        if gates is not None:
            self.buf = h.new_empty(min(block_rows, h.shape[0]), h.shape[1])

    def __call__(self, lo: int, hi: int) -> torch.Tensor:
        if self.gates is None:
            return self.h[lo:hi]
        return torch.mul(self.h[lo:hi], self.gates[lo:hi], out=self.buf[: hi - lo])


class TorchBackend:
    """The three CVMM primitives (see ``backends.CVMMBackend``), plus the fused ``mm_scatter_backward``,
    as blocked per-expert ``torch.mm`` calls. Any dtype and device; fp16/bf16 weight gradients
    accumulate across blocks in fp32."""

    name = "torch"

    def __init__(self, block_rows: int = DEFAULT_BLOCK_ROWS) -> None:
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        self.block_rows = block_rows

    def gather_mm(self, x: torch.Tensor, sel: ExpertSelection, w: torch.Tensor) -> torch.Tensor:
        """out[r] = x[token(r)] @ w[expert(r)]; x [N, d_in] -> [R, d_out]."""
        out = x.new_empty(sel.n_rows, w.shape[-1])
        rows, w_e = _RowReader(x, sel, True, self.block_rows), w.unbind(0)
        for e, lo, hi in _blocks(sel, self.block_rows):
            torch.mm(rows(lo, hi), w_e[e], out=out[lo:hi])
        return out

    def mm_scatter(
        self, h: torch.Tensor, sel: ExpertSelection, w: torch.Tensor, gates: torch.Tensor | None
    ) -> torch.Tensor:
        """out[token(r)] += gates[r] · h[r] @ w[expert(r)]; h [R, d_in] -> [N, d_out]."""
        a_rows, w_e = _ScaledRows(h, gates, self.block_rows), w.unbind(0)
        if sel.token_ids is None:  # rows are the output rows: write in place, nothing to scatter
            out = h.new_empty(sel.n_rows, w.shape[2])
            for e, lo, hi in _blocks(sel, self.block_rows):
                torch.mm(a_rows(lo, hi), w_e[e], out=out[lo:hi])
            return out
        out = h.new_zeros(sel.n_tokens, w.shape[2])
        y_buf = h.new_empty(min(self.block_rows, sel.n_rows), w.shape[2])
        for e, lo, hi in _blocks(sel, self.block_rows):
            out.index_add_(0, sel.token_ids[lo:hi], torch.mm(a_rows(lo, hi), w_e[e], out=y_buf[: hi - lo]))
        return out

    def weight_grad(
        self, a: torch.Tensor, b: torch.Tensor, sel: ExpertSelection, *, a_is_tokens: bool, b_is_tokens: bool
    ) -> torch.Tensor:
        """grad[e] = Σ_{rows r of e} A[r]ᵀ B[r], where A, B are a, b read per row ([E, d_a, d_b])."""
        grad = _WeightGrad(sel.n_experts, a.shape[1], b.shape[1], a)
        a_rows = _RowReader(a, sel, a_is_tokens, self.block_rows)
        b_rows = _RowReader(b, sel, b_is_tokens, self.block_rows)
        for e, lo, hi in _blocks(sel, self.block_rows):
            grad.add(e, a_rows(lo, hi), b_rows(lo, hi))
        return grad.result()

    def mm_scatter_backward(
        self,
        grad_out: torch.Tensor,
        h: torch.Tensor,
        w: torch.Tensor,
        gates: torch.Tensor | None,
        sel: ExpertSelection,
        *,
        need_h: bool,
        need_w: bool,
        need_gates: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """All gradients of ``mm_scatter`` in one pass (the optional fused hook of ``cvmm.py``).

        With G[r] = grad_out[token(r)] and t[r] = G[r] @ w[e]ᵀ: grad_h[r] = gates[r]·t[r],
        grad_gates[r] = <t[r], h[r]>, grad_w[e] = Σ_{r of e} (gates[r]·h[r])ᵀ G[r]. Each G block is
        gathered once (into block scratch) and used by both matmuls.
        """
        d_in = w.shape[1]
        g_rows = _RowReader(grad_out, sel, True, self.block_rows)
        grad_h = h.new_empty(sel.n_rows, d_in) if need_h else None
        grad_gates = h.new_empty(sel.n_rows) if need_gates else None
        grad_w = _WeightGrad(sel.n_experts, d_in, w.shape[2], h) if need_w else None
        a_rows = _ScaledRows(h, gates, self.block_rows) if need_w else None
        t_buf = h.new_empty(min(self.block_rows, sel.n_rows), d_in) if need_gates and not need_h else None
        gates_2d = None if gates is None else gates.unsqueeze(1)
        w_t = w.transpose(1, 2).unbind(0)
        for e, lo, hi in _blocks(sel, self.block_rows):
            g = g_rows(lo, hi)
            if need_h or need_gates:  # t = G @ w[e]ᵀ, written where grad_h goes, scaled once read
                t = torch.mm(g, w_t[e], out=grad_h[lo:hi] if need_h else t_buf[: hi - lo])
                if need_gates:  # row-wise <t, h> as a batch of [1, d]·[d, 1] products, no temporary
                    torch.bmm(t.unsqueeze(1), h[lo:hi].unsqueeze(2), out=grad_gates[lo:hi].view(-1, 1, 1))
                if need_h and gates_2d is not None:
                    t.mul_(gates_2d[lo:hi])
            if need_w:
                grad_w.add(e, a_rows(lo, hi), g)
        return grad_h, None if grad_w is None else grad_w.result(), grad_gates


class _WeightGrad:
    """[E, d_a, d_b] weight gradient summed over blocks. An expert's first block writes (no zero-fill
    pass), later blocks add; experts without rows get zeros. fp16/bf16 accumulate in fp32."""

    def __init__(self, n_experts: int, d_a: int, d_b: int, like: torch.Tensor) -> None:
        self.dtype = like.dtype
        acc_dtype = torch.float32 if like.dtype in _LOW_PRECISION else like.dtype
        self.grad = torch.empty(n_experts, d_a, d_b, dtype=acc_dtype, device=like.device)
        self.written = [False] * n_experts

    def add(self, e: int, a_rows: torch.Tensor, b_rows: torch.Tensor) -> None:
        if self.grad.dtype != self.dtype:  # low precision: product in its dtype, sum in fp32
            product = torch.mm(a_rows.t(), b_rows)
            if self.written[e]:
                self.grad[e].add_(product)
            else:
                self.grad[e].copy_(product)
        elif self.written[e]:
            self.grad[e].addmm_(a_rows.t(), b_rows)
        else:
            torch.mm(a_rows.t(), b_rows, out=self.grad[e])
        self.written[e] = True

    def result(self) -> torch.Tensor:
        for e, written in enumerate(self.written):
            if not written:
                self.grad[e].zero_()
        return self.grad.to(self.dtype)
