"""Peak memory and time of one training step of a config's model, with and without activation
checkpointing (``training.activation_checkpointing``).

    .venv/bin/python benchmarks/bench_activation_checkpointing.py                 # paper's 47M σ-MoE, CPU
    .venv/bin/python benchmarks/bench_activation_checkpointing.py --config configs/tiny.yaml --batch 2  # quick
    python benchmarks/bench_activation_checkpointing.py --device cuda --dtype bf16 --batch 64           # a GPU

The model is the config's ``model`` section (``--set`` overrides as on the CLI), built by the real
code (:class:`TransformerLM`, the flag the training run sets). One step: forward on ``--batch``
sequences of ``context`` tokens (attention xl: with a full training memory, as after the first
segment), cross-entropy + the aux losses, backward. Each mode runs in a fresh subprocess:
- peak memory, CPU: growth of the resident set during one step (VmHWM after a reset, as in
  ``bench_feedforward.py``), after a one-sequence warm-up step; GPU: ``torch.cuda.max_memory_allocated``
  during the step minus what was allocated before it. Both: what the step's activations and
  temporaries take; parameters, gradients (allocated by the warm-up) and input excluded.
- time: the median of ``--repeats`` further steps, and the model TFLOP/s it gives
  (:mod:`sigma_moe.layers.flops`; the recompute is not counted as model FLOPs).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_feedforward import resident_set_growth_mb
from sigma_moe.launch.config import load_config
from sigma_moe.layers import TransformerLM
from sigma_moe.layers.flops import training_flops_per_token

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_step(model: TransformerLM, batch: int, device: torch.device):
    """One training step's forward and backward on random tokens (no optimizer: it does not change
    the activation memory)."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.context), generator=g).to(device)
    targets = torch.randint(0, cfg.vocab_size, (batch, cfg.context), generator=g).to(device)
    dtype = next(model.parameters()).dtype
    memory = None
    if model.uses_memory and model.memory_length:
        memory = [torch.randn(batch, model.memory_length, cfg.d_model, generator=g).to(device, dtype)
                  for _ in model.blocks]

    def step() -> None:
        model.zero_grad(set_to_none=False)  # the gradients stay allocated: not part of the growth
        logits, aux, *_ = model(tokens) if memory is None else model(tokens, memory)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()) + aux
        loss.backward()

    return step


def measure(args: argparse.Namespace) -> dict:
    """In the child process: peak memory and step time of mode ``args.measure``."""
    device = torch.device(args.device)
    cfg = load_config(args.config, args.set).model
    torch.manual_seed(0)
    model = TransformerLM(cfg).to(device, DTYPES[args.dtype]).train()
    model.activation_checkpointing = args.measure == "on"
    if device.type == "cpu":
        make_step(model, 1, device)()  # one-time allocations (thread pools, BLAS buffers, the gradients)
        step = make_step(model, args.batch, device)
        peak_mb = resident_set_growth_mb(step)
    else:
        step = make_step(model, args.batch, device)
        step()  # warm-up: kernels chosen, gradients allocated
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak_mb = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    flops = training_flops_per_token(cfg, batch_size=args.batch) * args.batch * cfg.context
    return {"peak_mb": peak_mb, "ms": seconds * 1e3, "tflops_per_s": flops / seconds / 1e12}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/paper/wt103-47m-sigma-moe.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    p.add_argument("--repeats", type=int, default=2, help="timed steps after the measured one")
    p.add_argument("--measure", choices=["on", "off"], help=argparse.SUPPRESS)  # internal: the child
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        p.error("--batch and --repeats must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.measure:
        print(json.dumps(measure(args)))
        return
    cfg = load_config(args.config, args.set).model
    print(f"{' '.join([Path(args.config).name, *args.set])}: {cfg.n_layers} layers, d_model {cfg.d_model}, "
          f"context {cfg.context}, attention {cfg.attention}, ff {cfg.ff.kind}; batch {args.batch}, {args.dtype}, "
          f"{args.device}; load average {os.getloadavg()[0]:.2f}")
    results = {}
    for mode in ("off", "on"):
        child = [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv), "--measure", mode]
        out = subprocess.run(child, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"the {mode} measurement failed:\n{out.stderr[-3000:]}")
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'checkpointing':14s} {'peak MB':>9s} {'step ms':>9s} {'TFLOP/s':>9s}")
    for mode, r in results.items():
        print(f"{mode:14s} {r['peak_mb']:9.0f} {r['ms']:9.0f} {r['tflops_per_s']:9.4f}")
    off, on = results["off"], results["on"]
    print(f"peak memory on / off: {on['peak_mb'] / off['peak_mb']:.2f}; step time on / off: {on['ms'] / off['ms']:.2f}")


if __name__ == "__main__":
    main()
