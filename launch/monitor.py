"""Monitoring: TensorBoard scalars, histograms and an expert-load heat-map, plus a tqdm bar.

Figures are reduced over all ranks first (:func:`reduce_routing`, :func:`all_reduce_mean`; every rank
calls them), then rank 0 writes. Tags:

    train/loss, train/ce, train/aux_loss, train/perplexity, train/lr, train/grad_norm, train/tokens_per_s,
    train/tflops_per_s, train/mfu (launch/throughput.py; mfu only with a peak figure)
    valid/loss, valid/perplexity, valid/bits_per_byte (test/... likewise, at the end)
    routing/layer_XX/selection_entropy, .../max_mean_load, .../dead_experts    (scalars)
    routing/layer_XX/tokens_per_expert    (histogram: bucket e holds the tokens routed to expert e)
    routing/load_heatmap                  (image: layer × expert, load / mean load)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from sigma_moe.distributed.collectives import is_multiprocess, world_all_reduce_


@dataclass
class LayerRouting:
    """One routed layer's routing, summed over a step's micro-batches (and over ranks once reduced)."""

    index: int  # position among the model's feedforward layers
    tokens_per_expert: torch.Tensor  # [n_experts] float64
    entropy_sum: float  # selection entropy summed over the forwards it covers
    n_forwards: int

    @property
    def selection_entropy(self) -> float:
        return self.entropy_sum / max(1, self.n_forwards)

    @property
    def max_mean_load(self) -> float:
        mean = float(self.tokens_per_expert.mean())
        return float(self.tokens_per_expert.max()) / mean if mean > 0 else 0.0

    @property
    def dead_experts(self) -> int:
        return int((self.tokens_per_expert == 0).sum())


class RoutingAccumulator:
    """Adds up the ``routing`` the routed layers leave after each forward (call after every forward)."""

    def __init__(self, ff_layers: Sequence[nn.Module]):
        self.ff_layers = list(ff_layers)
        self.reset()

    def reset(self) -> None:
        self.layers: dict[int, LayerRouting] = {}

    def add(self) -> None:
        for i, ff in enumerate(self.ff_layers):
            r = getattr(ff, "routing", None)
            if r is None:
                continue
            counts = r.tokens_per_expert.detach().to("cpu", torch.float64)
            cur = self.layers.get(i)
            if cur is None:
                self.layers[i] = LayerRouting(i, counts, float(r.selection_entropy), 1)
            else:
                cur.tokens_per_expert += counts
                cur.entropy_sum += float(r.selection_entropy)
                cur.n_forwards += 1


def reduce_routing(layers: dict[int, LayerRouting]) -> list[LayerRouting]:
    """Sum counts and entropies over ranks (collective; the same layers exist on every rank)."""
    out = [layers[i] for i in sorted(layers)]
    if not out or not is_multiprocess():
        return out
    flat = torch.cat([torch.cat([l.tokens_per_expert, torch.tensor([l.entropy_sum, l.n_forwards],
                                                                     dtype=torch.float64)]) for l in out])
    world_all_reduce_(flat)
    pos, reduced = 0, []
    for l in out:
        n = l.tokens_per_expert.numel()
        reduced.append(LayerRouting(l.index, flat[pos:pos + n].clone(), float(flat[pos + n]), int(flat[pos + n + 1])))
        pos += n + 2
    return reduced


def all_reduce_mean(values: Sequence[float]) -> list[float]:
    """Mean of each figure over ranks (collective)."""
    if not is_multiprocess():
        return [float(v) for v in values]
    t = world_all_reduce_(torch.tensor([float(v) for v in values], dtype=torch.float64))
    return (t / dist.get_world_size()).tolist()


class Monitor:
    """Rank 0 writes TensorBoard events and draws the bar; other ranks' calls do nothing."""

    def __init__(self, run_dir: str | Path, *, rank: int, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress_bar: bool = True):
        self.active = rank == 0
        self.writer = None
        self.bar = None
        if not self.active:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if progress_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)

    def write(self, message: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def scalars(self, prefix: str, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, v in values.items():
            if v is not None and math.isfinite(v):
                self.writer.add_scalar(f"{prefix}/{name}", v, step)

    def routing(self, step: int, layers: Sequence[LayerRouting]) -> None:
        if self.writer is None or not layers:
            return
        for l in layers:
            tag = f"routing/layer_{l.index:02d}"
            self.writer.add_scalar(f"{tag}/selection_entropy", l.selection_entropy, step)
            self.writer.add_scalar(f"{tag}/max_mean_load", l.max_mean_load, step)
            self.writer.add_scalar(f"{tag}/dead_experts", l.dead_experts, step)
            _expert_histogram(self.writer, f"{tag}/tokens_per_expert", l.tokens_per_expert, step)
        self.writer.add_figure("routing/load_heatmap", load_heatmap(layers), step, close=False)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _expert_histogram(writer, tag: str, counts: torch.Tensor, step: int) -> None:
    """A histogram whose bucket e (edges e-0.5 .. e+0.5) holds expert e's token count, so TensorBoard
    draws the load per expert id rather than the distribution of the counts."""
    c = counts.numpy()
    ids = np.arange(len(c), dtype=np.float64)
    total = float(c.sum())
    writer.add_histogram_raw(
        tag, min=0.0, max=float(len(c) - 1), num=total, sum=float((ids * c).sum()),
        sum_squares=float((ids * ids * c).sum()), bucket_limits=(ids + 0.5).tolist(),
        bucket_counts=c.tolist(), global_step=step,
    )


def load_heatmap(layers: Sequence[LayerRouting]):
    """matplotlib figure: rows are routed layers, columns experts, colour = load / mean load."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry touched

    n_e = max(l.tokens_per_expert.numel() for l in layers)
    grid = np.full((len(layers), n_e), np.nan)
    for row, l in enumerate(layers):
        c = l.tokens_per_expert.numpy()
        grid[row, : len(c)] = c / max(c.mean(), 1e-12)
    fig = Figure(figsize=(min(12, 2 + 0.25 * n_e), 1.2 + 0.35 * len(layers)))
    ax = fig.add_subplot()
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(l.index) for l in layers])
    fig.colorbar(im, ax=ax, label="load / mean")
    fig.tight_layout()
    return fig
