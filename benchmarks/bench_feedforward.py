"""Forward+backward time and peak memory of every feedforward variant at equal parameter count.

    .venv/bin/python benchmarks/bench_feedforward.py                      # d_model 512, 8192 tokens, fp32
    .venv/bin/python benchmarks/bench_feedforward.py --tokens 512 --d-model 64 --repeats 2   # quick

Variants (σ-MoE geometry N_E × G, K from the flags; the others sized against it):
  dense          d_ff = N_E·G           the parameter-equal dense MLP
  dense_active   d_ff = K·G             same active MLP FLOPs as σ-MoE: the speed limit it aims at
  sigma_moe      N_E × G, top-K         the layer under test (CVMM backend "auto": the torch path on CPU)
  topk_mlp       d_ff = N_E·G, keep K·G hidden units
  switch         N_E/K experts of K·G, top-1 (the paper's parity setting)
  sbase          N_E × G, top-K, Sinkhorn routing
  pkm            n_keys² values, n_keys chosen for the parameter count closest to dense's

Time: all variants in one process, interleaved round by round (so a busy neighbour slows every variant
alike), after warm-up; the median over the rounds. Peak memory: a fresh subprocess per variant runs a
64-token warm-up step, builds the layer and input, resets the kernel's resident-set high-water mark
(``/proc/self/clear_refs``, Linux), runs one step and reports VmHWM minus the resident set before it:
the growth of resident memory during forward+backward (activations, gradients, temporaries, allocator
slack), parameters and input excluded. Resident memory, not torch's count of live tensor bytes, because
it is what the machine pays (e.g. glibc returns blocks over 32 MB to the OS at once, smaller ones not).

On a shared machine, OpenMP threads spin-waiting for a descheduled partner slow every variant, the
σ-MoE's many smaller ops most (>10x seen at load 4 on 2 cores); ``OMP_WAIT_POLICY=PASSIVE`` removes
that, and the header prints the load average so a noisy run is recognisable.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from sigma_moe.layers import (
    DenseConfig,
    PKMConfig,
    SBaseConfig,
    SigmaMoEConfig,
    SwitchConfig,
    TopKMLPConfig,
    build_feedforward,
    count_parameters,
    feedforward_parameter_count,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


@dataclass(frozen=True)
class Variant:
    name: str
    cfg: object
    note: str


def variants(args: argparse.Namespace) -> list[Variant]:
    e, g, k, d = args.n_experts, args.expert_size, args.k, args.d_model
    dense_cfg = DenseConfig(d_ff=e * g)
    out = [
        Variant("dense", dense_cfg, f"d_ff {e * g}"),
        Variant("dense_active", DenseConfig(d_ff=k * g), f"d_ff {k * g} (σ-MoE's active FLOPs)"),
        Variant("sigma_moe", SigmaMoEConfig(n_experts=e, expert_size=g, k=k), f"{e}×{g}, k={k}"),
        Variant("topk_mlp", TopKMLPConfig(d_ff=e * g, k=k * g), f"d_ff {e * g}, keep {k * g}"),
        Variant("switch", SwitchConfig(n_experts=max(1, e // k), expert_size=k * g, k=1), f"{max(1, e // k)}×{k * g}, k=1"),
        Variant("sbase", SBaseConfig(n_experts=e, expert_size=g, k=k), f"{e}×{g}, k={k}"),
    ]
    target = feedforward_parameter_count(dense_cfg, d)
    n_keys = min(range(2, 256), key=lambda n: abs(feedforward_parameter_count(PKMConfig(n_keys=n, knn=min(32, n)), d) - target))
    out.append(Variant("pkm", PKMConfig(n_keys=n_keys, knn=min(32, n_keys)), f"{n_keys}² values"))
    return [v for v in out if not args.only or v.name in args.only]


def make_step(v: Variant, args: argparse.Namespace, tokens: int | None = None):
    """Build the layer and its input; return (layer, step) where step() is one forward+backward."""
    torch.manual_seed(0)
    dtype, n = DTYPES[args.dtype], tokens or args.tokens
    ff = build_feedforward(v.cfg, d_model=args.d_model, n_layers=1).to(dtype).train()
    x = torch.randn(n, args.d_model, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(n, args.d_model, dtype=dtype)  # contiguous, as a real loss gives

    def step() -> None:
        ff.zero_grad(set_to_none=True)
        x.grad = None
        y = ff(x)
        outputs, grads = [y], [grad_y]
        if ff.aux_loss is not None and ff.aux_loss.requires_grad:
            outputs.append(ff.aux_loss)
            grads.append(torch.ones_like(ff.aux_loss))
        torch.autograd.backward(outputs, grads)

    return ff, step


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (peak memory needs Linux)")


def peak_memory_mb(v: Variant, args: argparse.Namespace) -> float:
    """Run in a fresh process: growth of the resident set during one forward+backward, in MB."""
    # Warm up on a few tokens: one-time allocations (thread pools, BLAS buffers) happen there, while
    # the allocator keeps (almost) nothing resident that the measured step could reuse unseen.
    make_step(v, args, tokens=min(64, args.tokens))[1]()
    return resident_set_growth_mb(make_step(v, args)[1])


def resident_set_growth_mb(step) -> float:
    """Growth of this process's resident set during ``step()``, in MB (peak minus before; Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status_kb("VmRSS")
    step()
    return (_status_kb("VmHWM") - before) / 1024


def time_all(vs: list[Variant], args: argparse.Namespace) -> dict[str, list[float]]:
    steps = {v.name: make_step(v, args) for v in vs}
    for _ in range(args.warmup):
        for _, step in steps.values():
            step()
    times: dict[str, list[float]] = {v.name: [] for v in vs}
    for _ in range(args.repeats):
        for name, (_, step) in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def child_args(args: argparse.Namespace, name: str) -> list[str]:
    return [
        sys.executable, __file__, "--memory-of", name, "--tokens", str(args.tokens), "--d-model", str(args.d_model),
        "--n-experts", str(args.n_experts), "--expert-size", str(args.expert_size), "--k", str(args.k),
        "--dtype", args.dtype, "--threads", str(args.threads),
    ]  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-experts", type=int, default=16)
    p.add_argument("--expert-size", type=int, default=128)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (the median is reported)")
    p.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: the memory subprocess
    args = p.parse_args(argv)
    if args.repeats < 1 or args.tokens < 1:
        p.error("--repeats and --tokens must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    vs = variants(args)
    if args.memory_of:
        (v,) = [v for v in variants(argparse.Namespace(**{**vars(args), "only": None})) if v.name == args.memory_of]
        print(json.dumps({"peak_mb": peak_memory_mb(v, args)}))
        return
    print(
        f"forward+backward, {args.tokens} tokens, d_model {args.d_model}, {args.dtype}, {args.threads} threads, "
        f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up; "
        f"load average {os.getloadavg()[0]:.2f}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    times = time_all(vs, args)
    peaks = {}
    if not args.no_memory:
        for v in vs:
            res = subprocess.run(child_args(args, v.name), capture_output=True, text=True, check=True)
            peaks[v.name] = json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"{'variant':14s} {'config':32s} {'params':>10s} {'median ms':>10s} {'min ms':>8s} {'peak MB':>8s}")
    for v in vs:
        n_params = count_parameters(make_step(v, args)[0])
        peak = f"{peaks[v.name]:8.0f}" if v.name in peaks else f"{'-':>8s}"
        print(f"{v.name:14s} {v.note:32s} {n_params:10d} {med[v.name]:10.1f} {min(times[v.name]):8.1f} {peak}")
    if {"sigma_moe", "dense", "dense_active"} <= set(med):
        print(f"sigma_moe / dense_active time: {med['sigma_moe'] / med['dense_active']:.2f}  (target <= 1.5)")
        print(f"dense / sigma_moe time:        {med['dense'] / med['sigma_moe']:.2f}  (target >= 2.5)")
        if peaks:
            print(f"sigma_moe / dense peak memory: {peaks['sigma_moe'] / peaks['dense']:.2f}  (target <= 1)")


if __name__ == "__main__":
    main()
