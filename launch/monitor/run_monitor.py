"""Monitoring: TensorBoard events (rank 0) and the console's progress (:mod:`.progress`). Every tag and
its meaning: :mod:`.tags` (each scalar carries its description in TensorBoard too).

The figures arrive already reduced over all ranks (:class:`.routing.IntervalMetrics`, one
all-reduce per log step); here rank 0 writes them:

    train/..., valid/..., test/...          scalars
    routing/layer_XX/<figure>               scalars of the logging interval (entropy, max/min ÷ mean,
                                            starved, dead, balance loss; expert-parallel shares)
    routing/layer_XX/load_share             exact bars: bucket e = expert e's share of the routed slots
    routing/model/<figure>                  the same figures over all routed layers
    routing/<a2a figure>                    expert parallelism: mean and busiest rank
    routing/layer_XX/balance_over_time      image: expert × logged step, and the latest shares as bars
    routing/load_heatmap                    image: layer × expert, the latest interval
    run/config                              text: the resolved config
Images are drawn every ``images_every`` steps (at the first log step at or past each multiple) and at
the last step: each is a few hundred ms of matplotlib, and balance_over_time holds every logged
interval anyway.
"""

from __future__ import annotations

import math
from pathlib import Path

from sigma_moe.launch.monitor.balance_images import LoadHistory, balance_over_time, load_heatmap
from sigma_moe.launch.monitor.progress import Progress
from sigma_moe.launch.monitor.routing import LogStep, model_scalars
from sigma_moe.launch.monitor.tags import describe


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
        self.history = LoadHistory()
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

    def _restore_history(self, tensorboard_dir: Path, start_step: int) -> None:
        from sigma_moe.launch.monitor.event_reader import read_load_history

        for layer, points in read_load_history(tensorboard_dir).items():
            for step, share in points:
                if step <= start_step:
                    self.history.add(layer, step, share)

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
            self.scalars(tag, step, layer.scalars(starved_below=self.starved_below))
            self.writer.bars(f"{tag}/load_share", layer.share, step)
            self.history.add(layer.index, step, layer.share)
        self.scalars("routing/model", step, model_scalars(log.layers, starved_below=self.starved_below))
        self.scalars("routing", step, log.exchange)
        if log.expert_rows_per_rank is not None:
            self.writer.bars("routing/ep_expert_rows_per_rank", log.expert_rows_per_rank, step)
        if log.layers and self._images_due(step):
            self._images(step, log)

    def _images_due(self, step: int) -> bool:
        every = self.images_every
        return step >= self.total_steps or (every > 0 and step // every > self._images_at // every)

    def _images(self, step: int, log: LogStep) -> None:
        self._images_at = step
        for layer in log.layers:
            steps, shares = self.history.matrix(layer.index)
            self.writer.figure(
                f"routing/layer_{layer.index:02d}/balance_over_time",
                balance_over_time(layer.index, steps, shares, layer.share, starved_below=self.starved_below),
                step,
            )
        self.writer.figure(
            "routing/load_heatmap",
            load_heatmap([layer.index for layer in log.layers], [layer.counts for layer in log.layers], step=step),
            step,
        )

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.console is not None:
            self.console.close()
        if self.writer is not None:
            self.writer.close()
