"""Fast PyTorch CVMM path (CPU, and any device without Triton).

Shapes: N tokens, R sorted rows, E experts; ``w`` is [E, d_in, d_out]. The sorted rows are walked in
chunks of <= ``block_rows`` consecutive rows: several small experts, or a block of a large one.

What costs on a CPU besides the matmul FLOPs (measured at R = 32768, d_model 512, fp32, 2 threads):
- Fresh memory. A new [R, d_model] tensor (64 MB; glibc maps anything over 32 MB fresh from the OS)
  costs ~15 ms of page faults: a gather into it takes ~18 ms, into a reused buffer ~3 ms. So nothing
  here materialises an [R, d_model] tensor: each chunk's rows are gathered into one scratch buffer
  (``index_select(out=)``), and the combine scatters each chunk's product straight into the [N, d_out]
  output (``index_add_``).
- Per-op overhead: every op costs ~20-100 µs of dispatch and OpenMP wake-up on top of its work, more
  when the machine is busy. Per *expert* only the matmuls run (one ``torch.mm`` per expert segment);
  the gathers, gate scaling, row-wise gate gradient and scatter run once per chunk of small experts,
  so their count does not grow with E (measured: no change at E <= 128, 3-8 % less step time at 256).
- The gates go on the d_in side of the combine ((g·h) @ w == g·(h @ w)), the narrower one in σ-MoE's
  second matmul, scaled per chunk into scratch; the combine's backward gathers grad_out once for
  grad_h, grad_w and grad_gates (``mm_scatter_backward``).
``F.grouped_mm`` would need the gathered [R, d] copies and is no faster than the per-expert ``torch.mm``
on them; a batched ``torch.bmm`` needs equal row counts, and padding experts to the largest cost more
than it saved (benchmarks/README.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import torch_ops
from .primitives import CVMMBackend
from .selection import ExpertSelection

# Rows per block of a large expert: few mm calls (see above); a [4096, 512] fp32 scratch buffer is 8 MB.
DEFAULT_BLOCK_ROWS = 4096
# Rows of small experts packed into one chunk: their gathers, scaling and scatter run once per pack.
# Larger packs touch more of the scratch buffers (resident memory) for no measurable speed.
DEFAULT_PACK_ROWS = 1024

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class _Chunk:
    """Sorted rows lo:hi, and the segments (expert, a, b) of experts' rows inside them, with a and b
    relative to lo."""

    lo: int
    hi: int
    segments: list[tuple[int, int, int]]


def _chunks(sel: ExpertSelection, block_rows: int, pack_rows: int) -> Iterator[_Chunk]:
    """Consecutive chunks of sorted rows, each with the expert segments it holds: experts of up to
    pack_rows rows packed together while their total fits in pack_rows, and every larger expert alone,
    in blocks of block_rows. An expert's rows are thus cut exactly as in a per-expert loop over blocks
    of block_rows, and every matmul sees the same rows as there (the same results, bit for bit).
    NOTE: host-device sync on offsets (free on CPU; this backend's loop needs the bounds on the host)."""
    offsets = sel.offsets.tolist()
    lo, segments = 0, []
    for e in range(sel.n_experts):
        start, end = offsets[e], offsets[e + 1]
        if start == end:
            continue
        if segments and (end - lo > pack_rows or end - start > pack_rows):  # e does not join the pack
            yield _Chunk(lo, start, segments)
            lo, segments = start, []
        if end - start > pack_rows:  # alone, in blocks
            for a in range(start, end, block_rows):
                b = min(a + block_rows, end)
                yield _Chunk(a, b, [(e, 0, b - a)])
            lo = end
        else:
            segments.append((e, start - lo, end - lo))
    if segments:
        yield _Chunk(lo, sel.n_rows, segments)


class _RowReader:
    """Reads sorted rows lo:hi of a tensor that is either already in row order or indexed per token
    (gathered into one reused scratch buffer, so the [R, d] gather is never materialised)."""

    def __init__(self, t: torch.Tensor, sel: ExpertSelection, is_tokens: bool, block_rows: int) -> None:
        self.t = t
        self.token_ids = sel.token_ids if is_tokens else None
        if self.token_ids is not None:
            self.buf = t.new_empty(min(block_rows, sel.n_rows), t.shape[1])

    def __call__(self, c: _Chunk) -> torch.Tensor:
        if self.token_ids is None:
            return self.t[c.lo : c.hi]
        return torch.index_select(self.t, 0, self.token_ids[c.lo : c.hi], out=self.buf[: c.hi - c.lo])


class _ScaledRows:
    """Rows lo:hi of ``gates[:, None] · h``, scaled chunk by chunk into one reused scratch buffer.
    (g·h) @ w == g·(h @ w): the gates go on the d_in side, the narrower one in σ-MoE's second matmul."""

    def __init__(self, h: torch.Tensor, gates: torch.Tensor | None, block_rows: int) -> None:
        self.h, self.gates = h, None if gates is None else gates.unsqueeze(1)
        if gates is not None:
            self.buf = h.new_empty(min(block_rows, h.shape[0]), h.shape[1])

    def __call__(self, c: _Chunk) -> torch.Tensor:
        if self.gates is None:
            return self.h[c.lo : c.hi]
        return torch.mul(self.h[c.lo : c.hi], self.gates[c.lo : c.hi], out=self.buf[: c.hi - c.lo])


class TorchBackend(CVMMBackend):
    """The three CVMM primitives (``primitives.CVMMBackend``), plus a fused ``mm_scatter_backward``,
    as chunked per-expert ``torch.mm`` calls. Any dtype and device; fp16/bf16 weight gradients
    accumulate across chunks in fp32."""

    name = "torch"

    def __init__(self, block_rows: int = DEFAULT_BLOCK_ROWS, pack_rows: int = DEFAULT_PACK_ROWS) -> None:
        if block_rows < 1 or pack_rows < 1:
            raise ValueError(f"block_rows and pack_rows must be >= 1, got {block_rows} and {pack_rows}")
        self.block_rows, self.pack_rows = block_rows, min(pack_rows, block_rows)

    def gather_mm(self, x: torch.Tensor, sel: ExpertSelection, w: torch.Tensor) -> torch.Tensor:
        """out[r] = x[token(r)] @ w[expert(r)]; x [N, d_in] -> [R, d_out]."""
        if torch.compiler.is_compiling():  # one opaque op in the graph (torch_ops.py)
            return torch_ops.gather_mm(x, w, *self._op_args(sel))
        out = x.new_empty(sel.n_rows, w.shape[-1])
        rows = _RowReader(x, sel, True, self.block_rows)
        for c in _chunks(sel, self.block_rows, self.pack_rows):
            x_c, out_c = rows(c), out[c.lo : c.hi]
            for e, a, b in c.segments:
                torch.mm(x_c[a:b], w[e], out=out_c[a:b])
        return out

    def mm_scatter(
        self, h: torch.Tensor, sel: ExpertSelection, w: torch.Tensor, gates: torch.Tensor | None
    ) -> torch.Tensor:
        """out[token(r)] += gates[r] · h[r] @ w[expert(r)]; h [R, d_in] -> [N, d_out]."""
        if torch.compiler.is_compiling():
            return torch_ops.mm_scatter(h, w, gates, *self._op_args(sel))
        a_rows = _ScaledRows(h, gates, self.block_rows)
        out = h.new_zeros(sel.n_tokens, w.shape[2])
        y_buf = h.new_empty(min(self.block_rows, sel.n_rows), w.shape[2])
        for c in _chunks(sel, self.block_rows, self.pack_rows):
            a_c, y_c = a_rows(c), y_buf[: c.hi - c.lo]
            for e, a, b in c.segments:
                torch.mm(a_c[a:b], w[e], out=y_c[a:b])
            out.index_add_(0, sel.token_ids[c.lo : c.hi], y_c)
        return out

    def weight_grad(
        self, a: torch.Tensor, b: torch.Tensor, sel: ExpertSelection, *, a_is_tokens: bool, b_is_tokens: bool
    ) -> torch.Tensor:
        """grad[e] = Σ_{rows r of e} A[r]ᵀ B[r], where A, B are a, b read per row ([E, d_a, d_b])."""
        if torch.compiler.is_compiling():
            return torch_ops.weight_grad(a, b, *self._op_args(sel), a_is_tokens, b_is_tokens)
        grad = _WeightGrad(sel.n_experts, a.shape[1], b.shape[1], a)
        a_rows = _RowReader(a, sel, a_is_tokens, self.block_rows)
        b_rows = _RowReader(b, sel, b_is_tokens, self.block_rows)
        for c in _chunks(sel, self.block_rows, self.pack_rows):
            a_c, b_c = a_rows(c), b_rows(c)
            for e, lo, hi in c.segments:
                grad.add(e, a_c[lo:hi], b_c[lo:hi])
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
        """All gradients of ``mm_scatter`` in one pass.

        With G[r] = grad_out[token(r)] and t[r] = G[r] @ w[e]ᵀ: grad_h[r] = gates[r]·t[r],
        grad_gates[r] = <t[r], h[r]>, grad_w[e] = Σ_{r of e} (gates[r]·h[r])ᵀ G[r]. Each G chunk is
        gathered once (into chunk scratch) and used by both matmuls.
        """
        if torch.compiler.is_compiling():
            grads = torch_ops.mm_scatter_backward(
                grad_out, h, w, gates, *self._op_args(sel), need_h, need_w, need_gates
            )
            return tuple(g if need else None for g, need in zip(grads, (need_h, need_w, need_gates)))
        d_in = w.shape[1]
        g_rows = _RowReader(grad_out, sel, True, self.block_rows)
        grad_h = h.new_empty(sel.n_rows, d_in) if need_h else None
        grad_gates = h.new_empty(sel.n_rows) if need_gates else None
        grad_w = _WeightGrad(sel.n_experts, d_in, w.shape[2], h) if need_w else None
        a_rows = _ScaledRows(h, gates, self.block_rows) if need_w else None
        t_buf = h.new_empty(min(self.block_rows, sel.n_rows), d_in) if need_gates and not need_h else None
        gates_2d = None if gates is None else gates.unsqueeze(1)
        for c in _chunks(sel, self.block_rows, self.pack_rows):
            g = g_rows(c)
            if need_h or need_gates:  # t = G @ w[e]ᵀ, written where grad_h goes, scaled once read
                t = grad_h[c.lo : c.hi] if need_h else t_buf[: c.hi - c.lo]
                for e, a, b in c.segments:
                    torch.mm(g[a:b], w[e].t(), out=t[a:b])
                if need_gates:  # row-wise <t, h> as a batch of [1, d]·[d, 1] products, no temporary
                    grad_gates_c = grad_gates[c.lo : c.hi].view(-1, 1, 1)
                    torch.bmm(t.unsqueeze(1), h[c.lo : c.hi].unsqueeze(2), out=grad_gates_c)
                if need_h and gates_2d is not None:
                    t.mul_(gates_2d[c.lo : c.hi])
            if need_w:
                a_c = a_rows(c)
                for e, a, b in c.segments:
                    grad_w.add(e, a_c[a:b], g[a:b])
        return grad_h, None if grad_w is None else grad_w.result(), grad_gates

    def _op_args(self, sel: ExpertSelection) -> tuple:
        """The selection and this backend's block sizes, as a ``torch_ops`` custom op takes them."""
        return (*torch_ops.selection_args(sel), self.block_rows, self.pack_rows)


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
        for e, written in enumerate(self.written):
            if not written:
                self.grad[e].zero_()
        return self.grad.to(self.dtype)
