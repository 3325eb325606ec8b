"""The comparison grid in TensorBoard (``sigma-moe board OUT``), written with the report:

each finished run's events folder   an extra events file (``*.hparams``, rewritten each time) with
                                    its HParams session, named ``NN [size-]variant-seedN`` (NN: its place):
                                    size, variant, seed, parameters, MLP FLOPs fraction, feedforward;
                                    and its results as scalars result/<metric>
OUT/_compare/                       the HParams experiment (the columns of the HParams tab), a
                                    custom-scalars layout that puts the variants' curves on one
                                    chart per figure, and the spec and results table as text
"""

from __future__ import annotations

import math
from pathlib import Path

from sigma_moe.launch.compare.run_spec import RunSpec
from sigma_moe.launch.compare.spec import CompareSpec
from sigma_moe.launch.monitor.event_reader import run_tensorboard_dir

COMPARE_DIR = "_compare"
HPARAMS_SUFFIX = ".hparams"

# (result scalar tag, how to read it from result.json): the HParams tab's metric columns
METRICS = {
    "result/valid_perplexity": lambda r: (r.get("valid") or {}).get("perplexity"),
    "result/test_perplexity": lambda r: (r.get("test") or {}).get("perplexity"),
    "result/tokens_per_s": lambda r: r.get("tokens_per_s"),
    "result/peak_mem_mib": lambda r: (r.get("cuda_peak_bytes") or r.get("peak_rss_bytes") or math.nan) / 2**20,
    "result/max_mean_load": lambda r: r.get("max_mean_load"),
}

# the custom-scalars layout: one chart per figure, every run's curve on it
LAYOUT = {
    "compare: quality": {
        "validation perplexity": ["Multiline", [r"^valid/perplexity$"]],
        "training cross-entropy (nats/token)": ["Multiline", [r"^train/ce$"]],
    },
    "compare: speed": {
        "tokens/s": ["Multiline", [r"^train/tokens_per_s$"]],
        "expert all-to-all share of the step": ["Multiline", [r"^routing/a2a_share_of_step$"]],
    },
    "compare: load balance": {
        "selection entropy, mean over layers (1 = uniform)": ["Multiline", [r"^routing/model/selection_entropy$"]],
        "max ÷ mean load, worst layer": ["Multiline", [r"^routing/model/max_mean_load$"]],
        "starved experts, all layers": ["Multiline", [r"^routing/model/starved_experts$"]],
        "dead experts, all layers": ["Multiline", [r"^routing/model/dead_experts$"]],
    },
}


def hparams_of(run: RunSpec) -> dict:
    """The HParams columns. TensorBoard orders them by name and shows the first five: variant_detail
    (the feedforward's shape) sorts last, so variant stays visible; the seed is a string (a number
    shows as 0.0000)."""
    return {
        "size": run.size,
        "variant": run.variant,
        "seed": str(run.seed),
        "variant_detail": run.cfg.model.ff.describe(),
        "params": run.params,
        "mlp_flops_fraction": run.mlp_flops / run.dense_mlp_flops,
    }


def _named_session(session_start, name: str):
    """The session-start summary with its group (the HParams tab's trial name) set to ``name``."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    meta = session_start.value[0].metadata
    data = plugin_data_pb2.HParamsPluginData.FromString(meta.plugin_data.content)
    data.session_start_info.group_name = name
    meta.plugin_data.content = data.SerializeToString()
    return session_start


def write_compare_tensorboard(
    out: Path, spec: CompareSpec, runs: list[RunSpec], results: dict[str, dict], results_markdown: str = ""
) -> list[Path]:
    """Write the grid's TensorBoard views (see the module docstring); returns the folders written."""
    from torch.utils.tensorboard import summary as tb_summary

    from sigma_moe.launch.monitor.event_writer import EventWriter, as_code_block
    from sigma_moe.launch.monitor.tags import describe

    finished = [r for r in runs if r.key in results]
    discrete = {k: sorted({str(hparams_of(r)[k]) for r in runs}) for k in ("size", "variant", "seed", "variant_detail")}
    written = []
    for run in finished:
        tb = run_tensorboard_dir(run.cfg.logging)
        _remove_events(tb, HPARAMS_SUFFIX)
        result = results[run.key]
        metrics = {tag: float(v) for tag, read in METRICS.items() if (v := read(result)) is not None}
        _, session_start, session_end = tb_summary.hparams(hparams_of(run), metrics, discrete)
        w = EventWriter(tb, describe=describe, filename_suffix=HPARAMS_SUFFIX)
        step = int(result.get("steps") or 0)
        # the trial's name: its place in the grid first (the HParams table cuts names at ~14 characters)
        trial = f"{runs.index(run) + 1:0{len(str(len(runs)))}d} {tb.name}"
        for summary in (_named_session(session_start, trial), session_end):
            w.write(summary, step)
        for tag, v in metrics.items():
            if math.isfinite(v):
                w.scalar(tag, v, step)
        w.close()
        written.append(tb)

    root = out / COMPARE_DIR
    _remove_events(root, "")
    w = EventWriter(root, describe=describe)
    if finished:  # the experiment: which hparams and metrics are the HParams tab's columns
        experiment, _, _ = tb_summary.hparams(hparams_of(finished[0]), {tag: 0.0 for tag in METRICS}, discrete)
        w.write(experiment, 0)
    w.custom_scalars(LAYOUT, 0)
    w.text("compare/spec", f"`{spec.path}`\n\n" + as_code_block(Path(spec.path).read_text()), 0)
    if results_markdown:
        w.text("compare/results", results_markdown, 0)
    w.close()
    return [*written, root]


def _remove_events(folder: Path, suffix: str) -> None:
    """Our own earlier events files of this kind (a report is rewritten whole each time)."""
    if folder.is_dir():
        for f in folder.glob("events.out.tfevents.*"):
            if f.name.endswith(suffix):
                f.unlink()
