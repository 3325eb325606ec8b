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
- time: both models in this process, one step of each in turn for ``--repeats`` rounds after a
  warm-up round, the median; and the model TFLOP/s it gives (:mod:`sigma_moe.layers.flops`; the
  recompute is not counted as model FLOPs, so checkpointing lowers it).
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
        memory = [
            torch.randn(batch, model.memory_length, cfg.d_model, generator=g).to(device, dtype) for _ in model.blocks
        ]

    def step() -> None:
        model.zero_grad(set_to_none=False)  # the gradients stay allocated: not part of the growth
        out = model(tokens, memory)
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten()) + out.aux_loss
        loss.backward()

    return step


def build(args: argparse.Namespace, checkpointing: bool) -> TransformerLM:
    torch.manual_seed(0)
    model = TransformerLM(load_config(args.config, args.set).model, activation_checkpointing=checkpointing)
    return model.to(args.device, DTYPES[args.dtype]).train()


def peak_memory_mb(args: argparse.Namespace) -> float:
    """In a fresh process: the step's peak memory in mode ``args.measure``, in MB."""
    device = torch.device(args.device)
    model = build(args, args.measure == "on")
    if device.type == "cpu":
        make_step(model, 1, device)()  # one-time allocations (thread pools, BLAS buffers, the gradients)
        return resident_set_growth_mb(make_step(model, args.batch, device))
    step = make_step(model, args.batch, device)
    step()  # warm-up: kernels chosen, gradients allocated
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def time_both(args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per step of each mode, both models in this process, run in alternation (so a
    busy neighbour slows both alike), after one warm-up step each."""
    device = torch.device(args.device)
    steps = {mode: make_step(build(args, mode == "on"), args.batch, device) for mode in ("off", "on")}
    times: dict[str, list[float]] = {mode: [] for mode in steps}
    for round_ in range(args.repeats + 1):
        for mode, step in steps.items():
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_:
                times[mode].append(time.perf_counter() - t0)
    return {mode: statistics.median(t) for mode, t in times.items()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/paper/wt103-47m-sigma-moe.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (one step of each mode)")
    p.add_argument("--measure", choices=["on", "off"], help=argparse.SUPPRESS)  # internal: the child
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        p.error("--batch and --repeats must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.measure:
        print(json.dumps({"peak_mb": peak_memory_mb(args)}))
        return
    cfg = load_config(args.config, args.set).model
    print(
        f"{' '.join([Path(args.config).name, *args.set])}: {cfg.n_layers} layers, d_model {cfg.d_model}, "
        f"context {cfg.context}, attention {cfg.attention}, ff {cfg.ff.kind}; batch {args.batch}, {args.dtype}, "
        f"{args.device}; load average {os.getloadavg()[0]:.2f}"
    )
    peaks = {}
    for mode in ("off", "on"):
        child = [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv), "--measure", mode]
        out = subprocess.run(child, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"the {mode} measurement failed:\n{out.stderr[-3000:]}")
        peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    seconds = time_both(args)
    flops = training_flops_per_token(cfg, batch_size=args.batch) * args.batch * cfg.context
    print(f"{'checkpointing':14s} {'peak MB':>9s} {'step ms':>9s} {'model TFLOP/s':>14s}")
    for mode in ("off", "on"):
        print(f"{mode:14s} {peaks[mode]:9.0f} {seconds[mode] * 1e3:9.0f} {flops / seconds[mode] / 1e12:14.4f}")
    print(
        f"peak memory on / off: {peaks['on'] / peaks['off']:.2f}; step time on / off: "
        f"{seconds['on'] / seconds['off']:.2f} (median of {args.repeats} alternating rounds)"
    )


if __name__ == "__main__":
    main()
