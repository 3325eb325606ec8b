"""Forward+backward time and peak memory of every feedforward variant at equal parameter count.

    .venv/bin/python benchmarks/bench_feedforward.py                      # d_model 512, 8192 tokens, fp32
    .venv/bin/python benchmarks/bench_feedforward.py --tokens 512 --d-model 64 --repeats 2   # quick
    .venv/bin/python benchmarks/bench_feedforward.py --experts 16 32 64 128 256          # σ-MoE over N_E

Variants (σ-MoE geometry N_E × G, K from the flags; the others sized against it):
  dense          d_ff = N_E·G           the parameter-equal dense MLP
  dense_active   d_ff = K·G             same active MLP FLOPs as σ-MoE: the speed limit it aims at
  sigma_moe      N_E × G, top-K         the layer under test (CVMM backend "auto": the torch path on CPU)
  topk_mlp       d_ff = N_E·G, keep K·G hidden units
  switch         N_E/K experts of K·G, top-1 (the paper's parity setting)
  sbase          N_E × G, top-K, Sinkhorn routing
  pkm            n_keys² values, n_keys chosen for the parameter count closest to dense's

``--experts N_E ...``: σ-MoE at each N_E (K, G fixed) beside dense_active instead, with each N_E's
time and activation memory as ratios to the first N_E's (the paper's claim: flat in N_E but for the
selector) and the first N_E's time over dense_active's (how close to the active-FLOPs limit). Each
N_E's time is also split into the selection alone (``route``: selector matmul, regulariser and top-K
over [N, N_E], forward+backward, timed as its own step) and the rest (the experts), and the growth the
selector's FLOPs alone would cause is printed beside it. The six expert matmuls are also timed alone
(per expert, rows pre-gathered, this N_E's real routing counts): with the selection they give the
floor of any path that runs one BLAS call per expert.
Activation memory there is peak memory minus the parameter gradients, which grow with N_E like the
parameters (the optimizer's state, not the layer's activations); both columns are printed.

Time: all variants in one process, interleaved round by round (so a busy neighbour slows every variant
alike), after warm-up; the median over the rounds (``--sets S``: S such medians, the smallest kept).
Peak memory: a fresh subprocess per variant runs a 64-token warm-up step, builds the layer and input,
resets the kernel's resident-set high-water mark (``/proc/self/clear_refs``, Linux), runs one step and
reports VmHWM minus the resident set before it:
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

from sigma_moe.kernels import prepare_selection
from sigma_moe.layers import (
    DenseConfig,
    PKMConfig,
    SBaseConfig,
    SigmaMoE,
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
        Variant(
            "switch", SwitchConfig(n_experts=max(1, e // k), expert_size=k * g, k=1), f"{max(1, e // k)}×{k * g}, k=1"
        ),
        Variant("sbase", SBaseConfig(n_experts=e, expert_size=g, k=k), f"{e}×{g}, k={k}"),
    ]
    target = feedforward_parameter_count(dense_cfg, d)
    n_keys = min(
        range(2, 256), key=lambda n: abs(feedforward_parameter_count(PKMConfig(n_keys=n, knn=min(32, n)), d) - target)
    )
    out.append(Variant("pkm", PKMConfig(n_keys=n_keys, knn=min(32, n_keys)), f"{n_keys}² values"))
    return [v for v in out if not args.only or v.name in args.only]


def expert_sweep(args: argparse.Namespace) -> list[Variant]:
    """dense_active, then σ-MoE at every N_E of ``--experts`` (K, G and d_model fixed)."""
    g, k = args.expert_size, args.k
    out = [Variant("dense_active", DenseConfig(d_ff=k * g), f"d_ff {k * g} (σ-MoE's active FLOPs)")]
    out += [
        Variant(f"sigma_moe_{e}", SigmaMoEConfig(n_experts=e, expert_size=g, k=k), f"{e}×{g}, k={k}")
        for e in args.experts
    ]
    return out


def _layer_and_input(v: Variant, args: argparse.Namespace, tokens: int | None):
    torch.manual_seed(0)
    dtype, n = DTYPES[args.dtype], tokens or args.tokens
    ff = build_feedforward(v.cfg, d_model=args.d_model, n_layers=1).to(dtype).train()
    x = torch.randn(n, args.d_model, dtype=dtype, requires_grad=True)
    return ff, x


def make_step(v: Variant, args: argparse.Namespace, tokens: int | None = None):
    """Build the layer and its input; return (layer, step) where step() is one forward+backward."""
    ff, x = _layer_and_input(v, args, tokens)
    grad_y = torch.randn_like(x, requires_grad=False)  # contiguous, as a real loss gives

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


def make_routing_step(v: Variant, args: argparse.Namespace):
    """(layer, step) where step() is the routed layer's selection alone, forward+backward: the selector
    matmul, the regulariser and top-K over [N, N_E] (what grows with N_E by design)."""
    ff, x = _layer_and_input(v, args, None)

    def step() -> None:
        ff.zero_grad(set_to_none=True)
        x.grad = None
        r = ff.route(x)
        (r.gates.sum() + r.aux_loss).backward()

    return ff, step


def make_matmul_step(v: Variant, args: argparse.Namespace):
    """(segments, step) where step() is only the six matmuls of the layer's forward+backward, on rows already
    gathered: per expert (with this N_E's real routing counts) for σ-MoE, whole for dense_active. No
    gather, scatter, selection or activation: the floor a per-expert BLAS path cannot go below.
    segments: (expert, first row, end row) of every expert with rows."""
    ff, x = _layer_and_input(v, args, None)
    if isinstance(ff, SigmaMoE):
        with torch.no_grad():
            offsets = prepare_selection(ff.route(x).expert_idx, ff.n_experts).offsets.tolist()
        w1, w2 = ff.w1.detach(), ff.w2.detach()
    else:
        offsets = [0, args.tokens]
        w1, w2 = ff.w1.weight.detach().t()[None], ff.w2.weight.detach().t()[None]
    d, hidden, rows = args.d_model, w1.shape[2], offsets[-1]
    xs, gy, h, gh, gx = (torch.randn(rows, n, dtype=w1.dtype) for n in (d, d, hidden, hidden, d))
    y, gw1, gw2 = torch.empty_like(xs), torch.empty_like(w1), torch.empty_like(w2)
    bounds = [(e, a, b) for e, (a, b) in enumerate(zip(offsets, offsets[1:])) if b > a]

    def step() -> None:
        for e, a, b in bounds:  # forward, then backward, as the layer orders them
            torch.mm(xs[a:b], w1[e], out=h[a:b])
            torch.mm(h[a:b], w2[e], out=y[a:b])
        for e, a, b in bounds:
            torch.mm(gy[a:b], w2[e].t(), out=gh[a:b])
            torch.mm(h[a:b].t(), gy[a:b], out=gw2[e])
            torch.mm(gh[a:b], w1[e].t(), out=gx[a:b])
            torch.mm(xs[a:b].t(), gh[a:b], out=gw1[e])

    return bounds, step


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


def time_all(vs: list[Variant], args: argparse.Namespace) -> dict[str, list[list[float]]]:
    """{variant: ``args.sets`` lists of ``args.repeats`` step times in ms}, all variants round-robin."""
    steps = {v.name: make_step(v, args) for v in vs}
    if args.experts:  # the selection alone as well, to split each N_E's time into selection and experts
        steps |= {f"{v.name}/routing": make_routing_step(v, args) for v in vs if v.name != "dense_active"}
        steps |= {f"{v.name}/matmuls": make_matmul_step(v, args) for v in vs}
    for _ in range(args.warmup):
        for _, step in steps.values():
            step()
    times: dict[str, list[list[float]]] = {name: [[] for _ in range(args.sets)] for name in steps}
    for s in range(args.sets):
        for _ in range(args.repeats):
            for name, (_, step) in steps.items():
                t0 = time.perf_counter()
                step()
                times[name][s].append((time.perf_counter() - t0) * 1e3)
    return times


def min_of_medians(sets: list[list[float]]) -> float:
    """A slow spell of a shared machine raises some sets' medians; the smallest median is the layer's."""
    return min(statistics.median(t) for t in sets)


def memory_all(vs: list[Variant], args: argparse.Namespace) -> dict[str, float]:
    """{variant: peak MB}, each measured in a fresh subprocess (see ``peak_memory_mb``)."""
    peaks = {}
    for v in vs:
        res = subprocess.run(child_args(args, v.name), capture_output=True, text=True, check=True)
        peaks[v.name] = json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]
    return peaks


def child_args(args: argparse.Namespace, name: str) -> list[str]:
    return [
        sys.executable, __file__, "--memory-of", name, "--tokens", str(args.tokens), "--d-model", str(args.d_model),
        "--n-experts", str(args.n_experts), "--expert-size", str(args.expert_size), "--k", str(args.k),
        "--dtype", args.dtype, "--threads", str(args.threads),
        *(["--experts", *map(str, args.experts)] if args.experts else []),
        *(["--keep-freed-memory"] if args.keep_freed_memory else []),
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
    p.add_argument("--sets", type=int, default=1, help="sets of --repeats rounds; the smallest median is reported")
    p.add_argument(
        "--experts",
        type=int,
        nargs="+",
        metavar="N_E",
        help="σ-MoE at each of these expert counts beside dense_active, as ratios to the first",
    )
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="keep freed memory in the process (launch/cpu_memory.py), as CPU training runs do",
    )
    p.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: the memory subprocess
    args = p.parse_args(argv)
    if args.repeats < 1 or args.tokens < 1 or args.sets < 1:
        p.error("--repeats, --sets and --tokens must be >= 1")
    if args.experts and (min(args.experts) < args.k or args.only):
        p.error(f"--experts: every N_E must be >= --k ({args.k}), and --only does not apply to the sweep")
    return args


def print_expert_sweep(
    vs: list[Variant], args: argparse.Namespace, med: dict[str, float], peaks: dict[str, float]
) -> None:
    """The sweep's table: time (split into the selection and the rest) and activation memory of every
    N_E against the first N_E's."""
    base = vs[1].name
    print(
        f"{'variant':16s} {'config':22s} {'params':>10s} {'ms':>7s} {'vs first':>8s} {'select':>7s} "
        f"{'rest':>7s} {'vs first':>8s} {'matmuls':>7s} {'vs first':>8s} "
        f"{'peak MB':>8s} {'grads MB':>8s} {'act MB':>7s} {'vs first':>8s}"
    )
    acts = {}
    for v in vs:
        n_params = count_parameters(make_step(v, args, tokens=1)[0])
        grads_mb = n_params * torch.empty((), dtype=DTYPES[args.dtype]).element_size() / 2**20
        split = f"{'':7s} {'':7s} {'':8s}"
        ratio = mm_ratio = f"{'':8s}"
        if v.name != "dense_active":
            ratio = f"{med[v.name] / med[base]:8.2f}"
            rest, rest_base = med[v.name] - med[f"{v.name}/routing"], med[base] - med[f"{base}/routing"]
            split = f"{med[f'{v.name}/routing']:7.1f} {rest:7.1f} {rest / rest_base:8.2f}"
            mm_ratio = f"{med[f'{v.name}/matmuls'] / med[f'{base}/matmuls']:8.2f}"
        split += f" {med[f'{v.name}/matmuls']:7.1f} {mm_ratio}"
        mem = f"{'-':>8s} {grads_mb:8.1f} {'-':>7s} {'':8s}"
        if v.name in peaks:
            acts[v.name] = peaks[v.name] - grads_mb
            act_ratio = f"{acts[v.name] / acts[base]:8.2f}" if v.name != "dense_active" else ""
            mem = f"{peaks[v.name]:8.0f} {grads_mb:8.1f} {acts[v.name]:7.0f} {act_ratio:>8s}"
        print(f"{v.name:16s} {v.note:22s} {n_params:10d} {med[v.name]:7.1f} {ratio} {split} {mem}")
    first = args.experts[0]
    print(f"sigma_moe N_E={first} / dense_active time: {med[base] / med['dense_active']:.2f}  (target <= 1.25)")
    for e, target in ((128, 1.15), (256, 1.3)):
        if e in args.experts and e != first:
            print(
                f"sigma_moe N_E={e} / N_E={first} time: {med[f'sigma_moe_{e}'] / med[base]:.2f}  (target <= {target})"
            )
    # The selector's matmuls are 3·2·N·d·N_E FLOPs against the experts' 3·2·2·N·K·d·G: with every op
    # at the same speed, N_E costs (1 + N_E/(2KG)) / (1 + first/(2KG)) of the first N_E's time.
    kg2 = 2 * args.k * args.expert_size
    floor = ", ".join(f"N_E={e}: {(1 + e / kg2) / (1 + first / kg2):.2f}" for e in args.experts[1:])
    print(f"selector FLOPs alone would give: {floor}")
    # The floor of a per-expert BLAS path: this N_E's matmuls and selection, everything else (gathers,
    # scatters, activation, Python) as at the first N_E.
    other = med[base] - med[f"{base}/matmuls"] - med[f"{base}/routing"]
    reach = ", ".join(
        f"N_E={e}: {(med[f'sigma_moe_{e}/matmuls'] + med[f'sigma_moe_{e}/routing'] + other) / med[base]:.2f}"
        for e in args.experts[1:]
    )
    print(f"per-expert matmuls and selection alone would give: {reach}")
    print(
        f"sigma_moe N_E={first} matmuls / dense_active matmuls: "
        f"{med[f'{base}/matmuls'] / med['dense_active/matmuls']:.2f}; its matmuls + selection / dense_active "
        f"step: {(med[f'{base}/matmuls'] + med[f'{base}/routing']) / med['dense_active']:.2f}"
    )
    if acts:
        sweep = [acts[v.name] / acts[base] for v in vs[1:]]
        print(
            f"activation memory over the sweep: {min(sweep):.2f}-{max(sweep):.2f} of N_E={first}'s  (target within 15%)"
        )


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from sigma_moe.launch.cpu_memory import keep_freed_memory

        keep_freed_memory()
    vs = expert_sweep(args) if args.experts else variants(args)
    if args.memory_of:
        every = vs if args.experts else variants(argparse.Namespace(**{**vars(args), "only": None}))
        (v,) = [v for v in every if v.name == args.memory_of]
        print(json.dumps({"peak_mb": peak_memory_mb(v, args)}))
        return
    print(
        f"forward+backward, {args.tokens} tokens, d_model {args.d_model}, {args.dtype}, {args.threads} threads, "
        f"{'smallest ' if args.sets > 1 else ''}median of {args.repeats} interleaved rounds"
        f"{f' over {args.sets} sets' if args.sets > 1 else ''} after {args.warmup} warm-up; "
        f"glibc {'keeps freed memory' if args.keep_freed_memory else 'defaults'}; "
        f"load average {os.getloadavg()[0]:.2f}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    times = time_all(vs, args)
    peaks = {} if args.no_memory else memory_all(vs, args)
    med = {n: min_of_medians(t) for n, t in times.items()}
    if args.experts:
        print_expert_sweep(vs, args, med, peaks)
        print(f"load average at the end {os.getloadavg()[0]:.2f}")
        return
    print(f"{'variant':14s} {'config':32s} {'params':>10s} {'median ms':>10s} {'min ms':>8s} {'peak MB':>8s}")
    for v in vs:
        n_params = count_parameters(make_step(v, args)[0])
        peak = f"{peaks[v.name]:8.0f}" if v.name in peaks else f"{'-':>8s}"
        fastest = min(min(t) for t in times[v.name])
        print(f"{v.name:14s} {v.note:32s} {n_params:10d} {med[v.name]:10.1f} {fastest:8.1f} {peak}")
    if {"sigma_moe", "dense", "dense_active"} <= set(med):
        print(f"sigma_moe / dense_active time: {med['sigma_moe'] / med['dense_active']:.2f}  (target <= 1.5)")
        print(f"dense / sigma_moe time:        {med['dense'] / med['sigma_moe']:.2f}  (target >= 2.5)")
        if peaks:
            print(f"sigma_moe / dense peak memory: {peaks['sigma_moe'] / peaks['dense']:.2f}  (target <= 1)")


if __name__ == "__main__":
    main()
