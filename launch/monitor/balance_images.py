"""Routing images, each on one fixed colour scale (the same for every step, layer and run):

    balance_over_time   one routed layer: expert (rows) × logged step (columns, growing with training),
                        colour = load ÷ mean load (log2 from ¼ to 4: white = the fair share, blue =
                        under-used, red = overloaded, black = no assignment at all); beside it the
                        latest interval's exact load share per expert as bars
    units_over_time     the same grid, colour = share of the expert's hidden units that fired (0..1,
                        dark = few, yellow = all; black = no assignment), bars: the latest interval's
    load_heatmap        routed layer (rows) × expert (columns), the latest interval; ``sort=True``:
                        each layer's experts sorted by load, busiest first (the spread, for deep models)

Drawn for TensorBoard's image card (see ROW below), so labels stay legible without "actual size".
Under expert parallelism white lines separate the ranks' blocks of experts (rank j holds experts
[j·E/P, (j+1)·E/P)), labelled at the left. Experts are labelled one by one up to 16, then every 2nd,
4th (over 32) and 8th (over 64). Figures use matplotlib's Figure with the Agg canvas (no pyplot) and
axes rectangles fixed in inches, so a cell is at the same place in every image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

SCALE = (0.25, 4.0)  # load ÷ mean at the two ends of the colour scale (log2: -2 .. 2)
SCALE_TICKS = ((0.25, "¼"), (0.5, "½"), (1.0, "1"), (2.0, "2"), (4.0, "4"))
UNIT_TICKS = ((0.0, "0"), (0.5, "½"), (1.0, "1"))
LABEL_ALL_UP_TO = 16
MAX_COLUMNS = 1024  # an over-time image keeps at most this many columns (older ones are merged in pairs)
WIDTH = 4.2  # inches at 100 dpi: TensorBoard's default image card
NO_ASSIGNMENT = "black"


def colour_scale():
    """(colormap, norm) of every load image: log-scaled load ÷ mean, clipped to ¼..4; NaN (an expert
    with no assignment) is black. The diverging map stops short of its darkest ends, so a starved
    expert (mid blue) never looks like a dead one (black)."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap, LogNorm

    cmap = ListedColormap(colormaps["RdBu_r"](np.linspace(0.12, 0.88, 256)), name="load").with_extremes(
        bad=NO_ASSIGNMENT
    )
    return cmap, LogNorm(vmin=SCALE[0], vmax=SCALE[1], clip=True)


def units_scale():
    """(colormap, norm) of the hidden-unit images: share 0..1 on viridis (low end lifted off black)."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap, Normalize

    cmap = ListedColormap(colormaps["viridis"](np.linspace(0.1, 1.0, 256)), name="units")
    return cmap.with_extremes(bad=NO_ASSIGNMENT), Normalize(0.0, 1.0, clip=True)


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
    step = 1 if n <= LABEL_ALL_UP_TO else 2 if n <= 32 else 4 if n <= 64 else 8
    return np.arange(0, n, step)


def _colorbar(fig, rect, mappable, ticks) -> None:
    cax = fig.add_axes(rect)
    bar = fig.colorbar(mappable, cax=cax, extend="both" if ticks is SCALE_TICKS else "neither")
    bar.set_ticks([t for t, _ in ticks], labels=[s for _, s in ticks])
    bar.minorticks_off()
    cax.tick_params(labelsize=8, length=2, pad=1)


def _rank_blocks(ax, n_e: int, ep_size: int, *, axis: str) -> None:
    """White lines between the expert-parallel ranks' blocks of experts, each block labelled."""
    if ep_size <= 1:
        return
    per = n_e // ep_size
    line = ax.axhline if axis == "y" else ax.axvline
    for j in range(1, ep_size):
        line(j * per - 0.5, color="white", linewidth=1.2)
    if per >= 4 and ep_size <= 16:
        for j in range(ep_size):
            at = (j + 0.5) * per - 0.5
            if axis == "y":
                ax.text(
                    -0.14, at, f"rank {j}", transform=ax.get_yaxis_transform(), rotation=90, va="center", fontsize=7
                )
            else:
                ax.text(at, 1.01, f"rank {j}", transform=ax.get_xaxis_transform(), ha="center", fontsize=7)


def _rect(fig, left: float, bottom: float, width: float, height: float) -> tuple[float, ...]:
    """An axes rectangle given in inches from the figure's lower left corner, as figure fractions."""
    w, h = fig.get_size_inches()
    return left / w, bottom / h, width / w, height / h


def _step_ticks(ax, steps: Sequence[int]) -> None:
    """At most 4 step labels; the last one right-aligned, so 5-digit steps stay inside the grid."""
    n_t = len(steps)
    cols = np.unique(np.linspace(0, n_t - 1, min(n_t, 4)).round().astype(int))
    ax.set_xticks(cols, [str(steps[c]) for c in cols], fontsize=7)
    labels = ax.get_xticklabels()
    if len(cols) > 1:
        labels[0].set_horizontalalignment("left")
        labels[-1].set_horizontalalignment("right")


# TensorBoard's image card fits an image into about 380 × 215 px (its cards are at least 335 px wide and
# 320 px tall): a 16-expert over-time image is drawn at 420 × 270 px, so it shows at ~80 % of its size.
# Layout in inches at 100 dpi: margins, the grid, the bars, the colour bar; one expert row 0.12 in.
ROW = 0.12
TOP, BOTTOM, LEFT = 0.36, 0.42, 0.45
GRID_W, BARS_W, COLORBAR_W = 2.5, 0.6, 0.09


def over_time_layout(n_e: int) -> tuple[tuple[float, float], tuple, tuple, tuple]:
    """(figure size in inches, grid, bars and colour-bar rectangles in inches) of an over-time image."""
    grid_h = ROW * min(n_e, 64)
    height = TOP + grid_h + BOTTOM
    bars_x = LEFT + GRID_W + 0.1
    bar_x = bars_x + BARS_W + 0.1
    return (
        (WIDTH, height),
        (LEFT, BOTTOM, GRID_W, grid_h),
        (bars_x, BOTTOM, BARS_W, grid_h),
        (bar_x, BOTTOM, COLORBAR_W, grid_h),
    )


def _over_time(
    title: str,
    steps: Sequence[int],
    grid: np.ndarray,
    latest: np.ndarray,
    scale: tuple,
    *,
    ticks,
    bars_xlabel: str,
    bar_colours: Callable[[np.ndarray], list],
    lines: Sequence[tuple[float, str, str]],
    bars_min_xmax: float,
    ep_size: int,
):
    n_e, n_t = grid.shape
    size, grid_rect, bars_rect, colorbar_rect = over_time_layout(n_e)
    fig = _figure(*size)
    cmap, norm = scale
    ax = fig.add_axes(_rect(fig, *grid_rect))
    im = ax.imshow(
        grid,
        aspect="auto",
        cmap=cmap,
        norm=norm,
        interpolation="nearest",
        origin="upper",
        extent=(-0.5, n_t - 0.5, n_e - 0.5, -0.5),
    )
    ticks_e = _expert_ticks(n_e)
    ax.set_yticks(ticks_e, [str(t) for t in ticks_e], fontsize=6.5)
    ax.tick_params(length=2, pad=1)
    _step_ticks(ax, steps)
    if ep_size <= 1:  # else the ranks' labels stand there
        ax.set_ylabel("expert", fontsize=7, labelpad=1)
    fig.text(0.01, 1 - 0.04 / size[1], title, fontsize=7.5, va="top")
    _rank_blocks(ax, n_e, ep_size, axis="y")

    bars = fig.add_axes(_rect(fig, *bars_rect), sharey=ax)
    bars.barh(np.arange(n_e), latest, height=0.8, color=bar_colours(latest), edgecolor="0.3", linewidth=0.3)
    for x, style, _ in lines:
        bars.axvline(x, color="0.2", linewidth=0.8, linestyle=style)
    bars.set_xlim(0, max(float(np.nanmax(latest)), bars_min_xmax) * 1.05)
    bars.tick_params(axis="y", labelleft=False, length=0)
    bars.tick_params(axis="x", labelsize=6, length=2, pad=1)
    bars.xaxis.get_major_locator().set_params(nbins=2, prune="lower")  # no 0 beside the grid's last step
    bars.set_title(bars_xlabel, fontsize=6.5, pad=2)
    for j in range(1, max(ep_size, 1)):
        bars.axhline(j * (n_e // ep_size) - 0.5, color="0.6", linewidth=0.8)
    _colorbar(fig, _rect(fig, *colorbar_rect), im, ticks)
    legend = "  ".join(f"{'- -' if s == '--' else '···'} {what}" for _, s, what in lines)
    fig.text(
        0.01, 0.03 / size[1], f"columns: logged steps   ■ black: no assignment   {legend}", fontsize=6, color="0.15"
    )
    return fig


def balance_over_time(
    layer: int, steps: Sequence[int], counts: np.ndarray, share: np.ndarray, *, starved_below: float, ep_size: int = 1
):
    """``counts [E, T]``: assignments per expert in each of T logged intervals (ending at ``steps``);
    ``share [E]``: the latest interval's load share."""
    n_e = counts.shape[0]
    cmap, norm = colour_scale()
    fair = 1.0 / n_e
    return _over_time(
        f"layer {layer}: load ÷ mean load per expert",
        steps,
        load_ratio(counts),
        share,
        (cmap, norm),
        ticks=SCALE_TICKS,
        bars_xlabel=f"share @ {steps[-1]}",
        bar_colours=lambda s: [cmap(norm(r)) if r > 0 else NO_ASSIGNMENT for r in s * n_e],
        lines=[(fair, "--", "fair share 1/E"), (starved_below * fair, ":", f"starved < {starved_below:g}/E")],
        bars_min_xmax=2 * fair,
        ep_size=ep_size,
    )


def units_over_time(layer: int, steps: Sequence[int], units: np.ndarray, counts: np.ndarray, *, ep_size: int = 1):
    """``units [E, T]``: share of each expert's hidden units that fired in each logged interval;
    ``counts [E, T]``: its assignments (0 = no assignment: black)."""
    cmap, norm = units_scale()
    grid = np.where(np.asarray(counts) > 0, units, np.nan)
    latest = grid[:, -1]
    return _over_time(
        f"layer {layer}: share of an expert's hidden units that fired",
        steps,
        grid,
        np.nan_to_num(latest),
        (cmap, norm),
        ticks=UNIT_TICKS,
        bars_xlabel=f"units @ {steps[-1]}",
        bar_colours=lambda s: [cmap(norm(u)) if c > 0 else NO_ASSIGNMENT for u, c in zip(s, counts[:, -1])],
        lines=[(1.0, "--", "all units")],
        bars_min_xmax=1.0,
        ep_size=ep_size,
    )


def load_heatmap(
    layers: Sequence[int], counts: Sequence[np.ndarray], *, step: int, sort: bool = False, ep_size: int = 1
):
    """Routed layer (rows) × expert (columns) of one interval; ``counts[r]``: layer ``layers[r]``'s
    assignments per expert. ``sort``: each row's experts by load, busiest first (no rank blocks)."""
    n_e = max(len(c) for c in counts)
    grid = np.full((len(counts), n_e), np.nan)
    for row, c in enumerate(counts):
        ratio = load_ratio(c)
        grid[row, : len(c)] = -np.sort(-np.nan_to_num(ratio, nan=-1.0)) if sort else ratio
    grid[grid < 0] = np.nan  # sorted: the dead experts (NaN -> -1) last, black
    (width, height), axes_rect, colorbar_rect = heatmap_layout(len(counts), n_e)
    fig = _figure(width, height)
    cmap, norm = colour_scale()
    ax = fig.add_axes(axes_rect)
    im = ax.imshow(grid, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    if sort:
        ticks = np.unique(np.linspace(0, n_e - 1, min(n_e, 5)).round().astype(int))
        ax.set_xticks(ticks, [str(t + 1) for t in ticks], fontsize=7)
        ax.set_xlabel("experts by load, busiest first (n-th busiest)", fontsize=7, labelpad=1)
    else:
        ticks = _expert_ticks(n_e)
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=6 if n_e > 16 else 7)
        ax.set_xlabel("expert", fontsize=7, labelpad=1)
        _rank_blocks(ax, n_e, ep_size, axis="x")
    ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
    ax.tick_params(length=2, pad=1)
    ax.set_ylabel("layer", fontsize=8, labelpad=1)
    what = "sorted load" if sort else "load ÷ mean load"
    fig.text(0.01, 1 - 0.03 / height, f"{what}, interval ending at step {step} (black: none)", fontsize=7.5, va="top")
    _colorbar(fig, colorbar_rect, im, SCALE_TICKS)
    return fig


def heatmap_layout(n_layers: int, n_e: int) -> tuple[tuple[float, float], tuple, tuple]:
    """load_heatmap's (figure size in inches, heat map and colour bar rectangles as figure fractions):
    0.2 in per layer (0.8 in at least), as wide as the over-time images up to 32 experts."""
    width = WIDTH if n_e <= 32 else min(8.0, WIDTH + 0.05 * (n_e - 32))
    rows = max(0.2 * n_layers, 0.8)  # room for the colour bar's ticks
    height = 0.3 + rows + 0.38
    span = width - 0.4 - 0.1 - COLORBAR_W - 0.35
    heat = (0.4 / width, 0.38 / height, span / width, rows / height)
    bar = ((0.4 + span + 0.1) / width, 0.38 / height, COLORBAR_W / width, rows / height)
    return (width, height), heat, bar


class LoadHistory:
    """Each routed layer's per-interval values (load counts or shares, hidden-unit shares), for the
    over-time images (at most MAX_COLUMNS columns: when full, neighbouring intervals are merged in
    pairs with ``merge``, the merged column ending at the later step)."""

    def __init__(self, merge: Callable[[np.ndarray, np.ndarray], np.ndarray] = np.add) -> None:
        self.merge = merge
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
            merged_cols = [self.merge(cols[i], cols[i + 1]) for i in pairs] + ([cols[-1]] if len(cols) % 2 else [])
            merged_steps = [steps[i + 1] for i in pairs] + ([steps[-1]] if len(steps) % 2 else [])
            cols[:], steps[:] = merged_cols, merged_steps

    def matrix(self, layer: int) -> tuple[list[int], np.ndarray]:
        """(steps, values [E, T])."""
        return self.steps[layer], np.stack(self.columns[layer], axis=1)
