"""Load-balance images on one fixed colour scale (load ÷ mean load, log2 from ¼ to 4, the same for every
step, layer and run; white = the fair share, blue = under-used, red = overloaded, black = no assignment):

    balance_over_time   one routed layer: expert (rows) × logged step (columns, growing with training),
                        and beside it the latest interval's exact load share per expert as bars
    load_heatmap        routed layer (rows) × expert (columns), the latest interval

Experts are labelled one by one up to 64, every 8th beyond. Figures use matplotlib's Figure with the
Agg canvas (no pyplot) and fixed axes rectangles, so a cell is at the same place in every image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SCALE = (0.25, 4.0)  # load ÷ mean at the two ends of the colour scale (log2: -2 .. 2)
SCALE_TICKS = ((0.25, "¼"), (0.5, "½"), (1.0, "1"), (2.0, "2"), (4.0, "4"))
LABEL_ALL_UP_TO = 64
MAX_COLUMNS = 1024  # balance_over_time keeps at most this many columns (older ones are merged in pairs)


def colour_scale():
    """(colormap, norm) of every load image: log-scaled load ÷ mean, clipped to ¼..4; NaN (an expert
    with no assignment) is black."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    cmap = colormaps["RdBu_r"].with_extremes(bad="black")
    return cmap, LogNorm(vmin=SCALE[0], vmax=SCALE[1], clip=True)


def load_ratio(counts: np.ndarray) -> np.ndarray:
    """Load ÷ mean load; experts with no assignment (or an interval with none) are NaN (drawn black)."""
    counts = np.asarray(counts, dtype=np.float64)
    mean = counts.mean(axis=0, keepdims=True) if counts.ndim > 1 else counts.mean()
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = counts / mean
    return np.where(counts > 0, ratio, np.nan)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _expert_ticks(n: int) -> np.ndarray:
    return np.arange(n) if n <= LABEL_ALL_UP_TO else np.arange(0, n, 8)


def _colorbar(fig, rect, mappable) -> None:
    cax = fig.add_axes(rect)
    bar = fig.colorbar(mappable, cax=cax, extend="both")
    bar.set_ticks([t for t, _ in SCALE_TICKS], labels=[s for _, s in SCALE_TICKS])
    bar.minorticks_off()
    bar.set_label("load ÷ mean load", fontsize=8)
    cax.tick_params(labelsize=8)


def _expert_rows_height(n_experts: int) -> float:
    return 1.4 + 0.14 * min(n_experts, LABEL_ALL_UP_TO) + (0.5 if n_experts > LABEL_ALL_UP_TO else 0.0)


# fixed rectangles (figure fractions): heat map, bars, colour bar
OVER_TIME_AXES = (0.09, 0.14, 0.58, 0.76)
OVER_TIME_BARS = (0.70, 0.14, 0.16, 0.76)
OVER_TIME_COLORBAR = (0.90, 0.14, 0.02, 0.76)


def balance_over_time(layer: int, steps: Sequence[int], counts: np.ndarray, share: np.ndarray, *, starved_below: float):
    """``counts [E, T]``: assignments per expert in each of T logged intervals (ending at ``steps``);
    ``share [E]``: the latest interval's load share."""
    n_e, n_t = counts.shape
    fig = _figure(9.0, _expert_rows_height(n_e))
    cmap, norm = colour_scale()
    ax = fig.add_axes(OVER_TIME_AXES)
    im = ax.imshow(
        load_ratio(counts),
        aspect="auto",
        cmap=cmap,
        norm=norm,
        interpolation="nearest",
        origin="upper",
        extent=(-0.5, n_t - 0.5, n_e - 0.5, -0.5),
    )
    ticks = _expert_ticks(n_e)
    ax.set_yticks(ticks, [str(t) for t in ticks], fontsize=7 if n_e > 16 else 8)
    cols = np.unique(np.linspace(0, n_t - 1, min(n_t, 6)).round().astype(int))
    ax.set_xticks(cols, [str(steps[c]) for c in cols], fontsize=8)
    ax.set_xlabel("step (end of each logging interval)", fontsize=8)
    ax.set_ylabel("expert", fontsize=8)
    ax.set_title(f"layer {layer}: load ÷ mean load over training", fontsize=9, loc="left")

    bars = fig.add_axes(OVER_TIME_BARS, sharey=ax)
    fair = 1.0 / n_e
    bars.barh(
        np.arange(n_e),
        share,
        height=0.8,
        color=[cmap(norm(r)) if r > 0 else "black" for r in share * n_e],
        edgecolor="0.3",
        linewidth=0.3,
    )
    bars.axvline(fair, color="0.2", linewidth=0.8, linestyle="--", label="fair share 1/E")
    bars.axvline(
        starved_below * fair, color="0.2", linewidth=0.8, linestyle=":", label=f"starved < {starved_below:g}/E"
    )
    bars.set_xlim(0, max(float(share.max()) * 1.05, 2 * fair))
    bars.tick_params(axis="y", labelleft=False)
    bars.tick_params(axis="x", labelsize=7)
    bars.set_xlabel(f"share, step {steps[-1]}", fontsize=8)
    bars.legend(fontsize=6, loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False, borderaxespad=0.2)
    _colorbar(fig, OVER_TIME_COLORBAR, im)
    return fig


SNAPSHOT_AXES = (0.08, 0.2, 0.8, 0.68)
SNAPSHOT_COLORBAR = (0.9, 0.2, 0.015, 0.68)


def load_heatmap(layers: Sequence[int], counts: Sequence[np.ndarray], *, step: int):
    """Routed layer (rows) × expert (columns) of one interval; ``counts[r]``: layer ``layers[r]``'s
    assignments per expert."""
    n_e = max(len(c) for c in counts)
    grid = np.full((len(counts), n_e), np.nan)
    for row, c in enumerate(counts):
        grid[row, : len(c)] = load_ratio(c)
    width = min(16.0, 3.0 + 0.16 * min(n_e, LABEL_ALL_UP_TO) + (0.03 * n_e if n_e > LABEL_ALL_UP_TO else 0))
    fig = _figure(width, 1.6 + 0.3 * len(counts))
    cmap, norm = colour_scale()
    ax = fig.add_axes(SNAPSHOT_AXES)
    im = ax.imshow(grid, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ticks = _expert_ticks(n_e)
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=6 if n_e > 32 else 8)
    ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=8)
    ax.set_xlabel("expert", fontsize=8)
    ax.set_ylabel("layer", fontsize=8)
    ax.set_title(f"load ÷ mean load, interval ending at step {step}", fontsize=9)
    _colorbar(fig, SNAPSHOT_COLORBAR, im)
    return fig


class LoadHistory:
    """Each routed layer's per-interval counts, for balance_over_time (at most MAX_COLUMNS columns:
    when full, neighbouring intervals are merged in pairs, the merged column ending at the later step)."""

    def __init__(self) -> None:
        self.steps: dict[int, list[int]] = {}
        self.columns: dict[int, list[np.ndarray]] = {}

    def add(self, layer: int, step: int, counts: np.ndarray) -> None:
        steps, cols = self.steps.setdefault(layer, []), self.columns.setdefault(layer, [])
        if steps and step <= steps[-1]:  # a resumed run logs a step again: keep the newer one
            keep = [i for i, s in enumerate(steps) if s < step]
            steps[:], cols[:] = [steps[i] for i in keep], [cols[i] for i in keep]
        steps.append(step)
        cols.append(np.asarray(counts, dtype=np.float64))
        if len(cols) > MAX_COLUMNS:
            pairs = range(0, len(cols) - 1, 2)
            merged_cols = [cols[i] + cols[i + 1] for i in pairs] + ([cols[-1]] if len(cols) % 2 else [])
            merged_steps = [steps[i + 1] for i in pairs] + ([steps[-1]] if len(steps) % 2 else [])
            cols[:], steps[:] = merged_cols, merged_steps

    def matrix(self, layer: int) -> tuple[list[int], np.ndarray]:
        """(steps, counts [E, T])."""
        return self.steps[layer], np.stack(self.columns[layer], axis=1)
