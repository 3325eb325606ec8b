"""The ``checkpoint`` section of the run config (read by :meth:`CheckpointManager.from_config
<sigma_moe.launch.checkpoint.manager.CheckpointManager.from_config>` and the training loop)."""

from __future__ import annotations

from dataclasses import dataclass

from sigma_moe.config_check import Checked, Checks


@dataclass
class CheckpointConfig(Checked):
    every: int = 0
    """Steps between checkpoints; 0: only the final one."""
    keep_last: int = 2
    """Checkpoints kept in the folder (older ones are deleted)."""
    dir: str | None = None
    """The checkpoint folder; null: <logging.run_dir>/checkpoints."""
    resume: str = "auto"
    """auto: the latest in dir if any | none | the path of a checkpoint folder or of one step_* folder."""
    save_final: bool = True
    """Save a checkpoint at the end of training."""

    def check(self, c: Checks) -> None:
        c.require(self.every >= 0, "every", "must be >= 0 (0: only the final checkpoint)")
        c.positive("keep_last")
