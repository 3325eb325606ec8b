"""A TensorBoard event writer with what the monitor needs beyond ``SummaryWriter``: every value carries
its tag's description (summary metadata, written with the tag's first value, which is the one
TensorBoard keeps), exact bars as histograms, PNG images of matplotlib figures, markdown text.

Exact bars: bucket i holds ``values[i]`` between edges i − 0.5 and i + 0.5. TensorBoard drops empty
buckets at both ends and takes the first kept bucket's left edge from ``min``, the last one's right edge
from ``max``: so ``min``/``max`` are the first/last non-empty id ∓ 0.5, and every bucket it draws is one
id wide and in its place. The event file holds every value exactly; TensorBoard's histogram card then
resamples all histograms of a tag onto 30 equal-width bars for drawing (exact for up to 30 ids only
when the id range divides into them; the images are the exact per-expert views).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import summary as tb_summary
from torch.utils.tensorboard.writer import FileWriter


def bars_summary(tag: str, values: Sequence[float]) -> Summary:
    """Histogram ``tag`` whose bucket i (edges i ± 0.5) holds ``values[i]``."""
    v = np.asarray(values, dtype=np.float64)
    ids = np.arange(len(v), dtype=np.float64)
    filled = np.flatnonzero(v)
    lo, hi = (filled[0], filled[-1]) if filled.size else (0, len(v) - 1)
    return tb_summary.histogram_raw(
        tag,
        min=lo - 0.5,
        max=hi + 0.5,
        num=float(v.sum()),
        sum=float((ids * v).sum()),
        sum_squares=float((ids * ids * v).sum()),
        bucket_limits=(ids + 0.5).tolist(),
        bucket_counts=v.tolist(),
    )


def figure_png(fig) -> tuple[bytes, int, int]:
    """PNG bytes, width and height of a matplotlib figure (Agg; no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    buf = io.BytesIO()
    canvas.print_png(buf)  # one draw
    width, height = canvas.get_width_height()
    return buf.getvalue(), width, height


_PLUGIN = {"simple_value": "scalars", "histo": "histograms", "image": "images"}  # TensorBoard's plugin names


class EventWriter:
    """Writes TensorBoard events into ``log_dir``; ``describe(tag)`` gives each tag's description."""

    def __init__(
        self, log_dir: str | Path, *, describe: Callable[[str], str] = lambda tag: "", filename_suffix: str = ""
    ):
        self.log_dir = Path(log_dir)
        self.describe = describe
        self._writer = FileWriter(str(self.log_dir), filename_suffix=filename_suffix)
        self._described: set[str] = set()

    def write(self, summary: Summary, step: int) -> None:
        """Write ``summary``, adding each value's description the first time its tag is written."""
        for value in summary.value:
            if value.tag not in self._described:  # TensorBoard keeps the first metadata of a tag
                self._described.add(value.tag)
                value.metadata.summary_description = self.describe(value.tag)
                if not value.metadata.plugin_data.plugin_name:
                    value.metadata.plugin_data.plugin_name = _PLUGIN.get(value.WhichOneof("value"), "")
        self._writer.add_summary(summary, step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.write(Summary(value=[Summary.Value(tag=tag, simple_value=float(value))]), step)

    def bars(self, tag: str, values: Sequence[float], step: int) -> None:
        self.write(bars_summary(tag, values), step)

    def figure(self, tag: str, fig, step: int) -> None:
        png, width, height = figure_png(fig)
        image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
        self.write(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def custom_scalars(self, layout: dict, step: int) -> None:
        """A Custom Scalars layout: {category: {chart title: ["Multiline", [tag regex, ...]]}}."""
        self.write(tb_summary.custom_scalars(layout), step)

    def text(self, tag: str, markdown: str, step: int) -> None:
        from tensorboard.plugins.text.summary_v2 import text_pb

        self.write(text_pb(tag, markdown), step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def as_code_block(text: str) -> str:
    """Markdown that TensorBoard's text view shows verbatim (an indented code block)."""
    return "\n".join("    " + line for line in text.splitlines())
