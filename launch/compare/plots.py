"""The report's PNG plots (see :mod:`.report`): perplexity vs MLP FLOPs, the gap to the baseline per size,
learning curves, expert load.

``matplotlib.figure.Figure`` with the Agg canvas: no pyplot state, no display needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sigma_moe.launch.compare.run_spec import RunSpec
from sigma_moe.launch.monitor.event_reader import read_run_events, run_tensorboard_dir


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def _colors(names: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _variants(runs: list[RunSpec]) -> list[str]:
    return list(dict.fromkeys(r.variant for r in runs))


def perplexity_plot(path: Path, rows) -> Path:
    """Test perplexity (mean ± std over seeds) against MLP FLOPs per token; a line joins a variant's sizes."""
    from sigma_moe.launch.compare.report import mean_std

    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    names = list(dict.fromkeys(r.variant for r in rows))
    colors = _colors(names)
    for name in names:
        pts = []
        for row in rows:
            mean, std = mean_std(row.values(("test", "perplexity")))
            if row.variant == name and mean is not None:
                pts.append((row.mlp_flops, mean, std or 0.0, row.size))
        if not pts:
            continue
        pts.sort()
        x, y, e = (np.array([p[i] for p in pts]) for i in range(3))
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, color=colors[name], label=name)
        if len({p[3] for p in pts}) > 1:
            for p in pts:
                ax.annotate(p[3], (p[0], p[1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("MLP FLOPs per token (all layers, forward)")
    ax.set_ylabel("test perplexity")
    ax.set_title("perplexity vs MLP FLOPs at equal parameters")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def gap_plot(path: Path, sizes: list[str], gaps: dict[tuple[str, str], list[float]], baseline: str) -> Path:
    """Every variant's test perplexity relative to the baseline's (paired by seed), against size in the
    spec's order: each seed's gap as a dot, the mean ± std over seeds as a line with error bars."""
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    names = list(dict.fromkeys(variant for _, variant in gaps))
    colors = _colors(names)
    x_of = {size: i for i, size in enumerate(sizes)}
    for j, name in enumerate(names):
        pts = sorted((x_of[size], values) for (size, variant), values in gaps.items() if variant == name)
        shift = 0.06 * (j - (len(names) - 1) / 2)  # variants side by side at a size
        x = np.array([p[0] for p in pts]) + shift
        mean = np.array([100 * np.mean(p[1]) for p in pts])
        std = np.array([100 * np.std(p[1], ddof=1) if len(p[1]) > 1 else 0.0 for p in pts])
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, color=colors[name], label=name)
        for xi, (_, values) in zip(x, pts):
            ax.scatter([xi] * len(values), [100 * v for v in values], s=12, color=colors[name], alpha=0.5)
    ax.axhline(0, color="0.3", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(sizes)), sizes)
    ax.set_xlabel("size")
    ax.set_ylabel(f"test perplexity vs {baseline} (%)")
    ax.set_title(f"gap to {baseline} at equal parameters (dots: seeds; bars: std)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def learning_curves_plot(path: Path, runs: list[RunSpec], results: dict[str, dict]) -> Path:
    """One panel per size: training CE of every finished run (a colour per variant) and its
    validation loss points (periodic estimates and the final full evaluation)."""
    sizes = list(dict.fromkeys(r.size for r in runs))
    colors = _colors(_variants(runs))
    fig = _figure(7, 3.8 * len(sizes))
    for i, size in enumerate(sizes):
        ax = fig.add_subplot(len(sizes), 1, i + 1)
        labelled = set()
        for run in runs:
            if run.size != size or run.key not in results:
                continue
            ev = read_run_events(run_tensorboard_dir(run.cfg.logging))
            label = run.variant if run.variant not in labelled else None
            labelled.add(run.variant)
            steps, ce = ev.curve("train/ce")
            ax.plot(steps, ce, color=colors[run.variant], lw=1, alpha=0.8, label=label)
            vs, vl = ev.curve("valid/loss")
            ax.plot(vs, vl, "o", color=colors[run.variant], ms=3)
        ax.set_title(f"{size}: training CE (lines), validation loss (dots)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("nats per token")
        ax.grid(True, alpha=0.3)
        if labelled:
            ax.legend(fontsize=8)
            lo = min(ax.get_ylim()[1], _top(ax))
            ax.set_ylim(top=lo)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _top(ax) -> float:
    """Clip the first steps' huge loss: the y range covers the curves' last three quarters."""
    ys = [line.get_ydata()[len(line.get_ydata()) // 4 :] for line in ax.get_lines() if len(line.get_ydata())]
    ys = [y for y in ys if len(y)]
    return float(max(np.max(y) for y in ys)) * 1.05 if ys else ax.get_ylim()[1]


def expert_load_plot(path: Path, runs: list[RunSpec], results: dict[str, dict]) -> Path | None:
    """Per (size, routed variant), its lowest finished seed: layer × expert load / mean load at the
    last logged step. None (no file) when no run is routed."""
    from sigma_moe.launch.compare.report import expert_load_grid

    panels, seen = [], set()
    for run in runs:
        if run.key not in results or (run.size, run.variant) in seen:
            continue
        ev = read_run_events(run_tensorboard_dir(run.cfg.logging))
        if ev.expert_load is None:
            continue
        seen.add((run.size, run.variant))
        panels.append((run, ev))
    if not panels:
        return None
    from sigma_moe.launch.monitor.balance_images import SCALE_TICKS, colour_scale

    fig = _figure(8, 1.2 + 1.6 * len(panels))
    cmap, norm = colour_scale()  # TensorBoard's balance images' scale: the same colours mean the same load
    for i, (run, ev) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        grid = expert_load_grid(ev.expert_load)
        im = ax.imshow(np.where(grid > 0, grid, np.nan), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(
            f"{run.size}/{run.variant} (seed {run.seed}): load ÷ mean load of the layer, last logging "
            "interval (black: none)",
            fontsize=9,
        )
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(ev.load_layers)), [str(layer) for layer in ev.load_layers])
        ax.xaxis.get_major_locator().set_params(integer=True)
        bar = fig.colorbar(im, ax=ax, extend="both")
        bar.set_ticks([t for t, _ in SCALE_TICKS], labels=[label for _, label in SCALE_TICKS])
        bar.minorticks_off()
    ax.set_xlabel("expert")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
