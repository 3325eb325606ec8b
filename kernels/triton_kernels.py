"""Raw Triton kernels for CVMM over expert-sorted rows (launchers live in ``triton_backend.py``).

Shapes: R sorted rows (grouped by expert, ``offsets[e]:offsets[e+1]`` belong to expert e), E experts.
- ``cvmm_rows_kernel``: ``out[dst(r)] = gate[r] · x[src(r)] @ w[e(r)]``; x [*, d_in], w [E, d_in, d_out]
  (any strides: a transposed view of w is read in place), out [*, d_out].
- ``cvmm_weight_grad_kernel``: ``grad[e] += Σ_{r in chunk of e} A[r]ᵀ B[r]``; A [*, d_a], B [*, d_b],
  grad [E, d_a, d_b] float32 (zeroed by the caller, accumulated with atomics).

Tiling: every expert's segment is cut into blocks of BLOCK_M rows (weight grad: chunks of
``chunk_rows`` rows) that never cross an expert boundary; the last block of a segment is ragged and
masked (ScatterMoE's padded block indices). Each program finds its block itself from ``counts``
(``locate_block``: a prefix sum over the E experts, O(E) register work), so a launch needs no index
preparation, no extra kernels and no host sync, and BLOCK_M can be autotuned. The grid is sized for
the worst case, ``(R + E·(BLOCK-1)) // BLOCK`` blocks; programs past the last block return at once.
Accumulators are float32; operands are cast in-register to DOT_DTYPE, which is the operands' own dtype
on a GPU and float32 under TRITON_INTERPRET (the interpreter multiplies bfloat16 bit patterns in
``tl.dot``, triton-lang/triton#11584).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _interpret_env() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older ones read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Read once at import, as triton.jit itself does: the kernels below are interpreted iff this is set.
INTERPRET = _interpret_env()


def _shared_memory_limit(t) -> float:
    if t.device.type != "cuda":
        return float("inf")
    return getattr(torch.cuda.get_device_properties(t.device), "shared_memory_per_block_optin", 232448)


def _clamped(configs, named_args, names_to_dims, tile_elems, elem_bytes, device_tensor):
    """Shrink block sizes to the padded problem dims (min 16, tl.dot's minimum) and drop duplicates,
    so small dims do not tune or compile configs that would only compute padding; drop configs whose
    pipelined operand tiles (num_stages × tile bytes) overflow the GPU's shared memory."""
    seen, kept = set(), []
    for cfg in configs:
        kwargs = dict(cfg.kwargs)
        for name, dim in names_to_dims.items():
            kwargs[name] = min(kwargs[name], max(16, triton.next_power_of_2(int(named_args[dim]))))
        sig = (tuple(sorted(kwargs.items())), cfg.num_warps, cfg.num_stages)
        if sig not in seen:
            seen.add(sig)
            smem = cfg.num_stages * tile_elems(kwargs) * elem_bytes
            kept.append((smem, triton.Config(kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)))
    limit = _shared_memory_limit(device_tensor)
    return [c for smem, c in kept if smem <= limit] or [min(kept, key=lambda sc: sc[0])[1]]


def _prune_rows(configs, named_args, **kwargs):
    x = named_args["x_ptr"]
    return _clamped(
        configs,
        named_args,
        {"BLOCK_N": "d_out", "BLOCK_K": "d_in"},
        lambda b: (b["BLOCK_M"] + b["BLOCK_N"]) * b["BLOCK_K"],
        x.element_size(),
        x,
    )


def _prune_wgrad(configs, named_args, **kwargs):
    a, b = named_args["a_ptr"], named_args["b_ptr"]
    return _clamped(
        configs,
        named_args,
        {"BLOCK_A": "d_a", "BLOCK_B": "d_b"},
        lambda k: (k["BLOCK_A"] + k["BLOCK_B"]) * k["BLOCK_R"],
        max(a.element_size(), b.element_size()),
        a,
    )


def _cfg(num_warps, num_stages, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


if INTERPRET:  # one small config: no benchmarking, few interpreted programs
    _ROWS_CONFIGS = [_cfg(4, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)]
    _WGRAD_CONFIGS = [_cfg(4, 1, BLOCK_A=32, BLOCK_B=32, BLOCK_R=16)]
else:  # Hopper/Ampere-sized tiles
    _ROWS_CONFIGS = [
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
        _cfg(4, 5, BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, GROUP_M=8),
    ]
    _WGRAD_CONFIGS = [
        _cfg(8, 3, BLOCK_A=128, BLOCK_B=128, BLOCK_R=64),
        _cfg(8, 4, BLOCK_A=128, BLOCK_B=128, BLOCK_R=32),
        _cfg(4, 4, BLOCK_A=64, BLOCK_B=128, BLOCK_R=64),
        _cfg(4, 4, BLOCK_A=128, BLOCK_B=64, BLOCK_R=64),
        _cfg(4, 4, BLOCK_A=64, BLOCK_B=64, BLOCK_R=64),
        _cfg(8, 3, BLOCK_A=256, BLOCK_B=128, BLOCK_R=32),
    ]


@triton.jit
def locate_block(counts_ptr, offsets_ptr, block_id, block_rows, n_experts, E_POW2: tl.constexpr):
    """(expert, first row, end of the expert's rows) of block ``block_id`` when every expert's segment
    is cut into blocks of ``block_rows``; expert >= n_experts past the last block."""
    e_idx = tl.arange(0, E_POW2)
    counts = tl.load(counts_ptr + e_idx, mask=e_idx < n_experts, other=0)
    n_blocks = (counts + block_rows - 1) // block_rows
    ends = tl.cumsum(n_blocks, 0)  # blocks of experts 0..e
    expert = tl.sum((ends <= block_id).to(tl.int32), 0)
    first_block = tl.sum(tl.where(e_idx == expert, ends - n_blocks, 0), 0)
    e_safe = min(expert, n_experts - 1)
    start = tl.load(offsets_ptr + e_safe) + (block_id - first_block) * block_rows
    end = tl.load(offsets_ptr + e_safe + 1)
    return expert, start, end


@triton.autotune(
    configs=_ROWS_CONFIGS,
    # strides are in the key so w and its transposed view (same dims) are tuned apart
    key=["d_in", "d_out", "stride_wk", "stride_wn", "GATHER", "SCATTER"],
    prune_configs_by={"early_config_prune": _prune_rows},
)
@triton.jit
def cvmm_rows_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    gates_ptr,
    src_idx_ptr,
    dst_idx_ptr,
    counts_ptr,
    offsets_ptr,
    n_rows,
    n_experts,
    d_in,
    d_out,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wk,
    stride_wn,
    stride_om,
    stride_on,
    GATHER: tl.constexpr,
    SCATTER: tl.constexpr,
    HAS_GATES: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped program order: GROUP_M row blocks sweep all column tiles together, so a row block's
    # inputs and an expert's weight columns stay in L2 while they are reused
    pid = tl.program_id(0)
    n_blocks = (n_rows + n_experts * (BLOCK_M - 1)) // BLOCK_M
    n_tiles_n = tl.cdiv(d_out, BLOCK_N)
    per_group = GROUP_M * n_tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(n_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    expert, start, end = locate_block(counts_ptr, offsets_ptr, pid_m, BLOCK_M, n_experts, E_POW2)
    if expert >= n_experts:  # past the last block: the grid is sized for the worst case
        return
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    if GATHER:
        src = tl.load(src_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < d_out
    ks = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + src[:, None] * stride_xm + ks[None, :] * stride_xk
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        k_mask = ks < d_in - k0
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_GATES:
        gate = tl.load(gates_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * gate[:, None]
    if SCATTER:
        dst = tl.load(dst_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        dst = rows.to(tl.int64)
    out_ptrs = out_ptr + dst[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.autotune(
    configs=_WGRAD_CONFIGS,
    key=["d_a", "d_b", "GATHER_A", "GATHER_B"],
    prune_configs_by={"early_config_prune": _prune_wgrad},
    reset_to_zero=["grad_ptr"],  # benchmarking runs accumulate into grad too
)
@triton.jit
def cvmm_weight_grad_kernel(
    a_ptr,
    b_ptr,
    grad_ptr,
    a_idx_ptr,
    b_idx_ptr,
    counts_ptr,
    offsets_ptr,
    chunk_rows,
    n_experts,
    d_a,
    d_b,
    stride_am,
    stride_ak,
    stride_bm,
    stride_bn,
    stride_ge,
    stride_ga,
    stride_gb,
    GATHER_A: tl.constexpr,
    GATHER_B: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_t = tl.program_id(1)
    expert, start, end = locate_block(counts_ptr, offsets_ptr, pid_c, chunk_rows, n_experts, E_POW2)
    if expert >= n_experts:
        return
    end = min(end, start + chunk_rows)
    n_tiles_b = tl.cdiv(d_b, BLOCK_B)
    ia = (pid_t // n_tiles_b) * BLOCK_A + tl.arange(0, BLOCK_A)
    ib = (pid_t % n_tiles_b) * BLOCK_B + tl.arange(0, BLOCK_B)
    a_mask = ia < d_a
    b_mask = ib < d_b

    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_mask = rows < end
        if GATHER_A:
            ra = tl.load(a_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            ra = rows.to(tl.int64)
        if GATHER_B:
            rb = tl.load(b_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            rb = rows.to(tl.int64)
        # A is read transposed ([BLOCK_A, BLOCK_R]) straight from its row-major storage
        a = tl.load(
            a_ptr + ra[None, :] * stride_am + ia[:, None] * stride_ak,
            mask=a_mask[:, None] & row_mask[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + rb[:, None] * stride_bm + ib[None, :] * stride_bn,
            mask=row_mask[:, None] & b_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)

    g_ptrs = grad_ptr + expert.to(tl.int64) * stride_ge + ia[:, None] * stride_ga + ib[None, :] * stride_gb
    tl.atomic_add(g_ptrs, acc, mask=a_mask[:, None] & b_mask[None, :], sem="relaxed")
