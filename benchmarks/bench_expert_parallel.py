"""Weak scaling of expert parallelism: our σ-MoE layer with the all-to-all dispatcher against
``deepspeed.moe.layer.MoE``, W = expert-parallel size = number of processes, a fixed number of tokens
per process and a fixed total number of experts (so each process holds N_E / W of them).

    .venv/bin/python benchmarks/bench_expert_parallel.py                 # W = 1 2 4, 2048 tokens/rank
    .venv/bin/python benchmarks/bench_expert_parallel.py --smoke         # tiny, seconds

Layers (same N_E experts of G hidden units, top-K, fp32, forward + backward of one layer):
  sigma_moe         ours: dropless, CVMM on this rank's experts, uneven all-to-all (no padding)
  ds_moe_cf1        DeepSpeed MoE, capacity factor 1: drops tokens beyond capacity (the drop share printed)
  ds_moe_dropless   DeepSpeed MoE, drop_tokens=False: pads every expert to the largest load in the group
Time: median over rounds per rank, then the slowest rank (a step waits for it). Weak-scaling
efficiency = t(W=1) / t(W), every rank with the same number of threads. Ranks beyond the machine's cores share them, which shows in the figures:
compare layers within one W, and read the scaling only where W <= cores.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

LAYERS = ("sigma_moe", "ds_moe_cf1", "ds_moe_dropless")


def build(name: str, args: argparse.Namespace, world: int) -> nn.Module:
    from deepspeed.moe.layer import MoE

    from sigma_moe.distributed import parallelize
    from sigma_moe.layers import SigmaMoE, SigmaMoEConfig

    torch.manual_seed(0)
    d, e, g, k = args.d_model, args.n_experts, args.expert_size, args.k
    if name == "sigma_moe":
        layer = SigmaMoE(SigmaMoEConfig(n_experts=e, expert_size=g, k=k), d_model=d, n_layers=4)
        return parallelize(layer, argparse.Namespace(expert_parallel_size=world))
    expert = nn.Sequential(nn.Linear(d, g), nn.ReLU(), nn.Linear(g, d))
    moe = MoE(hidden_size=d, expert=expert, num_experts=e, ep_size=world, k=k, capacity_factor=1.0,
              min_capacity=0, drop_tokens=name == "ds_moe_cf1", use_rts=False)
    moe.set_deepspeed_parallelism()  # what deepspeed.initialize would call
    return moe


def step(name: str, layer: nn.Module, x: torch.Tensor) -> float:
    """One forward + backward; returns the share of (token, slot) routes dropped (DeepSpeed, cf 1)."""
    if name == "sigma_moe":
        (layer(x).square().mean() + layer.aux_loss).backward()
        return 0.0
    y, l_aux, counts = layer(x)
    (y.square().mean() + l_aux).backward()
    if name != "ds_moe_cf1":
        return 0.0
    gate = layer.deepspeed_moe.gate
    capacity = math.ceil(gate.capacity_factor * gate.k * x.shape[0] / counts.numel())  # as DeepSpeed sizes it
    return float((counts.float() - capacity).clamp_min(0).sum() / counts.sum())


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    import deepspeed
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    deepspeed.init_distributed(dist_backend="gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                               world_size=world, timeout=datetime.timedelta(seconds=300), verbose=False)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.d_model, generator=g, requires_grad=True)
    layers = {name: build(name, args, world) for name in LAYERS}
    times: dict[str, list[float]] = {name: [] for name in LAYERS}
    dropped: dict[str, list[float]] = {name: [] for name in LAYERS}
    for round_ in range(args.warmup + args.rounds):  # interleaved: a busy neighbour slows all alike
        for name, layer in layers.items():
            dist.barrier()
            t0 = time.perf_counter()
            drop = step(name, layer, x)
            dist.barrier()
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - t0)
                dropped[name].append(drop)
    result = {name: (statistics.median(times[name]), statistics.mean(dropped[name])) for name in LAYERS}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run(world: int, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    with tempfile.TemporaryDirectory() as out_dir, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        mp.spawn(worker, args=(world, port, args, out_dir), nprocs=world)
        per_rank = [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world)]
    return {name: (max(r[name][0] for r in per_rank), statistics.mean(r[name][1] for r in per_rank))
            for name in LAYERS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-experts", type=int, default=16)
    p.add_argument("--expert-size", type=int, default=64)
    p.add_argument("--k", type=int, default=2, help="experts per token (DeepSpeed's gate takes 1 or 2)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank, the same at every W (default: cores / largest W)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, W = 1 2")
    args = p.parse_args()
    if args.smoke:
        args.ranks, args.tokens, args.d_model, args.n_experts, args.expert_size = [1, 2], 128, 32, 4, 16
        args.rounds, args.warmup = 2, 1
    cores = os.cpu_count() or 1
    args.threads = args.threads or max(1, cores // max(args.ranks))
    print(f"tokens/rank {args.tokens}, d_model {args.d_model}, {args.n_experts} experts × {args.expert_size}, "
          f"k {args.k}, fp32, {args.threads} thread(s) per rank, {cores} cores")
    base: dict[str, float] = {}
    print(f"{'W':>3} {'layer':<16} {'ms/step':>9} {'efficiency':>10} {'dropped':>8}")
    for world in args.ranks:
        if args.n_experts % world:
            raise SystemExit(f"--n-experts {args.n_experts} must be divisible by every W in --ranks ({world})")
        res = run(world, args)
        for name, (t, drop) in res.items():
            base.setdefault(name, t)
            note = " (oversubscribed)" if world > cores else ""
            print(f"{world:>3} {name:<16} {t * 1e3:>9.1f} {base[name] / t:>10.2f} {drop:>7.1%}{note}")
        ratio = res["ds_moe_cf1"][0] / res["sigma_moe"][0]
        print(f"{world:>3} ds_moe_cf1 / sigma_moe time ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
