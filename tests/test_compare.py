"""`sigma-moe compare`: spec errors, grid sizing (the committed specs included), a two-run grid of tiny
models end to end in child processes (tables and plots checked against the runs), and resuming."""

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from launch_helpers import ROOT, SLICE
from sigma_moe.launch.compare import grid as grid_module
from sigma_moe.launch.compare.grid import RESULT, collect_results, compare_main, run_grid
from sigma_moe.launch.compare.report import collect_rows, mean_std
from sigma_moe.launch.compare.spec import expand_grid, load_spec, spec_from_dict
from sigma_moe.launch.config import ConfigError, config_to_dict, load_config
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


def test_mean_and_std_over_seeds():
    spec = load_spec(TINY_SPEC)
    runs = expand_grid(spec, "/nonexistent")
    ppl = [10.0, 12.5]
    results = {
        r.key: {"test": {"perplexity": ppl[r.seed]}, "peak_rss_bytes": 2**30, "cuda_peak_bytes": None}
        for r in runs
        if r.variant == "sigma_moe"
    }
    rows = collect_rows(runs, results)
    sigma, dense = rows
    assert mean_std(sigma.values(("test", "perplexity"))) == pytest.approx((11.25, float(np.std(ppl, ddof=1))))
    assert sigma.values(("peak_mem_mib",)) == [1024.0, 1024.0] and dense.results == []


def test_report_describes_a_feedforward_kind_it_does_not_know(tmp_path):
    """The report asks the config to describe itself: a variant it was not written for (no n_experts,
    nothing routed) gets a row, and the known ones keep their short forms."""
    from dataclasses import dataclass, replace

    from sigma_moe.launch.compare.report import MD, write_report
    from sigma_moe.launch.compare.tensorboard_export import hparams_of
    from sigma_moe.layers import FeedForwardConfig

    @dataclass(kw_only=True)
    class GatedConfig(FeedForwardConfig):
        kind: str = "gated_test"
        width: int = 48

    runs = expand_grid(load_spec(TINY_SPEC), "/nonexistent")
    dense = next(r for r in runs if r.variant == "dense")
    gated = replace(dense, variant="gated", cfg=replace(dense.cfg, model=replace(dense.cfg.model, ff=GatedConfig())))
    write_report(tmp_path, [*runs, gated], {})
    table = (tmp_path / MD).read_text()
    assert "| gated | width 48 |" in table and "| sigma_moe | 4×16, K 2 |" in table
    assert f"| dense | d_ff {dense.cfg.model.ff.d_ff} |" in table
    assert hparams_of(gated)["variant_detail"] == "width 48"


def test_gap_table_pairs_seeds_with_the_baseline():
    from sigma_moe.launch.compare.report import gap_table, test_ppl_gaps

    runs = expand_grid(load_spec(TINY_SPEC), "/nonexistent")
    ppl = {("sigma_moe", 0): 11.0, ("sigma_moe", 1): 13.0, ("dense", 0): 10.0}  # dense seed 1 unfinished
    results = {r.key: {"test": {"perplexity": ppl[(r.variant, r.seed)]}} for r in runs if (r.variant, r.seed) in ppl}
    gaps = test_ppl_gaps(runs, results, "dense")
    assert gaps == {("default", "sigma_moe"): [pytest.approx(0.1)]}  # seed 1 has no dense partner
    assert "| default | sigma_moe | 1 | +10.00% |" in gap_table(runs, results, "dense")


def test_gap_plot_draws_every_seed(tmp_path):
    import matplotlib.image

    from sigma_moe.launch.compare.plots import gap_plot

    gaps = {("r1", "sigma_moe"): [0.09, 0.088], ("r2", "sigma_moe"): [0.086], ("r2", "switch"): [0.3]}
    img = matplotlib.image.imread(gap_plot(tmp_path / "gap.png", ["r1", "r2"], gaps, "dense"))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert np.ptp(img[..., :3]) > 0.5  # something drawn, not a blank canvas


def test_a_run_finished_before_a_config_field_was_added_is_reused():
    """An older run.yaml lacks the fields added since; at their defaults it is the same run."""
    import copy

    run = expand_grid(load_spec(TINY_SPEC), "/nonexistent")[0]
    saved = copy.deepcopy(run.computed_config())
    del saved["training"]["on_divergence"], saved["training"]["max_skipped_steps"]
    assert run.same_as_saved(saved)
    saved["training"]["steps"] += 1
    assert not run.same_as_saved(saved)


def spec_dict(**changes):
    d = {
        "config": "../tiny.yaml",
        "match": "moe",
        "variants": {
            "moe": {"ff": {"kind": "sigma_moe", "n_experts": 4, "expert_size": 16, "k": 2}},
            "dense": {"ff": {"kind": "dense", "d_ff": "auto"}},
        },
    }
    d.update(changes)
    return d


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"seedz": [1]}, r"unknown key\(s\) \['seedz'\]"),
        ({"match": "nope"}, "match: 'nope' is not a variant"),
        ({"config": "missing.yaml"}, "does not exist"),
        (
            {"variants": {"moe": {"ff": {"kind": "sigma_moe", "n_experts": "auto", "expert_size": 16, "k": 2}}}},
            "cannot have an 'auto' field",
        ),
        (
            {"variants": {"moe": {"ff": {"kind": "sigma_moe", "n_experts": 4, "expert_size": 16, "k": 2}, "lr": 1}}},
            r"variants.moe: unknown key\(s\) \['lr'\]",
        ),
        ({"seeds": [0, "1"]}, "list of integers"),
        ({"sizes": {"s": {"ff": {"other": {"k": 1}}}}}, "sizes.s.ff.other: not a variant"),
        ({"set": {"model.ff.k": 3}}, "set feedforward fields there"),
        ({"set": {"training.stepz": 3}}, "did you mean 'training.steps'"),
        (
            {"sizes": {"s": {"variants": ["moe", "other"]}}},
            "sizes.s.variants: expected a non-empty list of variant names",
        ),
        ({"sizes": {"s": {"seeds": []}}}, "sizes.s.seeds: expected a non-empty list"),
        ({"baseline": "other"}, "baseline: 'other' is not a variant"),
    ],
)
def test_bad_spec_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        spec = spec_from_dict(spec_dict(**changes), COMPARE / "inline.yaml")
        expand_grid(spec, "/nonexistent")


def test_size_picks_its_variants_and_seeds():
    spec = spec_from_dict(
        spec_dict(seeds=[0], sizes={"a": {}, "b": {"variants": ["dense"], "seeds": [3, 4]}}), COMPARE / "inline.yaml"
    )
    runs = expand_grid(spec, "/nonexistent")
    assert [(r.size, r.variant, r.seed) for r in runs] == [
        ("a", "moe", 0),
        ("a", "dense", 0),
        ("b", "dense", 3),
        ("b", "dense", 4),
    ]
    # the match variant sets b's budget although it does not run there
    assert runs[2].target_params == runs[0].target_params and runs[2].cfg.model.ff.d_ff == runs[1].cfg.model.ff.d_ff


def test_cli_dry_run_and_bad_spec(capsys, tmp_path):
    from sigma_moe.launch.cli import main

    assert main(["compare", str(TINY_SPEC), "--dry-run"]) == 0
    assert "default/dense: dense {'d_ff': 64" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("variants: {}\n")
    assert main(["compare", str(bad)]) == 2
    assert "missing key 'config'" in capsys.readouterr().err


def test_cli_only_picks_runs_by_key_glob(capsys):
    from sigma_moe.launch.cli import main

    ladder = str(COMPARE / "ladder.yaml")
    assert main(["compare", ladder, "--dry-run", "--only", "r3/*", "--only", "r1/dense/seed1"]) == 0
    out = capsys.readouterr().out
    assert "5 runs under" in out and "r3/sigma_moe:" in out and "r1/dense:" in out and "r2/" not in out
    assert main(["compare", ladder, "--dry-run", "--only", "r9/*"]) == 2
    err = capsys.readouterr().err
    assert "--only 'r9/*' matches no run of this spec" in err and "r1/sigma_moe/seed0" in err


def sizing(spec_name):
    runs = expand_grid(load_spec(COMPARE / spec_name), "/nonexistent")
    return {(r.size, r.variant): r for r in runs}, runs


def test_repro_spec_grid():
    by, runs = sizing("repro-wiki.yaml")
    assert sorted((r.variant, r.seed) for r in runs) == sorted(
        [
            ("dense", 0),
            ("dense", 1),
            ("sigma_moe", 0),
            ("sigma_moe", 1),
            ("switch", 0),
            ("sbase", 0),
            ("pkm", 0),
            ("topk", 0),
        ]
    )
    cfgs = [r.cfg for r in runs]
    assert {(c.data.dataset, c.data.vocab_size, c.model.n_layers, c.training.steps) for c in cfgs} == {
        ("wiki_offline", 8000, 4, 450)
    }

    # identical data, schedule and seeds: the configs differ only in model.ff, the seed and the run folder
    def strip(r):
        return {
            **config_to_dict(r.cfg),
            "model": {**config_to_dict(r.cfg.model), "ff": None},
            "training": {**config_to_dict(r.cfg.training), "seed": None},
            "logging": None,
        }

    assert all(strip(r) == strip(runs[0]) for r in runs)
    assert by[("default", "sigma_moe")].mlp_flops / by[("default", "dense")].mlp_flops == pytest.approx(0.25, abs=0.01)
    target = by[("default", "sigma_moe")].params
    for name in ("dense", "topk"):
        assert abs(by[("default", name)].params - target) / target < 1e-3


def test_paper_spec_gives_the_paper_sizes():
    by, _ = sizing("paper-wt103-47m.yaml")
    assert by[("default", "dense")].cfg.model.ff.d_ff == 2053
    assert by[("default", "topk")].cfg.model.ff.d_ff == 2053
    assert by[("default", "pkm")].cfg.model.ff.n_keys == 62
    by, _ = sizing("paper-237m-many-experts.yaml")
    assert by[("e128", "sigma_moe")].params == pytest.approx(237e6, rel=0.01)  # the paper's 237M model


def test_ladder_spec_rungs():
    by, runs = sizing("ladder.yaml")
    assert sorted(
        {
            (r.size, r.variant): len([q for q in runs if (q.size, q.variant) == (r.size, r.variant)]) for r in runs
        }.items()
    ) == [
        (("r1", "dense"), 2),
        (("r1", "sigma_moe"), 2),
        (("r1", "sigma_moe_xdrop"), 2),
        (("r2", "dense"), 1),
        (("r2", "sigma_moe"), 1),
        (("r2", "sigma_moe_k8"), 1),
        (("r2", "switch"), 1),
        (("r3", "dense"), 2),
        (("r3", "sigma_moe"), 2),
    ]
    for rung in ("r1", "r2", "r3"):  # parameter-equal at every rung, a quarter of the dense MLP's FLOPs
        moe, dense = by[(rung, "sigma_moe")], by[(rung, "dense")]
        assert abs(dense.params - moe.params) / moe.params < 1e-3
        assert moe.mlp_flops / dense.mlp_flops == pytest.approx(0.25, abs=0.01)
    # the ablations differ from their rung's σ-MoE only where the paper's ablation table says
    xdrop, k8 = by[("r1", "sigma_moe_xdrop")], by[("r2", "sigma_moe_k8")]
    assert (
        xdrop.cfg.model.ff.expert_dropout == 0.05
        and xdrop.cfg.model.ff.k == 4
        and xdrop.params == by[("r1", "sigma_moe")].params
    )
    assert (k8.cfg.model.ff.n_experts, k8.cfg.model.ff.expert_size, k8.cfg.model.ff.k) == (32, 64, 8)
    assert abs(k8.params - by[("r2", "sigma_moe")].params) / k8.params < 3e-3  # only the selector grows
    r1, r2, r3 = (by[(r, "sigma_moe")].cfg for r in ("r1", "r2", "r3"))
    assert (r1.model.ff.expert_size * r1.model.ff.k, r2.model.ff.expert_size * r2.model.ff.k) == (256, 512)
    assert r3.training.steps == 4 * r2.training.steps and r3.model == r2.model
    # r1 is repro-wiki's σ-MoE and dense, unchanged
    repro, _ = sizing("repro-wiki.yaml")
    assert by[("r1", "sigma_moe")].cfg == repro[("default", "sigma_moe")].cfg.__class__(
        **{**vars(repro[("default", "sigma_moe")].cfg), "logging": by[("r1", "sigma_moe")].cfg.logging}
    )


@pytest.mark.parametrize("spec_name", ["expert-scaling.yaml", "paper-237m-many-experts.yaml"])
def test_expert_scaling_holds_active_flops(spec_name):
    by, _ = sizing(spec_name)
    sizes = ["e16", "e32", "e64", "e128"]
    moe = [by[(s, "sigma_moe")] for s in sizes]
    assert [r.cfg.model.ff.n_experts for r in moe] == [16, 32, 64, 128]
    d, n_layers = moe[0].cfg.model.d_model, moe[0].cfg.model.n_layers
    expert_flops = {r.mlp_flops - 2 * r.cfg.model.ff.n_experts * d * n_layers for r in moe}  # minus the selector
    assert len(expert_flops) == 1
    for s in sizes:  # dense tracks each point's parameters
        assert abs(by[(s, "dense")].params - by[(s, "sigma_moe")].params) / by[(s, "sigma_moe")].params < 1e-3


@pytest.mark.parametrize("spec_name", ["k-g-ablation.yaml", "paper-wt103-47m-k-g.yaml"])
def test_k_g_ablation_holds_parameters_and_flops(spec_name):
    _, runs = sizing(spec_name)
    moe = [r for r in runs if r.cfg.model.ff.kind == "sigma_moe"]
    ks = sorted(r.cfg.model.ff.k for r in moe)
    assert ks == [1, 2, 4, 8]
    assert len({r.cfg.model.ff.k * r.cfg.model.ff.expert_size for r in moe}) == 1
    assert len({r.cfg.model.ff.n_experts * r.cfg.model.ff.expert_size for r in moe}) == 1
    assert max(r.params for r in moe) / min(r.params for r in moe) < 1.005  # only the selector differs
