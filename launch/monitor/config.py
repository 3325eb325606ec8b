"""The ``logging`` section of the run config: where the run's TensorBoard events go and what the
monitor reports (:class:`~sigma_moe.launch.monitor.run_monitor.Monitor` is built from it)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sigma_moe.config_check import Checked, Checks


@dataclass
class LoggingConfig(Checked):
    run_dir: str = "runs/default"
    """The run's folder: resolved config, TensorBoard events and (by default) checkpoints."""
    tensorboard: bool = True
    """Write TensorBoard events."""
    progress_bar: bool = True
    """A tqdm bar on rank 0 when its stderr is a terminal; otherwise (a log file, a pipe, or false) one
    plain line per training.log_every steps: step, loss, tokens/s, elapsed time, ETA."""
    name: str | None = None
    """TensorBoard run name, its events folder RUN_DIR/<name>; null: run_dir's last part."""
    starved_below: float = 0.25
    """An expert is "starved" over a logging interval below this fraction of the mean load."""
    images_every: int = 100
    """Steps between the load-balance images (and at the last step); 0: only at the end."""

    def tensorboard_dir(self) -> Path:
        """Where this run's TensorBoard events go: named after the run, so TensorBoard's run names differ."""
        return Path(self.run_dir) / tensorboard_run_name(self)

    def check(self, c: Checks) -> None:
        name = self.name
        if name is not None and (not name.strip() or name in (".", "..") or "/" in name or os.sep in name):
            c.add(
                "name", f"{name!r} must be one folder name (no '/'), e.g. my-run; it names the run's TensorBoard folder"
            )
        c.require(self.images_every >= 0, "images_every", "must be >= 0 (0: images only at the last step)")
        c.require(
            0 < self.starved_below <= 1, "starved_below", "must lie in (0, 1] (a fraction of the mean expert load)"
        )
        if not self.run_dir:
            c.add("run_dir", "must not be empty; set a folder such as runs/my-run")


def tensorboard_run_name(logging: LoggingConfig) -> str:
    return logging.name or Path(os.path.normpath(os.path.abspath(logging.run_dir))).name or "run"
