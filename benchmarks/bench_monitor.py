"""What the training monitor costs: per training step and per log step.

    .venv/bin/python benchmarks/bench_monitor.py                       # d 512, 4096 tokens, 16 × 128, K 4, 8 layers
    .venv/bin/python benchmarks/bench_monitor.py --tokens 256 --d-model 32 --layers 2 --repeats 2   # quick

Per step: one σ-MoE layer's forward+backward (tracking off), the hidden-unit tracking alone (what
``track_units`` adds to a forward: one index_add over the [rows, G] activations, a compare and an OR,
timed on the layer's real activations) and ``IntervalMetrics.after_forward`` (adding each layer's
counts, keeping its router sums, OR-ing its fired units), times ``--layers``; printed as ms and as a
share of the layers' own forward+backward (a whole model's step is longer, so the share of a real
step is smaller). The tracking is timed alone because on a busy machine it is far below the noise
of a forward+backward. Per log step: ``IntervalMetrics.reduce`` (one process: the
all-reduce is a no-op, the rest is packing and the figures) and ``Monitor.routing`` writing the
scalars and bars, and separately the images (drawn every ``logging.images_every`` steps only).
The fastest of ``--repeats`` rounds each (rounds interleaved): on a shared machine the minimum is the
figure least disturbed by neighbours.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--expert-size", type=int, default=128)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--layers", type=int, default=8, help="routed layers the monitor reads")
    p.add_argument("--log-every", type=int, default=10, help="forwards per logging interval")
    p.add_argument("--repeats", type=int, default=7)
    return p.parse_args(argv)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> dict[str, float]:
    from sigma_moe.kernels import cvmm, prepare_selection
    from sigma_moe.launch.monitor.routing import IntervalMetrics
    from sigma_moe.launch.monitor.run_monitor import Monitor
    from sigma_moe.layers import SigmaMoE, SigmaMoEConfig

    a = parse_args(argv)
    torch.manual_seed(0)
    cfg = SigmaMoEConfig(n_experts=a.experts, expert_size=a.expert_size, k=a.k)
    layer = SigmaMoE(cfg, d_model=a.d_model, n_layers=a.layers)
    x = torch.randn(a.tokens, a.d_model)

    def step(track: bool) -> None:
        layer.track_units = track
        layer(x).square().mean().backward()

    layers = [layer] * a.layers  # the same layer read L times: the monitor's work per layer is what counts
    metrics = IntervalMetrics(layers)
    step(True)
    with torch.no_grad():  # the layer's real hidden activations and rows, as run_experts sees them
        r = layer.route(x)
        sel = prepare_selection(r.expert_idx, a.experts)
        h = torch.relu(cvmm(x, sel, layer.w1))
    fired = torch.zeros(a.experts, a.expert_size, dtype=torch.bool)

    def track() -> None:  # RoutedExperts.run_experts' tracking, and the OR of two calls
        sums = h.new_zeros(a.experts, a.expert_size).index_add_(0, sel.expert_ids, h)
        torch.logical_or(fired, sums > 0)

    off, units, after = [], [], []
    for _ in range(a.repeats):
        off.append(timed(lambda: step(False)))
        units.append(min(timed(track) for _ in range(5)))
        after.append(timed(metrics.after_forward))
    ms = {name: 1e3 * min(v) for name, v in (("off", off), ("units", units), ("after", after))}

    with tempfile.TemporaryDirectory() as tb:
        mon = Monitor(tb, rank=0, total_steps=10**9, progress_bar=False, images_every=0)
        reduce_s, write_s, images_s = [], [], []
        warm = metrics.reduce({"loss": 1.0})
        mon.routing(1, warm)
        mon._images(1, warm)  # warm-up: matplotlib's first figure loads its fonts
        metrics.after_forward()
        for r in range(a.repeats):
            for _ in range(a.log_every - 1):
                metrics.after_forward()
            t0 = time.perf_counter()
            log = metrics.reduce({"loss": 1.0})
            t1 = time.perf_counter()
            mon.routing((r + 1) * a.log_every, log)
            t2 = time.perf_counter()
            mon._images((r + 1) * a.log_every, log)
            images_s.append(time.perf_counter() - t2)
            reduce_s.append(t1 - t0)
            write_s.append(t2 - t1)
            metrics.after_forward()
        mon.close()
    log_ms = {n: 1e3 * min(v) for n, v in (("reduce", reduce_s), ("write", write_s), ("images", images_s))}

    layer_step = ms["off"] * a.layers
    units = ms["units"] * a.layers
    print(
        f"σ-MoE d {a.d_model}, {a.tokens} tokens, {a.experts} × {a.expert_size}, K {a.k}; {a.layers} routed layers; "
        f"load {os.getloadavg()[0]:.1f}"
    )
    print(f"per step   layers' forward+backward      {layer_step:9.2f} ms")
    print(f"           hidden-unit tracking          {units:9.2f} ms  ({units / layer_step:.2%} of it)")
    print(f"           after_forward (all layers)    {ms['after'] * 1:9.3f} ms  ({ms['after'] / layer_step:.2%} of it)")
    print(f"per log    reduce (one process)          {log_ms['reduce']:9.2f} ms")
    print(f"           scalars and bars written      {log_ms['write']:9.2f} ms")
    print(f"           images (every images_every)   {log_ms['images']:9.2f} ms")
    return {"layer_step_ms": layer_step, "units_ms": units, "after_forward_ms": ms["after"], **log_ms}


if __name__ == "__main__":
    main()
