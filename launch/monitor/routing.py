"""The routing and all-to-all figures of a logging interval, owned by the training loop: accumulated
over every training forward of every micro-batch since the last log step (evaluation forwards are not
counted), on every rank, and reduced with ONE all-reduce of one flat float64 tensor at the log step.

    metrics = IntervalMetrics(ff_layers, rank=, world_size=)
    every step:        metrics.begin_step(); after each micro-batch's forward: metrics.after_forward();
                       metrics.end_step(step_seconds)
    on a log step:     log = metrics.reduce({"loss": ..., ...})      # collective; starts a new interval

Routing counts are summed on the layers' device between log steps (no host sync per forward); each
forward's router distribution summed over its tokens is kept (E + 1 numbers), so that the balance loss
is taken, like the σ-MoE regulariser, over the whole batch of every rank; hidden units that fired are
OR-ed per expert (``[E_loc, G]`` bool) and reduced at their global expert ids. The
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
    expert_shard,
    local_experts,
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
    balance_loss: float = 0.0  # log E − H(p̄) (nats), p̄ over every rank's tokens of a forward, mean over forwards
    units: np.ndarray | None = None  # [E] share of each expert's hidden units that fired (> 0) in the interval

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
    def load_cv(self) -> float:
        """Coefficient of variation of the load over experts (std ÷ mean): 0 = even, √(E−1) = one got all."""
        return float(self.ratio.std()) if self.total else 0.0

    @property
    def dead_experts(self) -> int:
        """Experts that got no slot at all in the interval."""
        return int((self.counts == 0).sum())

    def starved_experts(self, below: float) -> int:
        """Experts whose load is below ``below`` × the mean (dead ones included)."""
        return int((self.ratio < below).sum()) if self.total else self.n_experts

    def scalars(self, *, starved_below: float) -> dict[str, float]:
        out = {
            "selection_entropy": self.selection_entropy,
            "max_mean_load": self.max_mean_load,
            "min_mean_load": self.min_mean_load,
            "load_cv": self.load_cv,
            "starved_experts": self.starved_experts(starved_below),
            "dead_experts": self.dead_experts,
            "balance_loss": self.balance_loss,
        }
        if self.units is not None:  # over the experts that got tokens (a dead one is dead_experts)
            alive = self.units[self.counts > 0]
            out["units_used_min"] = float(alive.min()) if alive.size else 0.0
            out["units_used_mean"] = float(alive.mean()) if alive.size else 0.0
        return out


def model_scalars(layers: Sequence[LayerLoad], *, starved_below: float) -> dict[str, float]:
    """The model's totals: the worst layer's max/mean, min/mean, spread and least-used expert's units,
    experts summed over layers, entropy and units averaged over layers, balance loss summed (as the
    layers' aux losses are)."""
    if not layers:
        return {}
    per = [layer.scalars(starved_below=starved_below) for layer in layers]
    out = {
        "selection_entropy": float(np.mean([p["selection_entropy"] for p in per])),
        "max_mean_load": max(p["max_mean_load"] for p in per),
        "min_mean_load": min(p["min_mean_load"] for p in per),
        "load_cv": max(p["load_cv"] for p in per),
        "starved_experts": sum(p["starved_experts"] for p in per),
        "dead_experts": sum(p["dead_experts"] for p in per),
        "balance_loss": sum(p["balance_loss"] for p in per),
        "routed_slots_per_layer": float(np.mean([layer.total for layer in layers])),
    }
    if all("units_used_min" in p for p in per):
        out["units_used_min"] = min(p["units_used_min"] for p in per)
        out["units_used_mean"] = float(np.mean([p["units_used_mean"] for p in per]))
    return out


@dataclass
class LogStep:
    """What a log step reduced: every figure is already over all ranks."""

    train: dict[str, float]  # each rank's figure of the log step, mean over ranks
    layers: list[LayerLoad]  # the interval's routing per routed layer
    steps: int  # training steps in the interval
    exchange: dict[str, float] = field(default_factory=dict)  # expert-parallel figures (empty without EP)
    ep_size: int = 1  # P: expert e lives on EP rank e // (E / P) (the images mark the ranks' blocks)


def balance_loss(prob_sums: np.ndarray) -> float:
    """log E − H(p̄) ≥ 0 in nats, mean over forwards; ``prob_sums [F, E + 1]``: per forward, the
    selection distribution summed over every rank's tokens, and the token count. p̄ is the whole
    batch's mean, as the σ-MoE regulariser's p (its loss is γ·(this − log E))."""
    if not len(prob_sums):
        return 0.0
    p = prob_sums[:, :-1] / np.maximum(prob_sums[:, -1:], 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
    return max(0.0, math.log(p.shape[1]) - float(h.mean()))


class IntervalMetrics:
    """``units``: also track which hidden units of each expert fire (each routed layer's
    ``track_units``: one index_add over the hidden activations per forward); ``exchange``: the
    all-to-all figures (training); off for evaluation forwards."""

    def __init__(
        self,
        ff_layers: Sequence[nn.Module],
        *,
        rank: int = 0,
        world_size: int = 1,
        units: bool = True,
        exchange: bool = True,
    ):
        self.ff_layers = list(ff_layers)
        self.routed = [i for i, ff in enumerate(self.ff_layers) if isinstance(ff, RoutedExperts)]
        self.ep = expert_parallel_layers(self.ff_layers) if exchange else []
        self.meters = exchange_meters(self.ff_layers) if exchange else []
        self.rank, self.world_size, self.units = rank, world_size, units
        for i in self.routed:
            self.ff_layers[i].track_units = self.ff_layers[i].track_units or units
        self._reset()

    def _reset(self) -> None:
        self._sums: dict[int, torch.Tensor] = {}  # layer -> [E] float64 counts, on its device
        self._probs: dict[int, list[tuple[torch.Tensor, int]]] = {i: [] for i in self.routed}  # per forward
        self._fired: dict[int, torch.Tensor] = {}  # layer -> [E_loc, G] bool, units fired here
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
        """Add the routing each routed layer left after this forward (no host sync)."""
        for i in self.routed:
            r = self.ff_layers[i].routing
            if r is None:
                continue
            counts = r.tokens_per_expert.detach()
            acc = self._sums.get(i)
            if acc is None:
                acc = self._sums[i] = torch.zeros(counts.numel(), dtype=torch.float64, device=counts.device)
            acc += counts
            self._probs[i].append((r.mean_probs, r.n_tokens))  # the whole batch's p̄ needs every rank's sums
            if self.units and r.units_fired is not None:
                fired = self._fired.get(i)
                self._fired[i] = r.units_fired if fired is None else fired | r.units_fired

    def end_step(self, step_seconds: float) -> None:
        self._steps += 1
        self._step_seconds += step_seconds
        if self.meters and self._at_begin is not None:
            self._exchange = self._exchange + (self._meter_totals() - self._at_begin)
            self._at_begin = None

    def _local_parts(self, i: int) -> list[torch.Tensor]:
        """Layer i's counts [E], per-forward selection sums [F, E + 1] and units fired [E, G] (at the
        global ids of the experts held here; a sum over ranks > 0 = fired on some rank)."""
        ff = self.ff_layers[i]
        counts = self._sums[i].cpu() if i in self._sums else torch.zeros(ff.n_experts, dtype=torch.float64)
        probs = torch.zeros(0, dtype=torch.float64)
        if self._probs[i]:
            sums = torch.stack([p.to(torch.float64) * n for p, n in self._probs[i]]).cpu()
            n_tokens = torch.tensor([[float(n)] for _, n in self._probs[i]], dtype=torch.float64)
            probs = torch.cat([sums, n_tokens], 1).flatten()
        parts = [counts, probs]
        if self.units:
            units = torch.zeros(ff.n_experts, ff.expert_size, dtype=torch.float64)
            if i in self._fired:
                here = local_experts(ff)
                units[here.start : here.stop] = self._fired[i].cpu().double()
            parts.append(units.flatten())
        return parts

    def reduce(self, train: dict[str, float]) -> LogStep:
        """All figures of the interval over all ranks, in one all-reduce (collective: every rank calls it
        on the same steps, after the same number of forwards, with the same ``train`` keys); then a new
        interval starts."""
        names = list(train)
        local = {i: self._local_parts(i) for i in self.routed}
        parts = [torch.tensor([float(train[n]) for n in names], dtype=torch.float64)]
        for i in self.routed:
            parts += local[i]
        parts += [torch.tensor(remote_rows(self.ff_layers[i], local[i][0]), dtype=torch.float64) for i in self.ep]
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
            n_e = self.ff_layers[i].n_experts
            counts, probs = next(values).numpy().copy(), next(values).view(-1, n_e + 1).numpy()
            units = (next(values).view(n_e, -1) > 0).double().mean(1).numpy() if self.units else None
            layers.append(LayerLoad(i, counts, balance_loss(probs), units))
        remote = {i: tuple(next(values).tolist()) for i in self.ep}
        log = LogStep(train=dict(zip(names, means.tolist())), layers=layers, steps=self._steps)
        if self.meters:
            block = next(values).view(len(_PER_RANK), self.world_size).numpy()
            log.exchange = _exchange_scalars(dict(zip(_PER_RANK, block)), self._steps)
            log.exchange.update(
                exchange_figures(
                    self.ff_layers, remote, {layer.index: torch.from_numpy(layer.counts) for layer in layers}
                )
            )
            log.ep_size = expert_shard(self.ff_layers[self.ep[0]]).ep_size
        self._reset()
        return log


def _exchange_scalars(per_rank: dict[str, np.ndarray], steps: int) -> dict[str, float]:
    """Per-step figures from each rank's interval totals: mean over ranks, the busiest rank's, and each
    rank's own (``ep_rank_XX/...``)."""
    steps = max(steps, 1)
    out = {}
    for name, values, scale in (
        ("a2a_mb_per_step", per_rank["bytes_sent"], 1e-6),
        ("a2a_ms_per_step", per_rank["seconds"], 1e3),
        ("tokens_received_per_step", per_rank["rows_received"], 1.0),
    ):
        per_step = values * scale / steps
        out[name], out[f"{name}_max"] = float(per_step.mean()), float(per_step.max())
    step_s = per_rank["step_seconds"]
    out["a2a_share_of_step"] = float(
        np.mean(np.divide(per_rank["seconds"], step_s, out=np.zeros_like(step_s), where=step_s > 0))
    )
    assignments = per_rank["expert_rows"] / steps
    mean = assignments.mean()
    out["ep_max_mean_assignments"] = float(assignments.max() / mean) if mean > 0 else 0.0
    for r, (a, ms) in enumerate(zip(assignments, per_rank["seconds"] * 1e3 / steps)):
        out[f"ep_rank_{r:02d}/assignments_per_step"], out[f"ep_rank_{r:02d}/a2a_ms_per_step"] = float(a), float(ms)
    return out
