"""Triton CVMM backend: launchers for ``triton_kernels``, registered as ``torch.library`` custom ops.

Shapes: N tokens, K slots, R = N·K sorted rows, E experts, w [E, d_in, d_out] (any strides).
- ``sigma_moe::cvmm_gather_mm(x [N|R, d_in], w, token_ids?, counts, offsets) -> [R, d_out]``
- ``sigma_moe::cvmm_mm_scatter(h [R, d_in], w, gates?, order?, counts, offsets, n_tokens, k) -> [N, d_out]``
- ``sigma_moe::cvmm_weight_grad(a, b, a_idx?, b_idx?, counts, offsets, chunk_rows) -> [E, d_a, d_b]``

Design choices (see also the kernel file's docstring):
- mm_scatter writes each row's gated product ``gate[r] · h[r] @ w[e]`` (rounded to h's dtype) to slot
  ``order[r] = token·K + slot`` of an [N·K, d_out] buffer, then sums ``[N, K, d_out]`` over K with
  ``torch.sum`` (float32 accumulation). Deterministic; costs one extra write+read of [R, d_out]
  versus fp32 atomics, which would need an fp32 output and give run-to-run differences.
- weight_grad splits each expert's rows into chunks (sized to fill the GPU), accumulates each chunk's
  ``AᵀB`` in float32 registers and atomically adds it to a float32 [E, d_a, d_b] buffer, cast to the
  result dtype at the end. Atomics make the bits depend on the order the chunks finish, so under
  ``torch.use_deterministic_algorithms(True)`` every expert is one chunk: a single addend onto zero.
- Transposed weights (the backward's ``w.transpose(1, 2)``) are read in place through strides; no
  operand is copied. Only the small 1-D index tensors and gates are made contiguous.
- No host-device synchronisation and no preparation kernels: each program finds its expert block from
  ``counts`` itself (``triton_kernels.locate_block``); the grid is sized for the worst case.
- On CPU tensors the kernels run only under ``TRITON_INTERPRET=1`` (set before triton is imported).
"""

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import triton
import triton.language as tl

from .primitives import CVMMBackend
from .selection import ExpertSelection
from .triton_kernels import INTERPRET, cvmm_rows_kernel, cvmm_weight_grad_kernel

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _check_operands(what: str, operands: tuple, others: tuple = ()) -> None:
    """Operands: supported float dtypes on a device Triton can run on; indices etc.: same device."""
    for t in operands:
        if t.dtype not in _TL_DTYPES:
            raise TypeError(
                f"Triton CVMM ({what}) supports float32, bfloat16 and float16 operands, got {t.dtype}; "
                "cast the inputs or use backend='torch'"
            )
    device = operands[0].device
    if INTERPRET and (problem := interpreter_problem()):
        raise RuntimeError(f"Triton CVMM ({what}): {problem}")
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"Triton CVMM ({what}) got a tensor on {device}: Triton kernels need a CUDA device. "
            "Use backend='torch' (or 'auto') on the CPU, or set TRITON_INTERPRET=1 before triton is "
            "imported to run the kernels in Triton's (slow) interpreter."
        )
    wrong = [t.device for t in (*operands, *others) if t is not None and t.device != device]
    if wrong:
        raise ValueError(f"Triton CVMM ({what}): all tensors must be on {device}, got some on {wrong[0]}")


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def interpreter_problem(triton_version: str = triton.__version__, numpy_version: str = np.__version__) -> str | None:
    """Triton 3.6's interpreter turns one-element arrays into ints (a loop bound, an index), which numpy
    2.4 refuses ("only 0-dimensional arrays can be converted"); fixed in triton 3.7. None: no problem."""
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (
            f"the interpreter of triton {triton_version} fails with numpy {numpy_version} (fixed in triton 3.7): "
            "pip install 'numpy<2.4' (compiled GPU kernels are not affected)"
        )
    return None


def _dot_args(a: torch.dtype, b: torch.dtype) -> dict:
    """In-register operand dtype and fp32 dot precision for two operand dtypes."""
    dtype = torch.promote_types(a, b)
    # the interpreter's tl.dot multiplies bf16 bit patterns (triton-lang/triton#11584): use fp32 there
    dot_dtype = tl.float32 if INTERPRET and dtype == torch.bfloat16 else _TL_DTYPES[dtype]
    tf32 = dtype != torch.float32 or torch.get_float32_matmul_precision() != "highest"
    return {"DOT_DTYPE": dot_dtype, "INPUT_PRECISION": "tf32" if tf32 else "ieee"}


def worst_case_blocks(n_rows: int, n_experts: int, block_rows: int) -> int:
    """Upper bound on Σ_e ceil(count_e / block_rows) over any split of n_rows rows among the experts."""
    return (n_rows + n_experts * (block_rows - 1)) // block_rows


def wgrad_chunk_rows(n_rows: int, d_a: int, d_b: int, n_sm: int, deterministic: bool) -> int:
    """Rows per weight-grad chunk: about 4 programs per SM over 128×128 output tiles, at least 256
    rows so the atomics stay few; one chunk per expert (a single atomic addend) when deterministic."""
    if deterministic:
        return max(n_rows, 1)
    tiles = triton.cdiv(d_a, 128) * triton.cdiv(d_b, 128)
    chunks = max(1, 4 * n_sm // tiles)
    return max(256, triton.cdiv(triton.cdiv(n_rows, chunks), 128) * 128)


def _n_sm(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make that the operands' device."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _idx(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _launch_rows(x, w, out, gates, src_idx, dst_idx, counts, offsets) -> None:
    """out[dst(r)] = gate[r] · x[src(r)] @ w[e(r)] for all sorted rows r."""
    n_experts, d_in, d_out = w.shape
    n_rows = src_idx.numel() if src_idx is not None else x.shape[0]
    if n_rows == 0 or d_out == 0:
        return

    def grid(meta):
        n_blocks = worst_case_blocks(n_rows, n_experts, meta["BLOCK_M"])
        return (n_blocks * triton.cdiv(d_out, meta["BLOCK_N"]),)

    with _on_device(x):
        cvmm_rows_kernel[grid](
            x,
            w,
            out,
            _idx(gates),
            _idx(src_idx),
            _idx(dst_idx),
            counts.contiguous(),
            offsets.contiguous(),
            n_rows,
            n_experts,
            d_in,
            d_out,
            x.stride(0),
            x.stride(1),
            w.stride(0),
            w.stride(1),
            w.stride(2),
            out.stride(0),
            out.stride(1),
            GATHER=src_idx is not None,
            SCATTER=dst_idx is not None,
            HAS_GATES=gates is not None,
            E_POW2=triton.next_power_of_2(n_experts),
            **_dot_args(x.dtype, w.dtype),
        )


def gather_mm_impl(
    x: torch.Tensor, w: torch.Tensor, token_ids: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    _check_operands("gather_mm", (x, w), (token_ids, counts, offsets))
    out = x.new_empty(token_ids.numel(), w.shape[2])
    _launch_rows(x, w, out, None, token_ids, None, counts, offsets)
    return out


cvmm_gather_mm = torch.library.custom_op("sigma_moe::cvmm_gather_mm", gather_mm_impl, mutates_args=())


@cvmm_gather_mm.register_fake
def _(x, w, token_ids, counts, offsets):
    return x.new_empty(token_ids.shape[0], w.shape[2])


def mm_scatter_impl(
    h: torch.Tensor,
    w: torch.Tensor,
    gates: torch.Tensor | None,
    order: torch.Tensor,
    counts: torch.Tensor,
    offsets: torch.Tensor,
    n_tokens: int,
    k: int,
) -> torch.Tensor:
    _check_operands("mm_scatter", (h, w), (gates, order, counts, offsets))
    if h.shape[0] > n_tokens * k:
        raise ValueError(f"mm_scatter needs at most n_tokens·k = {n_tokens}·{k} rows, got {h.shape[0]}")
    # slot order[r] = token·K + slot of row r: reducing [N, K, d] over K is the per-token sum; with
    # fewer rows than slots (empty slots) the slots no row writes must read as zeros
    full = h.shape[0] == n_tokens * k
    buf = (h.new_empty if full else h.new_zeros)(n_tokens * k, w.shape[2])
    _launch_rows(h, w, buf, gates, None, order, counts, offsets)
    return buf.view(n_tokens, w.shape[2]) if k == 1 else buf.view(n_tokens, k, w.shape[2]).sum(1)


cvmm_mm_scatter = torch.library.custom_op("sigma_moe::cvmm_mm_scatter", mm_scatter_impl, mutates_args=())


@cvmm_mm_scatter.register_fake
def _(h, w, gates, order, counts, offsets, n_tokens, k):
    return h.new_empty(n_tokens, w.shape[2])


def weight_grad_impl(
    a: torch.Tensor,
    b: torch.Tensor,
    a_idx: torch.Tensor | None,
    b_idx: torch.Tensor | None,
    counts: torch.Tensor,
    offsets: torch.Tensor,
    chunk_rows: int,
) -> torch.Tensor:
    """grad[e] = Σ_{rows r of e} a[a_idx(r)]ᵀ b[b_idx(r)]; chunk_rows = 0 picks the chunk size."""
    _check_operands("weight_grad", (a, b), (a_idx, b_idx, counts, offsets))
    n_experts, d_a, d_b = counts.numel(), a.shape[1], b.shape[1]
    n_rows = a_idx.numel() if a_idx is not None else a.shape[0]  # an ungathered operand is per row
    grad = torch.zeros(n_experts, d_a, d_b, dtype=torch.float32, device=a.device)
    if n_rows and d_a and d_b:
        if chunk_rows <= 0:
            chunk_rows = wgrad_chunk_rows(
                n_rows, d_a, d_b, _n_sm(a.device), torch.are_deterministic_algorithms_enabled()
            )
        n_chunks = worst_case_blocks(n_rows, n_experts, chunk_rows)

        def grid(meta):
            return (n_chunks, triton.cdiv(d_a, meta["BLOCK_A"]) * triton.cdiv(d_b, meta["BLOCK_B"]))

        with _on_device(a):
            cvmm_weight_grad_kernel[grid](
                a,
                b,
                grad,
                _idx(a_idx),
                _idx(b_idx),
                counts.contiguous(),
                offsets.contiguous(),
                chunk_rows,
                n_experts,
                d_a,
                d_b,
                a.stride(0),
                a.stride(1),
                b.stride(0),
                b.stride(1),
                grad.stride(0),
                grad.stride(1),
                grad.stride(2),
                GATHER_A=a_idx is not None,
                GATHER_B=b_idx is not None,
                E_POW2=triton.next_power_of_2(n_experts),
                **_dot_args(a.dtype, b.dtype),
            )
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    return grad if out_dtype == torch.float32 else grad.to(out_dtype)


cvmm_weight_grad = torch.library.custom_op("sigma_moe::cvmm_weight_grad", weight_grad_impl, mutates_args=())


@cvmm_weight_grad.register_fake
def _(a, b, a_idx, b_idx, counts, offsets, chunk_rows):
    return a.new_empty(counts.shape[0], a.shape[1], b.shape[1], dtype=torch.promote_types(a.dtype, b.dtype))


@dataclass(frozen=True)
class TritonBackend(CVMMBackend):
    """The three CVMM primitives (``primitives.CVMMBackend``) on the Triton kernels.

    ``wgrad_chunk_rows``: rows per weight-grad chunk; 0 = sized to the GPU (tests set it small)."""

    name: ClassVar[str] = "triton"
    wgrad_chunk_rows: int = 0

    def gather_mm(self, x: torch.Tensor, sel: ExpertSelection, w: torch.Tensor) -> torch.Tensor:
        return cvmm_gather_mm(x, w, sel.token_ids, sel.counts, sel.offsets)

    def mm_scatter(
        self, h: torch.Tensor, sel: ExpertSelection, w: torch.Tensor, gates: torch.Tensor | None
    ) -> torch.Tensor:
        return cvmm_mm_scatter(h, w, gates, sel.order, sel.counts, sel.offsets, sel.n_tokens, sel.k)

    def weight_grad(
        self, a: torch.Tensor, b: torch.Tensor, sel: ExpertSelection, *, a_is_tokens: bool, b_is_tokens: bool
    ) -> torch.Tensor:
        a_idx = sel.token_ids if a_is_tokens else None
        b_idx = sel.token_ids if b_is_tokens else None
        return cvmm_weight_grad(a, b, a_idx, b_idx, sel.counts, sel.offsets, self.wgrad_chunk_rows)
