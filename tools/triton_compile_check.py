"""Compile the Triton CVMM kernels for a GPU architecture on any machine, no GPU needed.

Every autotune config × operand dtype × kernel variant (gather / scatter+gates / transposed weights;
weight grad with either operand gathered) is compiled to a cubin the way the launchers specialise it
(16-byte-aligned pointers, unit inner strides, dims divisible by 16), and its shared memory is checked
against the architecture's limit. Exits non-zero on a compile error, or when no config of a variant fits.

    python tools/triton_compile_check.py               # sm_90 (H100/H200), all configs
    python tools/triton_compile_check.py --quick       # first config of each variant, bf16 only
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sigma_moe.kernels import triton_kernels as tk  # noqa: E402

SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes per block (opt-in)
DTYPES = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}


def rows_variants(dt: str):
    """(label, pointer types, constexprs, divisible ints) as cvmm_rows_kernel is launched."""
    for gather, scatter, gates, transposed in ((1, 0, 0, 0), (0, 1, 1, 0), (1, 0, 0, 1), (0, 1, 0, 1)):
        ptrs = {
            "x_ptr": f"*{dt}",
            "w_ptr": f"*{dt}",
            "out_ptr": f"*{dt}",
            "counts_ptr": "*i64",
            "offsets_ptr": "*i64",
            "gates_ptr": f"*{dt}",
            "src_idx_ptr": "*i64",
            "dst_idx_ptr": "*i64",
        }
        consts = {
            "GATHER": bool(gather),
            "SCATTER": bool(scatter),
            "HAS_GATES": bool(gates),
            "DOT_DTYPE": DTYPES[dt],
            "INPUT_PRECISION": "ieee" if dt == "fp32" else "tf32",
            "E_POW2": 128,
            "stride_xk": 1,
            "stride_on": 1,
            ("stride_wk" if transposed else "stride_wn"): 1,
        }
        for used, name in ((gates, "gates_ptr"), (gather, "src_idx_ptr"), (scatter, "dst_idx_ptr")):
            if not used:
                consts[name] = None
        divisible = ("stride_xm", "stride_we", "stride_wk", "stride_wn", "stride_om", "d_in", "d_out")
        yield (
            f"rows {dt} gather={gather} scatter={scatter} gates={gates} w_t={transposed}",
            tk.cvmm_rows_kernel,
            ptrs,
            consts,
            divisible,
        )


def wgrad_variants(dt: str):
    for gather_a in (1, 0):
        ptrs = {
            "a_ptr": f"*{dt}",
            "b_ptr": f"*{dt}",
            "grad_ptr": "*fp32",
            "counts_ptr": "*i64",
            "offsets_ptr": "*i64",
            "a_idx_ptr": "*i64",
            "b_idx_ptr": "*i64",
        }
        consts = {
            "GATHER_A": bool(gather_a),
            "GATHER_B": not gather_a,
            "DOT_DTYPE": DTYPES[dt],
            "INPUT_PRECISION": "ieee" if dt == "fp32" else "tf32",
            "E_POW2": 128,
            "stride_ak": 1,
            "stride_bn": 1,
            "stride_gb": 1,
            ("b_idx_ptr" if gather_a else "a_idx_ptr"): None,
        }
        divisible = ("stride_am", "stride_bm", "stride_ge", "stride_ga", "d_a", "d_b")
        yield (
            f"wgrad {dt} gather_a={gather_a} gather_b={1 - gather_a}",
            tk.cvmm_weight_grad_kernel,
            ptrs,
            consts,
            divisible,
        )


def compile_config(kernel, cfg, ptrs, consts, divisible, target):
    fn = kernel.fn  # the JITFunction under the autotuner
    consts = {**consts, **cfg.kwargs}
    signature = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in fn.arg_names}
    aligned = [n for n in fn.arg_names if signature[n] != "constexpr" and (n in ptrs or n in divisible)]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(
        fn=fn, signature=signature, constexprs={n: consts[n] for n in fn.arg_names if n in consts}, attrs=attrs
    )
    return triton.compile(src, target=target, options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    p.add_argument("--quick", action="store_true", help="bf16 and the first config of each variant only")
    args = p.parse_args()
    if tk.INTERPRET:
        sys.exit("the kernels were decorated for the interpreter: unset TRITON_INTERPRET")
    target = GPUTarget("cuda", args.arch, 32)
    limit = SHARED_LIMIT.get(args.arch, 101376)
    failures = 0
    for dt in ("bf16",) if args.quick else ("bf16", "fp16", "fp32"):
        for label, kernel, ptrs, consts, divisible in [*rows_variants(dt), *wgrad_variants(dt)]:
            configs = tk._ROWS_CONFIGS if kernel is tk.cvmm_rows_kernel else tk._WGRAD_CONFIGS
            fits = 0
            for cfg in configs[:1] if args.quick else configs:
                t0 = time.perf_counter()
                try:
                    shared = compile_config(kernel, cfg, ptrs, consts, divisible, target).metadata.shared
                except Exception as e:  # report every broken config, then fail
                    failures += 1
                    print(f"FAIL {label} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}: {type(e).__name__}: {e}")
                    continue
                fits += shared <= limit
                note = "" if shared <= limit else f"  > {limit}: skipped at launch"
                print(
                    f"ok   {label} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}: "
                    f"shared {shared} B, {time.perf_counter() - t0:.1f} s{note}",
                    flush=True,
                )
            if not fits:
                failures += 1
                print(f"FAIL {label}: no config fits in {limit} B of shared memory")
    print(
        f"all kernels compiled (triton {triton.__version__}, sm_{args.arch})"
        if not failures
        else f"{failures} failure(s)"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
