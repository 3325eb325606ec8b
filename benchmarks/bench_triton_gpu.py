"""σ-MoE on the Triton CVMM kernels vs dense cuBLAS MLPs and torch's grouped GEMM: fwd+bwd time, TFLOP/s.

For each d_model and expert count (G = 128 per expert, K = 4, 32768 tokens, bf16) it times:
- ``experts``: the σ-MoE expert MLP alone, ``SigmaMoE.run_experts`` (cvmm → ReLU → cvmm_combine) on a
  fixed routing: the kernels' efficiency;
- ``layer``: the whole ``SigmaMoE`` layer (selector, top-K, sort, regulariser, experts);
- ``grouped-mm``: the same expert MLP on the same routing through ``torch._grouped_mm`` (where this
  torch has it): gather the rows, grouped GEMM, ReLU, grouped GEMM, gate, sum each token's K rows;
- ``dense-active``: the dense MLP with d_ff = K·G (the same active FLOPs; cuBLAS);
- ``dense-params``: the parameter-equal dense MLP (``parameter_equal_dense_d_ff``).
TFLOP/s count the active expert FLOPs (or the dense MLP's), forward + backward = 3 × 2 × 2·d·d_ff per
token. Targets: experts ≥ 70% of dense-active's TFLOP/s; time at 128 experts within 10% of 16.
A table per d_model sets experts and layer beside dense-active and grouped-mm at every expert count.

    python benchmarks/bench_triton_gpu.py                 # needs a CUDA GPU
    python benchmarks/bench_triton_gpu.py --d-model 1024 --n-experts 16 32 64 128 --json moe.json
    python benchmarks/bench_triton_gpu.py --smoke         # tiny sizes; on CPU under TRITON_INTERPRET=1
    python benchmarks/bench_triton_gpu.py --smoke --backend torch   # tiny sizes, the torch CVMM backend
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from sigma_moe.kernels import ExpertSelection, prepare_selection
from sigma_moe.layers import DenseConfig, SigmaMoEConfig, build_feedforward, parameter_equal_dense_d_ff


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--n-experts", type=int, nargs="+", default=[16, 128])
    p.add_argument("--expert-size", type=int, default=128)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs (the first one autotunes)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument(
        "--backend",
        choices=["triton", "torch"],
        default="triton",
        help="CVMM backend of the σ-MoE rows (torch: the smoke check without the Triton interpreter)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 rep: checks the script runs (CPU ok)")
    args = p.parse_args()
    if args.smoke:
        args.d_model, args.n_experts, args.expert_size, args.k, args.tokens = [32], [4, 8], 16, 2, 64
        args.warmup, args.reps = 1, 1
        if not torch.cuda.is_available():
            args.dtype = "float32"  # the interpreter emulates bf16 slowly
    elif not torch.cuda.is_available():
        sys.exit("bench_triton_gpu.py needs a CUDA GPU (run with --smoke to check it on the CPU)")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median seconds of ``fn()`` after the warm-up runs (which include Triton's autotuning)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure(args, name: str, fn, flops: float) -> dict:
    if args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = _time(fn, args.device, args.warmup, args.reps)
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.type == "cuda" else None
    return {"name": name, "ms": seconds * 1e3, "tflops": flops / seconds / 1e12, "peak_mib": peak}


def _fwd_bwd(module, x, grad):
    params = [p for p in module.parameters() if p.requires_grad]
    return lambda: torch.autograd.grad(module(x), [x, *params], grad)


def grouped_mm_op():
    """``torch._grouped_mm`` (``F.grouped_mm`` where only that exists), or None: not in this torch."""
    return getattr(torch, "_grouped_mm", None) or getattr(F, "grouped_mm", None)


def grouped_mm_experts(
    x: torch.Tensor, sel: ExpertSelection, w1: torch.Tensor, w2: torch.Tensor, row_gates: torch.Tensor
) -> torch.Tensor:
    """``run_experts`` through torch's grouped GEMM: rows gathered in expert order, ReLU(x W1[e]) W2[e]
    for each expert's rows, gated, then each token's K rows summed (scattered to their (token, slot)
    place first, as the Triton backend does, instead of atomics)."""
    gmm = grouped_mm_op()
    offs = sel.offsets[1:].to(torch.int32)  # end of each expert's rows
    h = F.relu(gmm(x.index_select(0, sel.token_ids), w1, offs=offs))
    y = gmm(h, w2, offs=offs) * row_gates[:, None]
    slots = y.new_zeros(sel.n_tokens * sel.k, y.shape[1]).index_copy(0, sel.order, y)
    return slots.view(sel.n_tokens, sel.k, -1).sum(1)


def run_size(args, d: int, n_experts: int) -> dict[str, dict]:
    """experts, layer, grouped-mm (if present), dense-active, dense-params rows for one (d_model, n_experts)."""
    torch.manual_seed(0)
    n, g, k, dev, dtype = args.tokens, args.expert_size, args.k, args.device, args.torch_dtype
    x = torch.randn(n, d, device=dev, dtype=dtype, requires_grad=True)
    grad = torch.randn(n, d, device=dev, dtype=dtype)
    active_flops = 3 * 2 * 2 * n * d * k * g
    moe_cfg = SigmaMoEConfig(n_experts=n_experts, expert_size=g, k=k, backend=args.backend)
    moe = build_feedforward(moe_cfg, d_model=d, n_layers=1).to(dev, dtype)

    with torch.no_grad():
        r = moe.route(x)
    sel = prepare_selection(r.expert_idx, n_experts)
    row_gates = sel.sort_rows(r.gates.to(dtype)).requires_grad_()
    expert_inputs = [x, moe.w1, moe.w2, row_gates]

    def experts():
        return torch.autograd.grad(moe.run_experts(x, sel, row_gates), expert_inputs, grad)

    rows = {
        "experts": _measure(args, f"sigma-moe experts E={n_experts}", experts, active_flops),
        "layer": _measure(args, f"sigma-moe layer E={n_experts}", _fwd_bwd(moe, x, grad), active_flops),
    }
    if grouped_mm_op() is not None:
        with torch.no_grad():  # the baseline must compute what run_experts computes
            ours, theirs = (
                moe.run_experts(x, sel, row_gates).float(),
                grouped_mm_experts(x, sel, moe.w1, moe.w2, row_gates).float(),
            )
            err = float((ours - theirs).abs().max() / ours.abs().max().clamp_min(1e-30))
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        if err > tol:
            args.mismatches.append(
                f"d={d} E={n_experts}: grouped_mm output differs from run_experts by "
                f"{err:.2e} of its largest value (tolerance {tol:g})"
            )

        def grouped():
            return torch.autograd.grad(grouped_mm_experts(x, sel, moe.w1, moe.w2, row_gates), expert_inputs, grad)

        rows["grouped-mm"] = {
            **_measure(args, f"torch grouped_mm E={n_experts}", grouped, active_flops),
            "max_rel_err_vs_experts": err,
        }
    moe = None  # free the layer before the dense rows (the closures above hold it through their cell)
    for label, d_ff in (("dense-active", k * g), ("dense-params", parameter_equal_dense_d_ff(moe_cfg, d))):
        dense = build_feedforward(DenseConfig(d_ff=d_ff), d_model=d, n_layers=1).to(dev, dtype)
        rows[label] = _measure(args, f"{label} d_ff={d_ff}", _fwd_bwd(dense, x, grad), 3 * 2 * 2 * n * d * d_ff)
    return rows


def _summarise(d: int, by_e: dict[int, dict[str, dict]]) -> list[dict]:
    summary = []
    print(f"\n# d_model {d}: TFLOP/s on active FLOPs, forward + backward")
    print(
        "| N_E | σ-MoE experts | σ-MoE layer | dense d_ff=K·G (cuBLAS on GPU) | torch grouped_mm "
        "| experts ÷ dense | experts ÷ grouped_mm |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for e, rows in by_e.items():
        experts, layer, active, params = rows["experts"], rows["layer"], rows["dense-active"], rows["dense-params"]
        grouped = rows.get("grouped-mm")
        s = {
            "d_model": d,
            "n_experts": e,
            "experts_tflops": experts["tflops"],
            "layer_tflops": layer["tflops"],
            "dense_active_tflops": active["tflops"],
            "grouped_mm_tflops": grouped["tflops"] if grouped else None,
            "experts_vs_dense_active_tflops": experts["tflops"] / active["tflops"],
            "layer_vs_dense_active_tflops": layer["tflops"] / active["tflops"],
            "experts_vs_grouped_mm_tflops": experts["tflops"] / grouped["tflops"] if grouped else None,
            "dense_params_over_layer_time": params["ms"] / layer["ms"],
        }
        summary.append(s)
        gm = f"{grouped['tflops']:.1f}" if grouped else "absent"
        vs_gm = f"{s['experts_vs_grouped_mm_tflops']:.2f}" if grouped else "–"
        print(
            f"| {e} | {experts['tflops']:.1f} | {layer['tflops']:.1f} | {active['tflops']:.1f} | {gm} "
            f"| {s['experts_vs_dense_active_tflops']:.2f} | {vs_gm} |"
        )
    for s in summary:
        print(
            f"d={d:5d} E={s['n_experts']:4d}: experts at {s['experts_vs_dense_active_tflops']:.0%} of dense-active "
            f"TFLOP/s (target >= 70%), layer at {s['layer_vs_dense_active_tflops']:.0%}; parameter-equal dense "
            f"takes {s['dense_params_over_layer_time']:.2f}x the layer's time"
        )
    lo, hi = min(by_e), max(by_e)
    if lo != hi:
        spread = by_e[hi]["experts"]["ms"] / by_e[lo]["experts"]["ms"]
        summary.append({"d_model": d, "n_experts": [lo, hi], "experts_time_ratio": spread})
        print(f"d={d:5d}: experts time E={hi} / E={lo} = {spread:.2f} (target: within 10%)")
    return summary


def main() -> None:
    args = _args()
    if args.smoke and not torch.cuda.is_available() and args.backend == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the Triton kernels are first imported
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.torch_dtype = getattr(torch, args.dtype)
    name = (
        torch.cuda.get_device_name()
        if args.device.type == "cuda"
        else "cpu (TRITON_INTERPRET)"
        if args.backend == "triton"
        else "cpu"
    )
    print(
        f"# {name}, {args.dtype}, {args.tokens} tokens, G={args.expert_size}, K={args.k}, {args.backend} CVMM, "
        f"forward+backward, median of {args.reps}; torch {torch.__version__}, grouped_mm "
        f"{'present' if grouped_mm_op() is not None else 'absent'}"
    )
    results, summary = [], []
    args.mismatches = []
    for d in args.d_model:
        by_e = {}
        for e in args.n_experts:
            by_e[e] = run_size(args, d, e)
            for kind, row in by_e[e].items():
                results.append({**row, "kind": kind, "d_model": d, "n_experts": e})
                peak = "" if row["peak_mib"] is None else f"{row['peak_mib']:9.0f} MiB peak"
                print(f"d={d:5d} {row['name']:32s} {row['ms']:9.3f} ms {row['tflops']:8.2f} TFLOP/s {peak}", flush=True)
        summary += _summarise(d, by_e)
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k not in ("device", "torch_dtype", "mismatches")}
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": name,
                    "torch": torch.__version__,
                    "args": meta,
                    "results": results,
                    "summary": summary,
                    "mismatches": args.mismatches,
                },
                f,
                indent=1,
            )
    for m in args.mismatches:
        print(f"MISMATCH {m}", file=sys.stderr)
    if args.mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
