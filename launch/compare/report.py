"""The report of a comparison grid, from its runs' ``result.json`` files and TensorBoard events:

    OUT/results.md        table per (size, variant): parameters, MLP FLOPs per token and their fraction
                          of the parameter-equal dense MLP's, tokens/s, peak memory, valid and test
                          perplexity and bits per byte, the final max ÷ mean expert load (mean ± std
                          over seeds; std of one seed is blank)
    OUT/results.csv       the same figures, mean and std in separate columns
    OUT/runs.csv          one row per finished run
    OUT/perplexity_vs_flops.png   test perplexity vs MLP FLOPs per token, one line per variant over sizes
    OUT/gap_vs_size.png           with a baseline: every variant's test perplexity relative to it, per size
                                  (paired by seed; each seed, and mean ± std)
    OUT/learning_curves.png       training CE per size (every seed) and the validation points
    OUT/expert_load.png           per routed run: layer × expert load / mean load of the last logging interval,
                                  on the fixed log2 colour scale of the TensorBoard balance images

Plots use matplotlib's Agg canvas through ``matplotlib.figure.Figure`` (no pyplot, no display).
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sigma_moe.launch.compare.run_spec import RunSpec

MD, CSV, RUNS_CSV = "results.md", "results.csv", "runs.csv"
PPL_PLOT, CURVES_PLOT, LOAD_PLOT = "perplexity_vs_flops.png", "learning_curves.png", "expert_load.png"
GAP_PLOT = "gap_vs_size.png"

# (csv column, result key path, markdown header, format); mean ± std over seeds for each.
METRICS = [
    ("tokens_per_s", ("tokens_per_s",), "tokens/s", "{:,.0f}"),
    ("peak_mem_mib", ("peak_mem_mib",), "peak mem (MiB)", "{:,.0f}"),
    ("valid_ppl", ("valid", "perplexity"), "valid ppl", "{:.2f}"),
    ("test_ppl", ("test", "perplexity"), "test ppl", "{:.2f}"),
    ("valid_bpb", ("valid", "bits_per_byte"), "valid bpb", "{:.4f}"),
    ("test_bpb", ("test", "bits_per_byte"), "test bpb", "{:.4f}"),
    ("max_mean_load", ("max_mean_load",), "max ÷ mean load", "{:.2f}"),
]


@dataclass
class Row:
    """One (size, variant): its sizing (the same for every seed) and the finished seeds' results."""

    size: str
    variant: str
    ff: str
    params: int
    mlp_flops: int
    flops_fraction: float
    results: list[dict]

    def values(self, path: tuple[str, ...]) -> list[float]:
        out = []
        for r in self.results:
            v = r
            for k in path:
                v = v.get(k) if isinstance(v, dict) else None
            if v is not None and math.isfinite(v):
                out.append(float(v))
        return out


def mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def collect_rows(runs: list[RunSpec], results: dict[str, dict]) -> list[Row]:
    rows: dict[tuple[str, str], Row] = {}
    for run in runs:
        key = (run.size, run.variant)
        if key not in rows:
            rows[key] = Row(
                run.size,
                run.variant,
                run.cfg.model.ff.describe(),
                run.params,
                run.mlp_flops,
                run.mlp_flops / run.dense_mlp_flops,
                [],
            )
        if run.key in results:
            r = dict(results[run.key])
            peak = r.get("cuda_peak_bytes") or r.get("peak_rss_bytes")
            r["peak_mem_mib"] = peak / 2**20 if peak else None
            rows[key].results.append(r)
    return list(rows.values())


def write_report(out: Path, runs: list[RunSpec], results: dict[str, dict], baseline: str | None = None) -> list[Path]:
    """Write the tables and plots for the runs that have results; returns the files written.
    ``baseline``: a variant; results.md then also gives every variant's test perplexity relative to it."""
    out.mkdir(parents=True, exist_ok=True)
    rows = collect_rows(runs, results)
    files = [_markdown(out / MD, rows, runs), _csv(out / CSV, rows), _runs_csv(out / RUNS_CSV, runs, results)]
    if baseline is not None:
        with open(out / MD, "a") as f:
            f.write("\n" + gap_table(runs, results, baseline))
    if results:
        from sigma_moe.launch.compare.plots import expert_load_plot, gap_plot, learning_curves_plot, perplexity_plot

        files.append(perplexity_plot(out / PPL_PLOT, rows))
        gaps = test_ppl_gaps(runs, results, baseline) if baseline is not None else {}
        if gaps:
            files.append(gap_plot(out / GAP_PLOT, list(dict.fromkeys(r.size for r in runs)), gaps, baseline))
        files.append(learning_curves_plot(out / CURVES_PLOT, runs, results))
        load = expert_load_plot(out / LOAD_PLOT, runs, results)
        if load is not None:
            files.append(load)
    return files


def test_ppl_gaps(runs: list[RunSpec], results: dict[str, dict], baseline: str) -> dict[tuple[str, str], list[float]]:
    """(size, variant) -> test perplexity ÷ the baseline's - 1, one value per seed both finished
    (paired by seed: the same data order and initialisation seed)."""
    ppl = {(r.size, r.variant, r.seed): results[r.key]["test"]["perplexity"] for r in runs if r.key in results}
    gaps: dict[tuple[str, str], list[float]] = {}
    for (size, variant, seed), value in ppl.items():
        base = ppl.get((size, baseline, seed))
        if variant != baseline and base:
            gaps.setdefault((size, variant), []).append(value / base - 1)
    return gaps


def gap_table(runs: list[RunSpec], results: dict[str, dict], baseline: str) -> str:
    lines = [
        f"Test perplexity relative to {baseline} (paired by seed; mean ± std over seeds):",
        "",
        "| size | variant | seeds | gap |",
        "|---|---|---|---|",
    ]
    for (size, variant), values in test_ppl_gaps(runs, results, baseline).items():
        mean, std = mean_std(values)
        spread = f" ± {std:.2%}" if std is not None else ""
        lines.append(f"| {size} | {variant} | {len(values)} | {mean:+.2%}{spread} |")
    return "\n".join(lines) + "\n"


def _fmt(fmt: str, mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if std is not None else "")


def _markdown(path: Path, rows: list[Row], runs: list[RunSpec]) -> Path:
    head = ["size", "variant", "feedforward", "seeds", "params", "MLP FLOPs/token", "of dense"]
    head += [m[2] for m in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        n_planned = sum(1 for r in runs if (r.size, r.variant) == (row.size, row.variant))
        cells = [
            row.size,
            row.variant,
            row.ff,
            f"{len(row.results)}/{n_planned}",
            f"{row.params:,}",
            f"{row.mlp_flops:,}",
            f"{row.flops_fraction:.1%}",
        ]
        cells += [_fmt(fmt, *mean_std(row.values(p))) for _, p, _, fmt in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "\nMean ± standard deviation over the finished seeds (seeds column: finished/planned). "
        "MLP FLOPs: multiply-adds × 2 per token, forward, summed over layers; 'of dense': of the dense "
        "MLP with the same parameter count. Peak memory: GPU allocator peak on CUDA, else the run "
        "process's peak RSS. Max ÷ mean load: the busiest expert's assignments ÷ the mean, worst layer, "
        "last logging interval (1 = balanced; – for unrouted variants).\n"
    )
    path.write_text("\n".join(lines) + "\n" + note)
    return path


def _csv(path: Path, rows: list[Row]) -> Path:
    head = ["size", "variant", "feedforward", "n_seeds", "params", "mlp_flops_per_token", "mlp_flops_fraction"]
    for col, *_ in METRICS:
        head += [f"{col}_mean", f"{col}_std"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for row in rows:
            cells = [
                row.size,
                row.variant,
                row.ff,
                len(row.results),
                row.params,
                row.mlp_flops,
                f"{row.flops_fraction:.6f}",
            ]
            for _, p, _, _ in METRICS:
                cells += ["" if v is None else f"{v:.6g}" for v in mean_std(row.values(p))]
            w.writerow(cells)
    return path


def _runs_csv(path: Path, runs: list[RunSpec], results: dict[str, dict]) -> Path:
    head = [
        "size",
        "variant",
        "seed",
        "run_dir",
        "steps",
        "params",
        "mlp_flops_per_token",
        "tokens_per_s",
        "peak_rss_bytes",
        "cuda_peak_bytes",
        "wall_seconds",
        "valid_loss",
        "valid_ppl",
        "valid_bpb",
        "test_loss",
        "test_ppl",
        "test_bpb",
        "max_mean_load",
    ]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for run in runs:
            r = results.get(run.key)
            if r is None:
                continue
            v, t = r["valid"], r["test"]
            cells = [
                run.size,
                run.variant,
                run.seed,
                str(run.run_dir),
                r["steps"],
                r["params"],
                r["mlp_flops_per_token"],
                r["tokens_per_s"],
                r["peak_rss_bytes"],
                r["cuda_peak_bytes"],
                r["wall_seconds"],
                v["loss"],
                v["perplexity"],
                v["bits_per_byte"],
                t["loss"],
                t["perplexity"],
                t["bits_per_byte"],
                r.get("max_mean_load"),
            ]
            w.writerow(["" if c is None else (f"{c:.6g}" if isinstance(c, float) else c) for c in cells])
    return path


def expert_load_grid(load: np.ndarray) -> np.ndarray:
    """tokens per expert [layers, experts] -> load / mean load of its layer (NaN where no expert)."""
    mean = np.nanmean(load, axis=1, keepdims=True)
    return load / np.where(mean > 0, mean, 1.0)
