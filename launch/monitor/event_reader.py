"""Reading a finished run's TensorBoard events (its folder ``RUN_DIR/<run name>``, every events file of
it, so a resumed run reads as one): scalar curves and the per-layer expert load. Tags: :mod:`.tags`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sigma_moe.launch.monitor.config import LoggingConfig

# bucket e = expert e; tokens_per_expert: runs logged before load_share (counts of one step)
_LOAD_TAG = re.compile(r"routing/layer_(\d+)/(load_share|tokens_per_expert|units_used)$")


def run_tensorboard_dir(logging: LoggingConfig) -> Path:
    """The events folder of the run whose ``logging`` section this is: ``RUN_DIR/<run name>``, or the
    ``RUN_DIR/tensorboard`` of runs made before runs were named."""
    named = logging.tensorboard_dir()
    legacy = Path(logging.run_dir) / "tensorboard"
    return legacy if not named.is_dir() and legacy.is_dir() else named


@dataclass
class RunEvents:
    scalars: dict[str, list[tuple[int, float]]]  # tag -> [(step, value)] in step order
    expert_load: np.ndarray | None  # [routed layers, experts] load per expert at the last logged step
    load_layers: list[int]  # feedforward layer index of each row of expert_load

    def curve(self, tag: str) -> tuple[np.ndarray, np.ndarray]:
        pts = self.scalars.get(tag, [])
        return np.array([p[0] for p in pts], dtype=np.int64), np.array([p[1] for p in pts], dtype=np.float64)

    def last(self, tag: str) -> float | None:
        """The scalar's value at its last logged step (None if never logged)."""
        pts = self.scalars.get(tag)
        return pts[-1][1] if pts else None

    def median(self, tag: str, *, skip_first: int = 1) -> float | None:
        """Median of a scalar's logged values, leaving out the first ``skip_first`` (warm-up)."""
        _, v = self.curve(tag)
        if len(v) > skip_first:
            v = v[skip_first:]
        return float(np.median(v)) if len(v) else None


def _accumulator(tensorboard_dir: Path, images: int = 1):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(
        str(tensorboard_dir), size_guidance={"scalars": 0, "histograms": 0, "images": images, "tensors": 0}
    )
    acc.Reload()
    return acc


def read_load_history(
    tensorboard_dir: str | Path, figure: str = "load_share"
) -> dict[int, list[tuple[int, np.ndarray]]]:
    """Every logged ``figure`` (load_share, units_used) per routed layer: {layer: [(step, value per
    expert)]} in step order (the last write of a step wins)."""
    tb = Path(tensorboard_dir)
    if not tb.is_dir():
        return {}
    acc = _accumulator(tb)
    out = {}
    for tag in sorted(acc.Tags().get("histograms", [])):
        m = _LOAD_TAG.match(tag)
        if m and m.group(2) == figure:
            by_step = {e.step: np.asarray(e.histogram_value.bucket, dtype=np.float64) for e in acc.Histograms(tag)}
            out[int(m.group(1))] = sorted(by_step.items(), key=lambda p: p[0])
    return out


def read_run_events(tensorboard_dir: str | Path) -> RunEvents:
    tb = Path(tensorboard_dir)
    if not tb.is_dir():
        return RunEvents({}, None, [])
    acc = _accumulator(tb)
    tags = acc.Tags()
    scalars = {}
    for tag in tags.get("scalars", []):
        by_step = {e.step: e.value for e in acc.Scalars(tag)}  # a resumed run may log a step twice
        scalars[tag] = sorted(by_step.items())
    rows, layers = [], []
    for tag in sorted(tags.get("histograms", [])):
        m = _LOAD_TAG.match(tag)
        if not m or m.group(2) == "units_used":
            continue
        last = max(acc.Histograms(tag), key=lambda e: e.step).histogram_value
        rows.append(np.asarray(last.bucket, dtype=np.float64))  # bucket e = expert e (monitor's layout)
        layers.append(int(m.group(1)))
    load = None
    if rows:
        width = max(len(r) for r in rows)
        load = np.full((len(rows), width), np.nan)
        for i, r in enumerate(rows):
            load[i, : len(r)] = r
    return RunEvents(scalars, load, layers)
