"""The routing and all-to-all figures of a logging interval, owned by the training loop: accumulated
over every training forward of every micro-batch since the last log step (evaluation forwards are not
counted), on every rank, and reduced with ONE all-reduce of one flat float64 tensor at the log step.

    metrics = IntervalMetrics(ff_layers, rank=, world_size=)
    every step:        metrics.begin_step(); after each micro-batch's forward: metrics.after_forward();
                       metrics.end_step(step_seconds)
    on a log step:     log = metrics.reduce({"loss": ..., ...})      # collective; starts a new interval

Routing counts are summed on the layers' device between log steps (no host sync per forward). The
all-to-all figures come from the dispatchers' own meters (:class:`ExchangeMeter`, running totals),
read before and after each training step, so traffic outside training steps is never counted.
Per-rank figures travel in the same reduction: each rank writes its column of a ``[figure, rank]``
block of zeros, and the sum is every rank's value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from sigma_moe.distributed import (
    ExchangeTotals,
    exchange_figures,
    exchange_meters,
    expert_parallel_layers,
    remote_rows,
)
from sigma_moe.distributed.collectives import world_all_reduce_
from sigma_moe.layers.routed import RoutedExperts

# the per-rank block's rows: what each rank measured over the interval
_PER_RANK = ("bytes_sent", "seconds", "rows_received", "expert_rows", "step_seconds")


@dataclass
class LayerLoad:
    """One routed layer over a logging interval, all ranks: its (token, slot) assignments per expert."""

    index: int  # position among the model's feedforward layers
    counts: np.ndarray  # [E] float64 assignments per expert, summed over the interval's forwards and ranks
    entropy_sum: float = 0.0  # router's selection entropy (nats, of the batch-mean softmax) summed over forwards
    n_forwards: int = 0  # forwards summed (micro-batches × ranks)

    @property
    def n_experts(self) -> int:
        return len(self.counts)

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    @property
    def share(self) -> np.ndarray:
        """Fraction of the interval's routed slots each expert got (sums to 1; zeros when nothing was routed)."""
        return self.counts / self.total if self.total else np.zeros_like(self.counts)

    @property
    def ratio(self) -> np.ndarray:
        """Load ÷ mean load per expert (1 = its fair share)."""
        return self.share * self.n_experts

    @property
    def selection_entropy(self) -> float:
        """Entropy of the load share over log E: 1 = every expert got the same number of slots, 0 = one got all."""
        if self.n_experts < 2:
            return 1.0
        p = self.share[self.share > 0]
        return float(-(p * np.log(p)).sum() / math.log(self.n_experts)) if p.size else 0.0

    @property
    def max_mean_load(self) -> float:
        return float(self.ratio.max()) if self.total else 0.0

    @property
    def min_mean_load(self) -> float:
        return float(self.ratio.min()) if self.total else 0.0

    @property
    def dead_experts(self) -> int:
        """Experts that got no slot at all in the interval."""
        return int((self.counts == 0).sum())

    def starved_experts(self, below: float) -> int:
        """Experts whose load is below ``below`` × the mean (dead ones included)."""
        return int((self.ratio < below).sum()) if self.total else self.n_experts

    @property
    def balance_loss(self) -> float:
        """log E − H(p̄) ≥ 0 (nats; 0 = the router's batch-mean distribution p̄ is uniform), mean over the
        forwards: the KL divergence of p̄ from uniform. σ-MoE's regulariser is γ·(this − log E)."""
        if not self.n_forwards:
            return 0.0
        return max(0.0, math.log(self.n_experts) - self.entropy_sum / self.n_forwards)

    def scalars(self, *, starved_below: float) -> dict[str, float]:
        return {
            "selection_entropy": self.selection_entropy,
            "max_mean_load": self.max_mean_load,
            "min_mean_load": self.min_mean_load,
            "starved_experts": self.starved_experts(starved_below),
            "dead_experts": self.dead_experts,
            "balance_loss": self.balance_loss,
        }


def model_scalars(layers: Sequence[LayerLoad], *, starved_below: float) -> dict[str, float]:
    """The model's totals: the worst layer's max/mean and min/mean, experts summed over layers, entropy
    averaged over layers, balance loss summed (as the layers' aux losses are)."""
    if not layers:
        return {}
    per = [layer.scalars(starved_below=starved_below) for layer in layers]
    return {
        "selection_entropy": float(np.mean([p["selection_entropy"] for p in per])),
        "max_mean_load": max(p["max_mean_load"] for p in per),
        "min_mean_load": min(p["min_mean_load"] for p in per),
        "starved_experts": sum(p["starved_experts"] for p in per),
        "dead_experts": sum(p["dead_experts"] for p in per),
        "balance_loss": sum(p["balance_loss"] for p in per),
        "routed_slots_per_layer": float(np.mean([layer.total for layer in layers])),
    }


@dataclass
class LogStep:
    """What a log step reduced: every figure is already over all ranks."""

    train: dict[str, float]  # each rank's figure of the log step, mean over ranks
    layers: list[LayerLoad]  # the interval's routing per routed layer
    steps: int  # training steps in the interval
    exchange: dict[str, float] = field(default_factory=dict)  # expert-parallel figures (empty without EP)
    expert_rows_per_rank: np.ndarray | None = None  # [W] rows each rank's experts computed per step (EP only)


class IntervalMetrics:
    def __init__(self, ff_layers: Sequence[nn.Module], *, rank: int = 0, world_size: int = 1):
        self.ff_layers = list(ff_layers)
        self.routed = [i for i, ff in enumerate(self.ff_layers) if isinstance(ff, RoutedExperts)]
        self.meters = exchange_meters(self.ff_layers)
        self.rank, self.world_size = rank, world_size
        self._reset()

    def _reset(self) -> None:
        self._sums: dict[int, torch.Tensor] = {}  # layer -> [E + 2] (counts, entropy sum, forwards) on its device
        self._exchange = ExchangeTotals()
        self._step_seconds = 0.0
        self._steps = 0
        self._at_begin: ExchangeTotals | None = None

    def _meter_totals(self) -> ExchangeTotals:
        return sum((m.totals() for m in self.meters), ExchangeTotals())

    def begin_step(self) -> None:
        if self.meters:
            self._at_begin = self._meter_totals()

    def after_forward(self) -> None:
        """Add the routing each routed layer left after this training forward."""
        for i in self.routed:
            r = self.ff_layers[i].routing
            if r is None:
                continue
            counts = r.tokens_per_expert.detach()
            acc = self._sums.get(i)
            if acc is None:
                acc = self._sums[i] = torch.zeros(counts.numel() + 2, dtype=torch.float64, device=counts.device)
            acc[:-2] += counts
            acc[-2] += r.selection_entropy.detach()
            acc[-1] += 1

    def end_step(self, step_seconds: float) -> None:
        self._steps += 1
        self._step_seconds += step_seconds
        if self.meters and self._at_begin is not None:
            self._exchange = self._exchange + (self._meter_totals() - self._at_begin)
            self._at_begin = None

    def reduce(self, train: dict[str, float]) -> LogStep:
        """All figures of the interval over all ranks, in one all-reduce (collective: every rank calls it
        on the same steps, with the same ``train`` keys); then a new interval starts."""
        names = list(train)
        local = {
            i: (
                self._sums[i].cpu()
                if i in self._sums
                else torch.zeros(self.ff_layers[i].n_experts + 2, dtype=torch.float64)
            )
            for i in self.routed
        }
        ep = expert_parallel_layers(self.ff_layers)
        parts = [torch.tensor([float(train[n]) for n in names], dtype=torch.float64)]
        parts += [local[i] for i in self.routed]
        parts += [torch.tensor(remote_rows(self.ff_layers[i], local[i][:-2]), dtype=torch.float64) for i in ep]
        per_rank = torch.zeros(len(_PER_RANK), self.world_size, dtype=torch.float64)
        if self.meters:
            e = self._exchange
            per_rank[:, self.rank] = torch.tensor(
                [e.bytes_sent, e.seconds, e.rows_received, e.expert_rows, self._step_seconds], dtype=torch.float64
            )
            parts.append(per_rank.flatten())
        flat = world_all_reduce_(torch.cat(parts))  # the one collective of the log step

        values = iter(flat.split([p.numel() for p in parts]))
        means = next(values) / self.world_size
        layers = []
        for i in self.routed:
            v = next(values).numpy()
            layers.append(LayerLoad(i, v[:-2].copy(), float(v[-2]), int(v[-1])))
        remote = {i: tuple(next(values).tolist()) for i in ep}
        log = LogStep(train=dict(zip(names, means.tolist())), layers=layers, steps=self._steps)
        if self.meters:
            block = next(values).view(len(_PER_RANK), self.world_size).numpy()
            log.exchange, log.expert_rows_per_rank = _exchange_scalars(dict(zip(_PER_RANK, block)), self._steps)
            log.exchange.update(
                exchange_figures(
                    self.ff_layers, remote, {layer.index: torch.from_numpy(layer.counts) for layer in layers}
                )
            )
        self._reset()
        return log


def _exchange_scalars(per_rank: dict[str, np.ndarray], steps: int) -> tuple[dict[str, float], np.ndarray]:
    """Per-step figures from each rank's interval totals: mean over ranks and the busiest rank's."""
    steps = max(steps, 1)
    out = {}
    for name, values, scale in (
        ("a2a_mb_per_step", per_rank["bytes_sent"], 1e-6),
        ("a2a_ms_per_step", per_rank["seconds"], 1e3),
        ("rows_received_per_step", per_rank["rows_received"], 1.0),
    ):
        per_step = values * scale / steps
        out[name], out[f"{name}_max"] = float(per_step.mean()), float(per_step.max())
    step_s = per_rank["step_seconds"]
    out["a2a_share_of_step"] = float(
        np.mean(np.divide(per_rank["seconds"], step_s, out=np.zeros_like(step_s), where=step_s > 0))
    )
    rows = per_rank["expert_rows"] / steps
    out["ep_busiest_rank"] = float(np.argmax(rows))
    out["ep_max_mean_rows"] = float(rows.max() / rows.mean()) if rows.mean() > 0 else 0.0
    return out, rows
