"""Reading a finished run's TensorBoard events (``RUN_DIR/tensorboard``, every events file of it, so a
resumed run reads as one): scalar curves and the per-layer expert load. Tags: :mod:`monitor`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_LOAD_TAG = re.compile(r"routing/layer_(\d+)/tokens_per_expert$")


@dataclass
class RunEvents:
    scalars: dict[str, list[tuple[int, float]]]  # tag -> [(step, value)] in step order
    expert_load: np.ndarray | None  # [routed layers, experts] tokens per expert at the last logged step
    load_layers: list[int]  # feedforward layer index of each row of expert_load

    def curve(self, tag: str) -> tuple[np.ndarray, np.ndarray]:
        pts = self.scalars.get(tag, [])
        return np.array([p[0] for p in pts], dtype=np.int64), np.array([p[1] for p in pts], dtype=np.float64)

    def median(self, tag: str, *, skip_first: int = 1) -> float | None:
        """Median of a scalar's logged values, leaving out the first ``skip_first`` (warm-up)."""
        _, v = self.curve(tag)
        if len(v) > skip_first:
            v = v[skip_first:]
        return float(np.median(v)) if len(v) else None


def read_run_events(run_dir: str | Path) -> RunEvents:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = Path(run_dir) / "tensorboard"
    if not tb.is_dir():
        return RunEvents({}, None, [])
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0, "histograms": 0, "images": 1, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {}
    for tag in tags.get("scalars", []):
        by_step = {e.step: e.value for e in acc.Scalars(tag)}  # a resumed run may log a step twice
        scalars[tag] = sorted(by_step.items())
    rows, layers = [], []
    for tag in sorted(tags.get("histograms", [])):
        m = _LOAD_TAG.match(tag)
        if not m:
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
