"""Monitoring: TensorBoard events (rank 0) and the console's progress (:mod:`.progress`). Every tag and
its meaning: :mod:`.tags` (each scalar carries its description in TensorBoard too).

The figures arrive already reduced over all ranks (:class:`.routing.IntervalMetrics`, one
all-reduce per log step); here rank 0 writes them:

    train/..., valid/..., test/...          scalars
    routing/layer_XX/<figure>               scalars of the logging interval (entropy, max/min ÷ mean,
                                            spread, starved, dead, balance loss, hidden units used;
                                            expert-parallel shares)
    routing/layer_XX/load_share             exact bars: bucket e = expert e's share of the routed slots
    routing/layer_XX/units_used             exact bars: bucket e = share of expert e's hidden units that fired
    routing/model/<figure>                  the same figures over all routed layers
    routing/<a2a figure>, routing/ep_rank_XX/<figure>   expert parallelism: mean, busiest and each rank
    routing/layer_XX/balance_over_time      image: expert × logged step, and the latest shares as bars
    routing/layer_XX/units_over_time        image: expert × logged step, hidden units that fired
    routing/load_heatmap, routing/sorted_load   images: layer × expert (sorted: busiest first), latest
    routing_valid/{layer_XX,model}/<figure> the routing scalars over each evaluation on the validation split
    run/config                              text: the resolved config
Images are drawn every ``images_every`` steps (at the first log step at or past each multiple) and at
the last step: each is a few hundred ms of matplotlib, and balance_over_time holds every logged
interval anyway.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sigma_moe.launch.monitor.balance_images import LoadHistory, balance_over_time, load_heatmap, units_over_time
from sigma_moe.launch.monitor.progress import Progress
from sigma_moe.launch.monitor.routing import LogStep, model_scalars
from sigma_moe.launch.monitor.tags import describe

if TYPE_CHECKING:
    from sigma_moe.launch.monitor.config import LoggingConfig

# Custom Scalars tab: every expert-parallel rank's series on one chart
EP_RANK_LAYOUT = {
    "expert parallelism, one line per rank": {
        "(token, slot) assignments its experts computed per step": [
            "Multiline",
            [r"^routing/ep_rank_\d+/assignments_per_step$"],
        ],
        "ms inside the all-to-alls per step": ["Multiline", [r"^routing/ep_rank_\d+/a2a_ms_per_step$"]],
    }
}


class Monitor:
    """Rank 0 writes TensorBoard events into ``tensorboard_dir`` and reports progress (a bar on a
    terminal, else a plain line every ``log_every`` steps); other ranks' calls do nothing."""

    def __init__(
        self,
        tensorboard_dir: str | Path,
        *,
        rank: int,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        progress_bar: bool = True,
        log_every: int = 1,
        starved_below: float = 0.25,
        images_every: int = 100,
        config_text: str | None = None,
    ):
        self.active = rank == 0
        self.writer = None
        self.console: Progress | None = None
        self.total_steps, self.starved_below, self.images_every = total_steps, starved_below, images_every
        self._rank_layout = False  # the per-rank charts' layout is written once
        self.history = LoadHistory()
        self.units_history = LoadHistory(merge=np.maximum)
        self._images_at = start_step  # step of the last images (or of the start)
        if not self.active:
            return
        if tensorboard:
            from sigma_moe.launch.monitor.event_writer import EventWriter, as_code_block

            if start_step:  # a resumed run: balance_over_time continues the logged intervals
                self._restore_history(Path(tensorboard_dir), start_step)
            self.writer = EventWriter(tensorboard_dir, describe=describe)
            if config_text is not None:
                self.writer.text("run/config", as_code_block(config_text), start_step)
        self.console = Progress(total_steps=total_steps, start_step=start_step, log_every=log_every, bar=progress_bar)

    @classmethod
    def from_config(
        cls,
        logging: LoggingConfig,
        *,
        rank: int,
        total_steps: int,
        start_step: int = 0,
        log_every: int = 1,
        config_text: str | None = None,
    ) -> Monitor:
        """The monitor of a run's ``logging`` section (``log_every``: training.log_every)."""
        return cls(
            logging.tensorboard_dir(),
            rank=rank,
            total_steps=total_steps,
            start_step=start_step,
            tensorboard=logging.tensorboard,
            progress_bar=logging.progress_bar,
            log_every=log_every,
            starved_below=logging.starved_below,
            images_every=logging.images_every,
            config_text=config_text,
        )

    def _restore_history(self, tensorboard_dir: Path, start_step: int) -> None:
        from sigma_moe.launch.monitor.event_reader import read_load_history

        for figure, history in (("load_share", self.history), ("units_used", self.units_history)):
            for layer, points in read_load_history(tensorboard_dir, figure).items():
                for step, values in points:
                    if step <= start_step:
                        history.add(layer, step, values)

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.console is not None:
            self.console.step(step, loss, tokens_per_s)

    def write(self, message: str) -> None:
        if not self.active:
            return
        self.console.write(message)

    def scalars(self, prefix: str, step: int, values: dict[str, float | None]) -> None:
        if self.writer is None:
            return
        for name, v in values.items():
            if v is not None and math.isfinite(v):
                self.writer.scalar(f"{prefix}/{name}", v, step)

    def routing(self, step: int, log: LogStep) -> None:
        """The interval's routing and all-to-all figures (every rank may call it; rank 0 writes)."""
        if self.writer is None:
            return
        for layer in log.layers:
            tag = f"routing/layer_{layer.index:02d}"
            self.writer.bars(f"{tag}/load_share", layer.share, step)
            self.history.add(layer.index, step, layer.share)
            if layer.units is not None:
                self.writer.bars(f"{tag}/units_used", layer.units, step)
                self.units_history.add(layer.index, step, layer.units)
        self.routing_scalars("routing", step, log)
        self.scalars("routing", step, log.exchange)
        if log.ep_size > 1 and not self._rank_layout:
            self._rank_layout = True
            self.writer.custom_scalars(EP_RANK_LAYOUT, step)
        if log.layers and self._images_due(step):
            self._images(step, log)

    def routing_scalars(self, prefix: str, step: int, log: LogStep) -> None:
        """Per layer and model routing scalars under ``prefix`` (routing, or routing_valid for an evaluation)."""
        for layer in log.layers:
            self.scalars(f"{prefix}/layer_{layer.index:02d}", step, layer.scalars(starved_below=self.starved_below))
        self.scalars(f"{prefix}/model", step, model_scalars(log.layers, starved_below=self.starved_below))

    def _images_due(self, step: int) -> bool:
        every = self.images_every
        return step >= self.total_steps or (every > 0 and step // every > self._images_at // every)

    def _images(self, step: int, log: LogStep) -> None:
        self._images_at = step
        for layer in log.layers:
            tag = f"routing/layer_{layer.index:02d}"
            steps, shares = self.history.matrix(layer.index)
            self.writer.figure(
                f"{tag}/balance_over_time",
                balance_over_time(
                    layer.index, steps, shares, layer.share, starved_below=self.starved_below, ep_size=log.ep_size
                ),
                step,
            )
            if layer.units is not None and self.units_history.steps.get(layer.index) == steps:
                _, units = self.units_history.matrix(layer.index)
                self.writer.figure(
                    f"{tag}/units_over_time",
                    units_over_time(layer.index, steps, units, shares, ep_size=log.ep_size),
                    step,
                )
        indices, counts = [layer.index for layer in log.layers], [layer.counts for layer in log.layers]
        self.writer.figure("routing/load_heatmap", load_heatmap(indices, counts, step=step, ep_size=log.ep_size), step)
        self.writer.figure("routing/sorted_load", load_heatmap(indices, counts, step=step, sort=True), step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.console is not None:
            self.console.close()
        if self.writer is not None:
            self.writer.close()
