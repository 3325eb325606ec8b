"""Weak scaling of expert parallelism: a stack of σ-MoE layers with our all-to-all dispatcher against
the same stack built from ``deepspeed.moe.layer.MoE``, W = expert-parallel size = number of processes,
a fixed number of tokens per process.

    .venv/bin/python benchmarks/bench_expert_parallel.py                 # W = 1 2 4, ~5 min
    .venv/bin/python benchmarks/bench_expert_parallel.py --smoke         # tiny, seconds
    .venv/bin/python benchmarks/bench_expert_parallel.py --no-keep-freed-memory   # glibc's defaults
    .venv/bin/python benchmarks/bench_expert_parallel.py --transport mpi # ours' all-to-all over MPI (mpirun)
    .venv/bin/python benchmarks/bench_expert_parallel.py --ranks 2 --sweep-experts 16 32 64 128   # ours over N_E

The stack: ``--layers`` blocks of ``h = h + FF(LayerNorm(h))``, fp32, forward + backward of
``mean(h²) + Σ aux losses``. FF kinds, each 16 experts of 128 hidden units, k = 4, no biases (equal
parameters and active FLOPs; DeepSpeed's experts are ``Linear(d, G) → ReLU → Linear(G, d)``):
  sigma_moe         ours: dropless, a token sent once per rank holding its experts, CVMM on this
                    rank's experts, uneven all-to-all (no padding); gloo, or MPI with --transport mpi
  ds_moe_cf1        DeepSpeed MoE, capacity factor 1: pads every expert to k·T/N_E rows and drops the
                    rest (the dropped share of routes is printed)
  ds_moe_dropless   DeepSpeed MoE, drop_tokens=False: pads every expert to the largest load in the group
All kinds are built in every process and run round-robin, so a busy neighbour slows them alike.

``--sweep-experts N_E ...``: ours alone at each N_E (experts per rank growing with it), all N_E built in
the same ranks and run round-robin, each N_E's time per step as a ratio to the first N_E's (the σ-MoE
claim: flat in N_E but for the selector).

"Weak scaling": tokens per rank fixed. ``--experts total`` (default) keeps the layer's shape (16
experts over W ranks, 16/W each); ``--experts per-rank`` keeps 16 experts on every rank (16·W in all).
Either way every rank does the same expected expert work at every W.

Every rank runs ``--threads`` torch threads (default 1) at every W, so on this 2-core machine W = 2
fills the cores and W = 4 oversubscribes them (2 ranks per core: read its times as a functional check
of 4-way all-to-all, not as scaling). Weak-scaling efficiency of W = 2 is given two ways:
  vs ideal      t(W=1) / t(W=2): 1 means two ranks take as long as one (perfect weak scaling)
  vs machine    t(1+1) / t(W=2), where 1+1 = two independent single-process copies running at the
                same time (no communication): what two busy ranks on this machine can do at best
                (they share memory bandwidth and caches, and any other load on the machine)
Time: median over rounds in each rank, then the slowest rank (a step waits for it); with
``--repeats R`` the configurations run R times in turn and the median of the R is printed (a noisy
machine moves single runs by ±10 %, and the efficiencies compare different runs).

All-to-all bytes each rank sends to other ranks during one extra step, per layer and direction (a
quarter of a layer's step: forward dispatch, forward combine and their two backward mirrors), beside
the formula for uniform routing. Ours from the exchange meter that feeds TensorBoard in training
(any transport): a token goes once to each other rank holding one of its k experts, with its k gates
and k int64 expert ids, (W − 1)·T·(1 − C(N_E − N_E/W, k) / C(N_E, k))·(d + 1.5·k)·4 bytes on average
per direction in fp32 (``sigma_moe.distributed.exchange_volume``, which ``sigma-moe plan`` uses too).
DeepSpeed's by wrapping ``torch.distributed.all_to_all_single``: its padded [N_E, C, d] buffer,
(1 − 1/W)·N_E·C·d·4, C = k·T/N_E at capacity factor 1.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sigma_moe.distributed.exchange_volume import a2a_bytes_per_token

KINDS = ("sigma_moe", "ds_moe_cf1", "ds_moe_dropless")


class Stack(nn.Module):
    """``layers`` pre-norm residual FF blocks of one kind; ``forward(x) -> (h, Σ aux losses)``."""

    def __init__(self, kind: str, args: argparse.Namespace, n_experts: int, ep_size: int) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        from sigma_moe.layers import SigmaMoE, SigmaMoEConfig

        self.kind = kind
        d, g, k, n = args.d_model, args.expert_size, args.k, args.layers
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(n))
        if kind == "sigma_moe":
            cfg = SigmaMoEConfig(n_experts=n_experts, expert_size=g, k=k)
            self.ffs = nn.ModuleList(SigmaMoE(cfg, d_model=d, n_layers=n) for _ in range(n))
            return
        ffs = []
        for _ in range(n):
            expert = nn.Sequential(nn.Linear(d, g, bias=False), nn.ReLU(), nn.Linear(g, d, bias=False))
            moe = MoE(
                hidden_size=d,
                expert=expert,
                num_experts=n_experts,
                ep_size=ep_size,
                k=k,
                capacity_factor=1.0,
                min_capacity=0,
                drop_tokens=kind == "ds_moe_cf1",
                use_rts=False,
            )
            moe.set_deepspeed_parallelism()  # what deepspeed.initialize would call
            ffs.append(moe)
        self.ffs = nn.ModuleList(ffs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """-> (h, Σ aux, share of routes dropped by DeepSpeed's capacity)."""
        h, aux, dropped = x, x.new_zeros(()), []
        for norm, ff in zip(self.norms, self.ffs):
            if self.kind == "sigma_moe":
                h = h + ff(norm(h))
                aux = aux + ff.aux_loss
                continue
            y, l_aux, counts = ff(norm(h))
            h, aux = h + y, aux + l_aux
            if self.kind == "ds_moe_cf1":
                gate = ff.deepspeed_moe.gate
                capacity = math.ceil(gate.capacity_factor * gate.k * x.shape[0] / counts.numel())
                dropped.append(float((counts.float() - capacity).clamp_min(0).sum() / counts.sum()))
        return h, aux, statistics.mean(dropped) if dropped else 0.0


def build(kind: str, args: argparse.Namespace, ep_size: int, n_experts: int | None = None) -> Stack:
    from sigma_moe.distributed import parallelize

    torch.manual_seed(0)  # the same model in every rank (parallelize cuts each rank's expert shard)
    if n_experts is None:
        n_experts = args.n_experts * (ep_size if args.experts == "per-rank" else 1)
    stack = Stack(kind, args, n_experts, ep_size)
    if kind == "sigma_moe":
        parallelize(stack, argparse.Namespace(expert_parallel_size=ep_size, transport=args.transport))
    return stack


def step(stack: Stack, x: torch.Tensor) -> float:
    h, aux, dropped = stack(x)
    (h.square().mean() + aux).backward()
    for p in stack.parameters():
        p.grad = None
    return dropped


class ByteCounter:
    """Wraps ``dist.all_to_all_single`` (DeepSpeed's all-to-all): bytes this rank sends to other ranks,
    per kind, while on."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.sent: dict[str, int] = defaultdict(int)
        self._inner = dist.all_to_all_single

    def __call__(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        if self.kind is not None:
            w, me = dist.get_world_size(group), dist.get_rank(group)
            rows = input_split_sizes or [input.shape[0] // w] * w
            row_bytes = input[0].numel() * input.element_size() if input.shape[0] else 0
            self.sent[self.kind] += sum(r for i, r in enumerate(rows) if i != me) * row_bytes
        return self._inner(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)


def worker(rank: int, world: int, ports: list[int], args: argparse.Namespace, out_dir: str) -> None:
    """``world`` ranks of one job; ``len(ports) > 1``: that many independent one-process jobs."""
    import logging

    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from sigma_moe.launch.cpu_memory import keep_freed_memory

        keep_freed_memory()
    independent = len(ports) > 1
    deepspeed.init_distributed(
        dist_backend="gloo",
        init_method=f"tcp://127.0.0.1:{ports[rank if independent else 0]}",
        rank=0 if independent else rank,
        world_size=1 if independent else world,
        timeout=datetime.timedelta(seconds=600),
        verbose=False,
    )
    from sigma_moe.distributed import ExchangeTotals, exchange_meters

    ep_size = dist.get_world_size()
    counter = ByteCounter()
    dist.all_to_all_single = counter
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.d_model, generator=g)
    if args.sweep_experts:  # ours at every N_E, round-robin like the kinds
        stacks = {f"sigma_moe_{e}": build("sigma_moe", args, ep_size, e) for e in args.sweep_experts}
    else:
        stacks = {kind: build(kind, args, ep_size) for kind in KINDS}
    times: dict[str, list[float]] = {kind: [] for kind in stacks}
    dropped: dict[str, list[float]] = {kind: [] for kind in stacks}
    for round_ in range(args.warmup + args.rounds):  # interleaved: a busy neighbour slows all alike
        for kind, stack in stacks.items():
            dist.barrier()
            t0 = time.perf_counter()
            drop = step(stack, x)
            dist.barrier()
            if round_ >= args.warmup:
                times[kind].append(time.perf_counter() - t0)
                dropped[kind].append(drop)
    for kind, stack in stacks.items():  # one counted step, untimed
        ours = kind.startswith("sigma_moe")
        counter.kind = None if ours else kind
        meters = exchange_meters(list(stack.modules()))
        before = sum((m.totals() for m in meters), ExchangeTotals())
        step(stack, x)
        counter.kind = None
        if ours:
            counter.sent[kind] = (sum((m.totals() for m in meters), ExchangeTotals()) - before).bytes_sent
    result = {
        kind: (statistics.median(times[kind]), statistics.mean(dropped[kind]), counter.sent[kind]) for kind in stacks
    }
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, args: argparse.Namespace, independent: bool = False) -> dict[str, tuple[float, float, float]]:
    """{kind: (ms of the slowest rank, dropped share, off-rank bytes per rank and step)}."""
    ports = [free_port() for _ in range(world if independent else 1)]
    with tempfile.TemporaryDirectory() as out_dir:
        if args.transport == "mpi" and world > 1 and not independent:  # ranks started by mpirun
            mpirun = Path(sys.executable).parent / "mpirun"
            # unbound: pinned to one core each, a rank's gloo and MPI helper threads compete with its compute
            subprocess.run(
                [
                    str(mpirun),
                    "--allow-run-as-root",
                    "--oversubscribe",
                    "--bind-to",
                    "none",
                    "-np",
                    str(world),
                    sys.executable,
                    __file__,
                    *sys.argv[1:],
                    "--mpi-rank-of",
                    out_dir,
                    str(ports[0]),
                ],
                check=True,
            )
        else:
            mp.spawn(worker, args=(world, ports, args, out_dir), nprocs=world)
        per_rank = [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world)]
    return {
        kind: (
            max(r[kind][0] for r in per_rank),
            statistics.mean(r[kind][1] for r in per_rank),
            statistics.mean(r[kind][2] for r in per_rank),
        )
        for kind in per_rank[0]
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--layers", type=int, default=4, help="FF blocks in the stack")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-experts", type=int, default=16, help="experts per layer (per rank with --experts per-rank)")
    p.add_argument("--expert-size", type=int, default=128)
    p.add_argument("--k", type=int, default=4, help="experts per token")
    p.add_argument(
        "--experts",
        choices=("total", "per-rank"),
        default="total",
        help="keep the number of experts per layer fixed, or the number per rank",
    )
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every configuration this many times, in turn, and report the median of its times",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank, the same at every W")
    p.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="every rank keeps freed memory (launch/cpu_memory.py), as CPU training runs do: no "
        "fresh page faults for the 32 MB row tensors; every kind",
    )
    p.add_argument(
        "--transport",
        choices=("torch", "mpi"),
        default="torch",
        help="ours' all-to-all: torch.distributed (gloo, processes from torch.multiprocessing) or MPI "
        "(W > 1 started by mpirun; DeepSpeed's all-to-all stays on gloo)",
    )
    p.add_argument(
        "--sweep-experts",
        type=int,
        nargs="+",
        metavar="N_E",
        help="ours alone at each of these expert counts per layer, as ratios to the first",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes, W = 1 2")
    p.add_argument("--mpi-rank-of", nargs=2, metavar=("OUT_DIR", "PORT"), help=argparse.SUPPRESS)  # internal
    args = p.parse_args()
    if args.smoke:
        args.ranks, args.tokens, args.d_model, args.n_experts, args.expert_size = [1, 2], 128, 32, 4, 16
        args.k, args.layers, args.rounds, args.warmup = 2, 2, 2, 1
    if args.mpi_rank_of:  # one rank of a W > 1 run under mpirun (see run)
        from mpi4py import MPI

        out_dir, port = args.mpi_rank_of
        comm = MPI.COMM_WORLD
        worker(comm.Get_rank(), comm.Get_size(), [int(port)], args, out_dir)
        return
    if args.sweep_experts:
        bad = [e for e in args.sweep_experts for w in args.ranks if e % w or e < args.k]
        if bad:
            raise SystemExit(f"--sweep-experts: {bad} must be divisible by every W in --ranks and >= --k")
        sweep(args)
        return
    cores = len(os.sched_getaffinity(0))
    d, k, t = args.d_model, args.k, args.tokens
    print(
        f"tokens/rank {t}, {args.layers} layers, d_model {d}, {args.n_experts} experts × {args.expert_size} "
        f"({args.experts}), k {k}, fp32, {args.threads} thread(s) per rank, {cores} cores, "
        f"glibc {'keeps freed memory' if args.keep_freed_memory else 'defaults'}, "
        f"ours' all-to-all over {args.transport}, "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    print(
        f"{'W':>4} {'kind':<16} {'ms/step':>8} {'tokens/s':>9} {'ours ×':>7} {'dropped':>8} "
        f"{'a2a MB/layer/dir':>16} {'formula':>8}"
    )
    results: dict[str, dict[str, tuple[float, float, float]]] = {}
    configs = [(str(w), w, False) for w in args.ranks]
    if 1 in args.ranks and 2 in args.ranks:
        configs.insert(args.ranks.index(2), ("1+1", 2, True))
    for _label, world, independent in configs:
        for w in (world,) if args.experts == "total" and not independent else ():
            if args.n_experts % w:
                raise SystemExit(f"--n-experts {args.n_experts} must be divisible by every W in --ranks ({w})")
    repeats: dict[str, list[dict[str, tuple[float, float, float]]]] = defaultdict(list)
    for _ in range(args.repeats):  # the configurations in turn, so a slow spell of the machine hits them alike
        for label, world, independent in configs:
            repeats[label].append(run(world, args, independent))
    for label, world, independent in configs:
        res = results[label] = {
            kind: (statistics.median(r[kind][0] for r in repeats[label]), *repeats[label][-1][kind][1:])
            for kind in KINDS
        }
        ep = 1 if independent else world
        n_experts = args.n_experts * (ep if args.experts == "per-rank" else 1)
        ours = res["sigma_moe"][0]
        for kind, (sec, drop, sent) in res.items():
            per_dir = sent / args.layers / 4 / 1e6
            if kind == "sigma_moe":
                per_token = a2a_bytes_per_token(d_model=d, k=k, n_experts=n_experts, ep_size=ep, element_size=4)
                formula = t * per_token / 4 / 1e6
            else:  # DeepSpeed sends its whole padded [N_E, C, d] buffer; C = k·T/N_E at capacity factor 1
                formula = (1 - 1 / ep) * n_experts * math.ceil(k * t / n_experts) * d * 4 / 1e6
            formula_s = f"{formula:>8.2f}" if kind != "ds_moe_dropless" else f"{'≥' + format(formula, '.2f'):>8}"
            note = " (oversubscribed)" if world * args.threads > cores else ""
            note += " (independent copies)" if independent else ""
            print(
                f"{label:>4} {kind:<16} {sec * 1e3:>8.1f} {ep * t / sec:>9.0f} {sec / ours:>7.2f} {drop:>8.1%} "
                f"{per_dir:>16.2f} {formula_s}{note}"
            )
    print("ours × = that kind's time / ours = our tokens/s / that kind's")
    if "1" in results and "2" in results:
        for kind in KINDS:
            t1, t2 = results["1"][kind][0], results["2"][kind][0]
            line = f"W=2 weak-scaling efficiency {kind:<16} vs ideal {t1 / t2:.2f}"
            if "1+1" in results:
                line += f", vs machine {results['1+1'][kind][0] / t2:.2f}"
            print(line)
    print(f"load average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def sweep(args: argparse.Namespace) -> None:
    """Ours at every N_E of ``--sweep-experts``, for each W of ``--ranks``: ms per step and the ratio to
    the first N_E (medians over ``--repeats`` runs)."""
    print(
        f"tokens/rank {args.tokens}, {args.layers} layers, d_model {args.d_model}, N_E × {args.expert_size}, "
        f"k {args.k}, fp32, {args.threads} thread(s) per rank, ours' all-to-all over {args.transport}, "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    for world in args.ranks:
        runs = [run(world, args) for _ in range(args.repeats)]
        ms = {e: statistics.median(r[f"sigma_moe_{e}"][0] for r in runs) * 1e3 for e in args.sweep_experts}
        first = args.sweep_experts[0]
        print(
            f"W = {world}: "
            + " | ".join(
                f"N_E {e} ({e // world}/rank): {ms[e]:.1f} ms ({ms[e] / ms[first]:.2f})" for e in args.sweep_experts
            )
        )
        last = args.sweep_experts[-1]
        print(
            f"W = {world}: N_E={last} / N_E={first}: {ms[last] / ms[first]:.2f}, slowest / fastest N_E: "
            f"{max(ms.values()) / min(ms.values()):.2f}  (target <= 1.2)"
        )
    print(f"load average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
