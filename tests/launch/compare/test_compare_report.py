"""The comparison report from given results (no training): mean and spread over seeds, a feedforward
kind the report was not written for, the gap table against the baseline and its plot."""

import numpy as np
import pytest

from launch_helpers import ROOT
from sigma_moe.launch.compare.report import collect_rows, mean_std
from sigma_moe.launch.compare.spec import expand_grid, load_spec

TINY_SPEC = ROOT / "configs" / "compare" / "tiny.yaml"


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
