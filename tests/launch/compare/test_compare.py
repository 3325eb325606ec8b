"""`sigma-moe compare`: a two-run grid of tiny models end to end in child processes (tables and plots
checked against the runs), resuming, and the CLI (dry run, --only, a bad spec). The spec's errors and
the committed specs' grids: test_compare_spec.py; the report from given results: test_compare_report.py."""

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from launch_helpers import ROOT, SLICE
from sigma_moe.config_check import ConfigError
from sigma_moe.launch.compare import grid as grid_module
from sigma_moe.launch.compare.grid import RESULT, collect_results, compare_main, run_grid
from sigma_moe.launch.compare.spec import expand_grid, load_spec
from sigma_moe.launch.config import load_config
from sigma_moe.layers import TransformerLM, count_parameters

TINY_SPEC = ROOT / "configs" / "compare" / "tiny.yaml"
COMPARE = ROOT / "configs" / "compare"


def two_run_overrides(cache: Path) -> list[str]:
    return [f"data.path={SLICE}", f"data.cache_dir={cache}"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The tiny spec with one seed of each variant (two runs), trained in child processes."""
    tmp = tmp_path_factory.mktemp("compare")
    spec_path = tmp / "spec.yaml"
    text = TINY_SPEC.read_text().replace("config: ../tiny.yaml", f"config: {ROOT / 'configs' / 'tiny.yaml'}")
    spec_path.write_text(text.replace("seeds: [0, 1]", "seeds: [0]"))
    out = tmp / "out"
    messages = []
    status = compare_main(
        str(spec_path), out=str(out), overrides=two_run_overrides(tmp / "cache"), echo=messages.append
    )
    return spec_path, out, tmp / "cache", status, messages


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_grid_runs_and_writes_results(grid):
    spec_path, out, cache, status, messages = grid
    assert status == 0, messages
    spec = load_spec(spec_path)
    runs = expand_grid(spec, out, two_run_overrides(cache))
    assert [r.key for r in runs] == ["default/sigma_moe/seed0", "default/dense/seed0"]
    for run in runs:
        res = json.loads((run.run_dir / RESULT).read_text())
        assert res["steps"] == 10 and res["start_step"] == 0
        cfg = load_config(run.run_dir / "run.yaml")
        with torch.device("meta"):
            assert res["params"] == count_parameters(TransformerLM(cfg.model))  # the trained model's size
        assert math.isclose(res["test"]["perplexity"], math.exp(res["test"]["loss"]), rel_tol=1e-9)
        assert 100 * 2**20 < res["peak_rss_bytes"] < 32 * 2**30  # torch alone is > 100 MiB
        assert res["tokens_per_s"] > 0
        tb = run.run_dir / f"{run.variant}-seed{run.seed}"  # named after the run: TensorBoard tells them apart
        assert cfg.logging.tensorboard_dir() == tb and any(tb.glob("events.*"))
    sigma, dense = (json.loads((r.run_dir / RESULT).read_text()) for r in runs)
    assert abs(dense["params"] - sigma["params"]) / sigma["params"] < 3e-3  # d_ff step is 65 of 33k here
    assert dense["ff"]["d_ff"] == 64 and dense["mlp_flops_fraction"] == 1.0
    assert sigma["mlp_flops_fraction"] == pytest.approx((2 * 16 * 32 * 4 + 4 * 32 * 2) / (2 * 2 * 32 * 64))


def test_tensorboard_holds_hparams_layout_and_config(grid):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.hparams import plugin_data_pb2

    spec_path, out, cache, _, _ = grid
    runs = expand_grid(load_spec(spec_path), out, two_run_overrides(cache))
    results = collect_results(runs)
    for run in runs:
        acc = EventAccumulator(str(run.cfg.logging.tensorboard_dir()), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        meta = acc.SummaryMetadata("_hparams_/session_start_info")
        start = plugin_data_pb2.HParamsPluginData.FromString(meta.plugin_data.content).session_start_info
        assert start.hparams["variant"].string_value == run.variant and start.hparams["seed"].string_value == "0"
        assert start.group_name == f"{runs.index(run) + 1} {run.variant}-seed0"  # the trial: distinct from its start
        assert start.hparams["params"].number_value == run.params
        res = results[run.key]
        got = {t: acc.Scalars(t)[-1].value for t in acc.Tags()["scalars"] if t.startswith("result/")}
        assert got == pytest.approx(
            {
                "result/valid_perplexity": res["valid"]["perplexity"],
                "result/test_perplexity": res["test"]["perplexity"],
                "result/tokens_per_s": res["tokens_per_s"],
                "result/peak_mem_mib": res["peak_rss_bytes"] / 2**20,
                **({"result/max_mean_load": res["max_mean_load"]} if run.variant == "sigma_moe" else {}),
            },
            rel=1e-6,
        )
        assert "model:" in acc.Tensors("run/config")[0].tensor_proto.string_val[0].decode()
    root = EventAccumulator(str(out / "_compare"), size_guidance={"tensors": 0})
    root.Reload()
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        root.SummaryMetadata("_hparams_/experiment").plugin_data.content
    ).experiment
    # TensorBoard shows the first five columns by name: the variant among them
    shown = sorted(h.name for h in experiment.hparam_infos)[:5]
    assert shown == ["mlp_flops_fraction", "params", "seed", "size", "variant"]
    assert {h.name for h in experiment.hparam_infos} == {*shown, "variant_detail"}
    assert "result/test_perplexity" in {m.name.tag for m in experiment.metric_infos}
    layout = layout_pb2.Layout.FromString(root.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["validation perplexity"] == ["^valid/perplexity$"]
    compare_main(
        str(spec_path), out=str(out), overrides=two_run_overrides(cache), report_only=True, echo=lambda m: None
    )
    tb = runs[0].cfg.logging.tensorboard_dir()
    assert len(list(tb.glob("events.*.hparams"))) == 1  # a report rewrites its own events, never piles them up


def test_report_tables_match_the_runs(grid):
    _, out, _, _, _ = grid
    results = {
        f"default/{v}/seed0": json.loads((out / "default" / v / "seed0" / RESULT).read_text())
        for v in ("sigma_moe", "dense")
    }
    rows = read_csv(out / "results.csv")
    assert [r["variant"] for r in rows] == ["sigma_moe", "dense"]
    for row in rows:
        res = results[f"default/{row['variant']}/seed0"]
        assert int(row["params"]) == res["params"] and int(row["n_seeds"]) == 1
        assert float(row["test_ppl_mean"]) == pytest.approx(res["test"]["perplexity"], rel=1e-5)
        assert float(row["valid_bpb_mean"]) == pytest.approx(res["valid"]["bits_per_byte"], rel=1e-5)
        assert row["test_ppl_std"] == ""  # one seed: no spread
        assert float(row["mlp_flops_fraction"]) == pytest.approx(res["mlp_flops_fraction"], rel=1e-5)
    assert len(read_csv(out / "runs.csv")) == 2
    md = (out / "results.md").read_text().splitlines()
    table = [line for line in md if line.startswith("| default")]
    assert len(table) == 2 and "sigma_moe" in table[0] and "100.0%" in table[1]
    assert f"{results['default/dense/seed0']['test']['perplexity']:.2f}" in table[1]
    load = results["default/sigma_moe/seed0"]["max_mean_load"]  # the load-balance figure: routed runs only
    assert 1 <= load <= 4 and table[0].endswith(f"| {load:.2f} |") and table[1].endswith("| – |")


def test_report_plots_are_pngs(grid):
    import matplotlib.image

    _, out, _, _, _ = grid
    for name in ("perplexity_vs_flops.png", "learning_curves.png", "expert_load.png"):
        img = matplotlib.image.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
        assert np.ptp(img[..., :3]) > 0.5  # something drawn, not a blank canvas


def test_rerun_skips_finished_runs(grid, monkeypatch):
    spec_path, out, cache, _, _ = grid
    results = sorted(out.glob("*/*/seed*/" + RESULT))
    logs = sorted(out.glob("*/*/seed*/log.txt"))
    before = [(p.stat().st_mtime_ns, p.read_bytes()) for p in results + logs]

    def no_child(*a, **k):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(grid_module.subprocess, "Popen", no_child)
    messages = []
    assert compare_main(str(spec_path), out=str(out), overrides=two_run_overrides(cache), echo=messages.append) == 0
    assert [(p.stat().st_mtime_ns, p.read_bytes()) for p in results + logs] == before
    assert any("2 of 2 runs already finished" in m for m in messages)


def test_half_finished_grid_runs_only_the_rest(grid, monkeypatch, tmp_path):
    spec_path, out, cache, _, _ = grid
    spec = load_spec(spec_path)
    runs = expand_grid(spec, out, two_run_overrides(cache))
    started = []
    monkeypatch.setattr(
        grid_module,
        "_run_one",
        lambda spec, run: (
            started.append(run.key)
            or {"wall_seconds": 0, "valid": {"perplexity": 1}, "test": {"perplexity": 1}, "tokens_per_s": 1}
        ),
    )
    hidden = runs[1].run_dir / RESULT
    os.replace(hidden, tmp_path / RESULT)  # as if the dense run had been interrupted
    try:
        outcome = run_grid(spec, runs, echo=lambda m: None)
    finally:
        os.replace(tmp_path / RESULT, hidden)
    assert started == ["default/dense/seed0"] and outcome.skipped == ["default/sigma_moe/seed0"]


def test_changed_config_is_not_silently_reused(grid):
    spec_path, out, cache, _, _ = grid
    runs = expand_grid(load_spec(spec_path), out, two_run_overrides(cache) + ["training.steps=11"])
    with pytest.raises(ConfigError, match="different config"):
        collect_results(runs)


def test_cli_dry_run_and_bad_spec(capsys, tmp_path):
    from sigma_moe.launch.cli import main

    assert main(["compare", str(TINY_SPEC), "--dry-run"]) == 0
    assert "default/dense: dense {'d_ff': 64" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("variants: {}\n")
    assert main(["compare", str(bad)]) == 2
    assert "missing required key(s) ['config', 'match']" in capsys.readouterr().err


def test_cli_only_picks_runs_by_key_glob(capsys):
    from sigma_moe.launch.cli import main

    ladder = str(COMPARE / "ladder.yaml")
    assert main(["compare", ladder, "--dry-run", "--only", "r3/*", "--only", "r1/dense/seed1"]) == 0
    out = capsys.readouterr().out
    assert "5 runs under" in out and "r3/sigma_moe:" in out and "r1/dense:" in out and "r2/" not in out
    assert main(["compare", ladder, "--dry-run", "--only", "r9/*"]) == 2
    err = capsys.readouterr().err
    assert "--only 'r9/*' matches no run of this spec" in err and "r1/sigma_moe/seed0" in err
