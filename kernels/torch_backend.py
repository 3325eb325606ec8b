"""Fast PyTorch CVMM path (CPU, and any device without Triton).

Shapes: N tokens, R sorted rows, E experts, B <= ``block_rows`` rows per chunk; ``w`` is [E, d_in, d_out].

What costs on a CPU besides the matmul FLOPs (measured at R = 32768, d_model 512, fp32, 2 threads):
- Fresh memory. A new [R, d_model] tensor (64 MB; glibc maps anything over 32 MB fresh from the OS)
  costs ~15 ms of page faults: a gather into it takes ~18 ms, into a reused buffer ~3 ms. So nothing
  here materialises an [R, d_model] tensor: the rows are gathered chunk by chunk into one scratch
  buffer (``index_select(out=)``), and the combine scatters each chunk's products straight into the
  [N, d_out] output (``index_add_``). ``F.grouped_mm`` would need those gathered copies; with
  them it measured no faster than a plain per-expert loop (~1.8x this path's time per step).
- Call overhead: every op costs ~2-40 µs of Python, dispatch and OpenMP set-up (far more on a loaded
  machine, where a parallel region waits for a descheduled thread), so the rows are cut into chunks
  of up to 4096 rows regardless of experts: a chunk is gathered, scaled and scattered with one op each,
  and only the matmuls run per expert (``_chunks``). With 256 experts of ~128 rows that is 8 chunks
  and 256 matmuls per primitive, instead of 256 of each op.
- The gates go on the d_in side of the combine ((g·h) @ w == g·(h @ w)), the narrower one in σ-MoE's
  second matmul, scaled per chunk into scratch; the combine's backward gathers grad_out once for
  grad_h, grad_w and grad_gates (``mm_scatter_backward``).
The matmuls then run as fast as a dense MLP's of the same FLOPs; what σ-MoE pays on top is the three
d_model-wide gathers and two scatters (~25 ms), routing, and per-expert matmul calls (benchmarks/README.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .selection import ExpertSelection

# Rows per chunk: few gather/scatter calls (see above); a [4096, 512] fp32 scratch buffer is 8 MB.
DEFAULT_BLOCK_ROWS = 4096

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class _Chunk:
    """Sorted rows lo:hi (at most ``block_rows`` of them) and the experts whose rows they hold: a chunk
    is gathered, scaled and scattered with one op each, and only the matmuls run per expert."""

    lo: int
    hi: int
    experts: tuple[int, ...]  # ascending; only experts with rows in lo:hi (empty experts cost nothing)
    sizes: tuple[int, ...]  # rows of each of them in lo:hi, summing to hi - lo

    def split(self, t: torch.Tensor) -> zip:
        """(expert, rows of that expert) for ``t`` = this chunk's rows ``[hi - lo, ...]``."""
        return zip(self.experts, t.split(self.sizes))


def _chunks(sel: ExpertSelection, block_rows: int) -> list[_Chunk]:
    """Whole experts packed into chunks of at most ``block_rows`` rows (an expert with more rows gets
    chunks of its own, the last of which later experts may join), so an expert is split only when it
    must be: a split makes two smaller matmuls and, in a weight gradient, an accumulation.
    O(E + chunks) Python, whatever the expert sizes.
    NOTE: host-device sync on offsets (free on CPU; this backend's loop needs the bounds on the host)."""
    offsets = sel.offsets.tolist()
    chunks: list[_Chunk] = []
    lo, experts, sizes = 0, [], []  # the chunk being filled: rows lo:lo + sum(sizes)
    for e in range(sel.n_experts):
        start, end = offsets[e], offsets[e + 1]
        if start == end:
            continue
        if sizes and end - lo > block_rows:  # e does not fit after the others: close the chunk
            chunks.append(_Chunk(lo, start, tuple(experts), tuple(sizes)))
            lo, experts, sizes = start, [], []
        while end - lo > block_rows:  # e alone fills whole chunks
            chunks.append(_Chunk(lo, lo + block_rows, (e,), (block_rows,)))
            lo += block_rows
        experts.append(e)
        sizes.append(end - max(start, lo))
    if sizes:
        chunks.append(_Chunk(lo, offsets[-1], tuple(experts), tuple(sizes)))
    return chunks


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
    """Rows lo:hi of ``gates[:, None] · h``, scaled chunk by chunk into one reused scratch buffer.
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
    as chunked per-expert ``torch.mm`` calls. Any dtype and device; fp16/bf16 weight gradients
    accumulate across chunks in fp32."""

    name = "torch"

    def __init__(self, block_rows: int = DEFAULT_BLOCK_ROWS) -> None:
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        self.block_rows = block_rows

    def gather_mm(self, x: torch.Tensor, sel: ExpertSelection, w: torch.Tensor) -> torch.Tensor:
        """out[r] = x[token(r)] @ w[expert(r)]; x [N, d_in] -> [R, d_out]."""
        out = x.new_empty(sel.n_rows, w.shape[-1])
        rows, w_e = _RowReader(x, sel, True, self.block_rows), w.unbind(0)
        for c in _chunks(sel, self.block_rows):
            for (e, a), o in zip(c.split(rows(c.lo, c.hi)), out[c.lo : c.hi].split(c.sizes)):
                torch.mm(a, w_e[e], out=o)
        return out

    def mm_scatter(
        self, h: torch.Tensor, sel: ExpertSelection, w: torch.Tensor, gates: torch.Tensor | None
    ) -> torch.Tensor:
        """out[token(r)] += gates[r] · h[r] @ w[expert(r)]; h [R, d_in] -> [N, d_out]."""
        a_rows, w_e = _ScaledRows(h, gates, self.block_rows), w.unbind(0)
        if sel.token_ids is None:  # rows are the output rows: write in place, nothing to scatter
            out = h.new_empty(sel.n_rows, w.shape[2])
            for c in _chunks(sel, self.block_rows):
                for (e, a), o in zip(c.split(a_rows(c.lo, c.hi)), out[c.lo : c.hi].split(c.sizes)):
                    torch.mm(a, w_e[e], out=o)
            return out
        out = h.new_zeros(sel.n_tokens, w.shape[2])
        y_buf = h.new_empty(min(self.block_rows, sel.n_rows), w.shape[2])
        for c in _chunks(sel, self.block_rows):
            y = y_buf[: c.hi - c.lo]
            for (e, a), o in zip(c.split(a_rows(c.lo, c.hi)), y.split(c.sizes)):
                torch.mm(a, w_e[e], out=o)
            out.index_add_(0, sel.token_ids[c.lo : c.hi], y)
        return out

    def weight_grad(
        self, a: torch.Tensor, b: torch.Tensor, sel: ExpertSelection, *, a_is_tokens: bool, b_is_tokens: bool
    ) -> torch.Tensor:
        """grad[e] = Σ_{rows r of e} A[r]ᵀ B[r], where A, B are a, b read per row ([E, d_a, d_b])."""
        grad = _WeightGrad(sel.n_experts, a.shape[1], b.shape[1], a)
        a_rows = _RowReader(a, sel, a_is_tokens, self.block_rows)
        b_rows = _RowReader(b, sel, b_is_tokens, self.block_rows)
        for c in _chunks(sel, self.block_rows):
            for (e, a), b in zip(c.split(a_rows(c.lo, c.hi)), b_rows(c.lo, c.hi).split(c.sizes)):
                grad.add(e, a, b)
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
        grad_gates[r] = <t[r], h[r]>, grad_w[e] = Σ_{r of e} (gates[r]·h[r])ᵀ G[r]. Each G chunk is
        gathered once (into chunk scratch) and used by both matmuls.
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
        for c in _chunks(sel, self.block_rows):
            lo, hi = c.lo, c.hi
            g = g_rows(lo, hi)
            g_e = g.split(c.sizes)
            if need_h or need_gates:  # t = G @ w[e]ᵀ, written where grad_h goes, scaled once read
                t = grad_h[lo:hi] if need_h else t_buf[: hi - lo]
                for (e, t_e), g_part in zip(c.split(t), g_e):
                    torch.mm(g_part, w_t[e], out=t_e)
                if need_gates:  # row-wise <t, h> as a batch of [1, d]·[d, 1] products, no temporary
                    torch.bmm(t.unsqueeze(1), h[lo:hi].unsqueeze(2), out=grad_gates[lo:hi].view(-1, 1, 1))
                if need_h and gates_2d is not None:
                    t.mul_(gates_2d[lo:hi])
            if need_w:
                for (e, a), g_part in zip(c.split(a_rows(lo, hi)), g_e):
                    grad_w.add(e, a, g_part)
        return grad_h, None if grad_w is None else grad_w.result(), grad_gates


class _WeightGrad:
    """[E, d_a, d_b] weight gradient summed over chunks. An expert's first segment writes (no zero-fill
    pass), later ones add; experts without rows get zeros. fp16/bf16 accumulate in fp32."""

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
        empty = [e for e, written in enumerate(self.written) if not written]
        if empty:  # one op for all experts without rows
            self.grad.index_fill_(0, torch.tensor(empty, device=self.grad.device), 0)
        return self.grad.to(self.dtype)
