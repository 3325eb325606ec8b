"""Monitor: the interval's routing figures (every training forward, all ranks, one reduction) and what
lands in the TensorBoard event files, read back with TensorBoard's own loader."""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto.histogram_pb2 import HistogramProto
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.data_compat import migrate_value
from tensorboard.util import tensor_util
from torch import nn

from ranks import run_ranks
from sigma_moe.launch.monitor.balance_images import colour_scale, heatmap_layout
from sigma_moe.launch.monitor.routing import IntervalMetrics, LayerLoad, LogStep, balance_loss, model_scalars
from sigma_moe.launch.monitor.run_monitor import Monitor
from sigma_moe.launch.monitor.tags import describe
from sigma_moe.layers import SigmaMoE, SigmaMoEConfig

D, E, K = 8, 4, 2


def layers(seed: int = 0) -> list[nn.Module]:
    """A routed layer between two plain ones (the plain ones have no routing)."""
    torch.manual_seed(seed)
    return [
        nn.Linear(D, D),
        SigmaMoE(SigmaMoEConfig(n_experts=E, expert_size=4, k=K), d_model=D, n_layers=2),
        nn.Identity(),
    ]


def events(path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def run_interval(
    ff: list[nn.Module], metrics: IntervalMetrics, batches: list[torch.Tensor], entropies: list | None = None
) -> torch.Tensor:
    """One training step per batch (forward + after_forward), an evaluation forward after each (not
    counted); returns the counts the layer reported over the training forwards (``entropies``: gets
    each training forward's router entropy)."""
    want = torch.zeros(E, dtype=torch.long)
    for x in batches:
        metrics.begin_step()
        ff[1](x)
        metrics.after_forward()
        want += ff[1].routing.tokens_per_expert
        if entropies is not None:
            p = ff[1].routing.mean_probs
            entropies.append(float(-(p * p.log()).sum()))
        metrics.end_step(0.01)
        with torch.no_grad():
            ff[1](torch.randn(50, D))  # evaluation: not the interval's
    return want


def test_interval_sums_every_training_forward_and_starts_again_after_the_log_step():
    ff = layers()
    metrics = IntervalMetrics(ff)
    entropies = []
    want = run_interval(ff, metrics, [torch.randn(n, D) for n in (5, 9, 3)], entropies)
    log = metrics.reduce({"loss": 2.0})
    assert log.train == {"loss": 2.0} and log.steps == 3
    (layer,) = log.layers
    assert layer.index == 1 and layer.balance_loss == pytest.approx(math.log(E) - np.mean(entropies), rel=1e-5)
    assert layer.counts.tolist() == want.tolist() and layer.total == (5 + 9 + 3) * K
    assert log.exchange == {} and log.ep_size == 1  # no expert parallelism here
    want = run_interval(ff, metrics, [torch.randn(4, D)])
    assert metrics.reduce({"loss": 1.0}).layers[0].counts.tolist() == want.tolist()  # the new interval only


def test_balance_loss_is_the_whole_batch_kl_from_uniform_per_forward():
    # two forwards: a whole-batch p̄ of (½, ½, 0, 0) (KL = log 4 − log 2) and a uniform one (KL 0)
    sums = np.array([[3.0, 3.0, 0.0, 0.0, 6.0], [1.0, 1.0, 1.0, 1.0, 4.0]])
    assert balance_loss(sums) == pytest.approx((math.log(4) - math.log(2)) / 2)
    assert balance_loss(np.zeros((0, 5))) == 0.0


def test_figures_of_a_constructed_routing():
    # mean load 128; expert 0 got nothing, expert 1 two slots (alive, but starved below ¼ of the mean)
    load = LayerLoad(0, np.array([0.0, 2.0, 250.0, 260.0]), balance_loss=0.1, units=np.array([0.0, 0.5, 1.0, 0.75]))
    assert load.dead_experts == 1 and load.starved_experts(0.25) == 2 and load.starved_experts(0.01) == 1
    assert load.max_mean_load == pytest.approx(260 / 128) and load.min_mean_load == 0.0
    p = np.array([2.0, 250.0, 260.0]) / 512
    assert load.selection_entropy == pytest.approx(-(p * np.log(p)).sum() / math.log(4))
    ratio = np.array([0.0, 2.0, 250.0, 260.0]) / 128
    assert load.load_cv == pytest.approx(ratio.std())  # std ÷ mean of the loads
    figures = load.scalars(starved_below=0.25)
    # over the experts that got tokens: expert 0 (dead) is dead_experts' business, not a unit figure
    assert figures["units_used_min"] == 0.5 and figures["units_used_mean"] == pytest.approx(2.25 / 3)
    even = LayerLoad(3, np.full(4, 5.0), units=np.ones(4))
    assert even.selection_entropy == pytest.approx(1.0) and even.max_mean_load == even.min_mean_load == 1.0
    assert even.starved_experts(0.25) == even.dead_experts == 0 and even.load_cv == 0.0
    total = model_scalars([load, even], starved_below=0.25)
    assert total["load_cv"] == pytest.approx(ratio.std()) and total["units_used_min"] == 0.5
    assert total["units_used_mean"] == pytest.approx((2.25 / 3 + 1) / 2)
    assert total["dead_experts"] == 1 and total["starved_experts"] == 2
    assert total["max_mean_load"] == pytest.approx(260 / 128) and total["min_mean_load"] == 0.0
    assert total["balance_loss"] == pytest.approx(0.1) and total["routed_slots_per_layer"] == (512 + 20) / 2
    idle = LayerLoad(0, np.zeros(3))
    assert idle.max_mean_load == 0.0 and idle.dead_experts == idle.starved_experts(0.25) == 3


def _log(counts_by_layer: dict[int, list[float]]) -> LogStep:
    return LogStep(
        train={"loss": 2.5},
        layers=[
            LayerLoad(i, np.array(c, dtype=np.float64), 0.0, np.linspace(0, 1, len(c)))
            for i, c in counts_by_layer.items()
        ],
        steps=1,
    )


def test_event_files_hold_exact_bars_with_descriptions(tmp_path):
    mon = Monitor(tmp_path, rank=0, total_steps=10, progress_bar=False, config_text="model:\n  d_model: 8\n")
    mon.scalars("train", 10, {"loss": 2.5, "grad_norm": float("nan")})  # NaN is left out
    mon.routing(10, _log({0: [0.0, 5.0, 2.0, 1.0, 0.0], 3: [2.0, 2.0, 2.0, 2.0, 2.0]}))
    mon.close()

    acc = events(tmp_path)
    scalars = {t: acc.Scalars(t)[-1] for t in acc.Tags()["scalars"]}
    assert "train/grad_norm" not in scalars and scalars["train/loss"].value == pytest.approx(2.5)
    assert (
        scalars["routing/layer_00/dead_experts"].value == 2 and scalars["routing/layer_00/starved_experts"].value == 2
    )
    assert scalars["routing/layer_00/max_mean_load"].value == pytest.approx(5 / 1.6)
    assert scalars["routing/layer_03/selection_entropy"].value == pytest.approx(1.0)
    assert scalars["routing/model/dead_experts"].value == 2
    for tag in [*scalars, "routing/layer_00/load_share", "routing/load_heatmap", "run/config"]:
        assert acc.SummaryMetadata(tag).summary_description == describe(tag) != "", tag

    h = acc.Histograms("routing/layer_00/load_share")[-1].histogram_value
    assert list(h.bucket) == pytest.approx([0.0, 5 / 8, 2 / 8, 1 / 8, 0.0])  # bucket e = expert e's share
    assert list(h.bucket_limit) == [0.5, 1.5, 2.5, 3.5, 4.5]
    # what TensorBoard draws (its own migration of the event): one bucket per expert, each id ± 0.5;
    # experts 0 and 4 (no load, at the edges) are left out, not merged into their neighbours
    proto = HistogramProto(
        min=h.min,
        max=h.max,
        num=h.num,
        sum=h.sum,
        sum_squares=h.sum_squares,
        bucket_limit=h.bucket_limit,
        bucket=h.bucket,
    )
    drawn = tensor_util.make_ndarray(migrate_value(Summary.Value(tag="t", histo=proto)).tensor)
    assert drawn[:, :2].tolist() == [[0.5, 1.5], [1.5, 2.5], [2.5, 3.5]]
    assert drawn[:, 2].tolist() == pytest.approx([5 / 8, 2 / 8, 1 / 8])

    images = {"balance_over_time", "units_over_time", "load_heatmap", "sorted_load"}
    assert {i.split("/")[-1] for i in acc.Tags()["images"]} == images
    assert len(acc.Tags()["images"]) == 6  # two per layer, and the snapshots (the last step: images are due)
    units = acc.Histograms("routing/layer_00/units_used")[-1].histogram_value.bucket
    assert list(units) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert scalars["routing/layer_00/units_used_min"].value == 0.25 and "routing/layer_00/load_cv" in scalars
    assert b"d_model: 8" in acc.Tensors("run/config")[0].tensor_proto.string_val[0]


def _pixel(png: bytes, fig_xy: tuple[float, float]) -> np.ndarray:
    from matplotlib.image import imread

    img = imread(io.BytesIO(png))
    h, w = img.shape[:2]
    return img[int((1 - fig_xy[1]) * h), int(fig_xy[0] * w), :3]


def test_heatmap_colour_scale_is_the_same_at_every_step(tmp_path):
    """Two logged steps whose loads span different ranges: a cell at 2 × the mean has the same colour in
    both, the colour the fixed scale gives 2, and the colour bars are pixel for pixel the same."""
    mon = Monitor(tmp_path, rank=0, total_steps=20, progress_bar=False, images_every=10)
    mon.routing(10, _log({0: [2.0, 1.0, 1.0], 1: [2.0, 1.0, 1.0]}))  # ratios 1.5, .75, .75
    mon.routing(20, _log({0: [8.0, 3.0, 1.0], 1: [8.0, 3.0, 1.0]}))  # ratios 2, .75, .25
    mon.close()
    images = {e.step: e.encoded_image_string for e in events(tmp_path).Images("routing/load_heatmap")}
    assert sorted(images) == [10, 20]
    cmap, norm = colour_scale()
    _, (x0, y0, w, h), (bx, by, bw, bh) = heatmap_layout(2, 3)
    cell = (x0 + w * (0.5 / 3), y0 + h * 0.75)  # expert 0 of layer 0 (top row of two)
    other = (x0 + w * (1.5 / 3), y0 + h * 0.75)  # expert 1: 0.75 × the mean at both steps
    want_2 = np.array(cmap(norm(2.0))[:3])
    assert np.abs(_pixel(images[20], cell) - want_2).max() < 0.02
    assert np.abs(_pixel(images[10], other) - _pixel(images[20], other)).max() < 0.02
    assert np.abs(_pixel(images[10], cell) - np.array(cmap(norm(1.5))[:3])).max() < 0.02
    for frac in (0.1, 0.3, 0.5, 0.7, 0.9):  # the colour bar: the same colours at the same heights
        at = (bx + bw / 2, by + bh * frac)
        assert np.abs(_pixel(images[10], at) - _pixel(images[20], at)).max() < 0.02


def test_other_ranks_write_nothing(tmp_path):
    mon = Monitor(tmp_path / "tb", rank=1, total_steps=10)
    mon.scalars("train", 1, {"loss": 1.0})
    mon.routing(10, _log({0: [1.0, 1.0]}))
    mon.write("not printed")
    mon.close()
    assert not (tmp_path / "tb").exists()


# ---------------------------------------------------------------- 2 real ranks (gloo)


DP_SIZES, EP_SIZES = (3, 7), (6, 16)  # tokens per forward on rank 0, 1: each rank its own batch size


def _batches(sizes: tuple[int, ...], rank: int, steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(sizes[rank], D, generator=g) for _ in range(steps)]


def _one_process(steps: int, sizes: tuple[int, ...]) -> LayerLoad:
    """The single-process result: one process, each forward on every rank's tokens of that step."""
    ff = layers()
    metrics = IntervalMetrics(ff)
    per_rank = [_batches(sizes, r, steps) for r in range(len(sizes))]
    run_interval(ff, metrics, [torch.cat(xs) for xs in zip(*per_rank)])
    return metrics.reduce({}).layers[0]


def _two_ranks(rank: int, world: int, tb_dir: str) -> dict:
    from dataclasses import dataclass

    from sigma_moe.distributed import parallelize

    @dataclass
    class EP:
        expert_parallel_size: int
        transport: str = "torch"

    out = {}
    # data parallel: each rank's own counts over 2 steps, a different batch size on each rank
    ff = layers()
    metrics = IntervalMetrics(ff, rank=rank, world_size=world)
    out["local"] = run_interval(ff, metrics, _batches(DP_SIZES, rank, 2))
    log = metrics.reduce({"loss": float(rank)})
    out["train"], out["dp"] = log.train, log.layers[0]
    mon = Monitor(tb_dir, rank=rank, total_steps=100, progress_bar=False)
    mon.routing(5, log)
    mon.close()
    # expert parallel: the meters of the all-to-all dispatcher, forward and backward, 3 steps
    ff = [parallelize(layers()[1], EP(2))]
    metrics = IntervalMetrics(ff, rank=rank, world_size=world)
    for x in _batches(EP_SIZES, rank, 3):
        metrics.begin_step()
        y = ff[0](x)
        metrics.after_forward()
        y.square().sum().backward()
        metrics.end_step(0.5)
    out["ep"] = metrics.reduce({"loss": 0.0})
    return out


@pytest.mark.multiprocess
def test_two_ranks_reduce_their_intervals_into_one_log_step(tmp_path):
    got = run_ranks(_two_ranks, 2, str(tmp_path / "tb"), timeout=120)
    total = got[0]["local"] + got[1]["local"]
    for res in got:
        assert res["dp"].counts.tolist() == total.tolist()  # both ranks, every forward of the interval
        assert res["train"] == {"loss": 0.5}  # the mean over ranks
    acc = events(tmp_path / "tb")
    (h,) = acc.Histograms("routing/layer_01/load_share")
    slots = acc.Scalars("routing/model/routed_slots_per_layer")[0].value
    assert slots == total.sum() == sum(DP_SIZES) * 2 * K
    assert np.round(np.array(h.histogram_value.bucket) * slots).tolist() == total.tolist()

    # the whole batch's figures equal one process's on the same tokens: data parallel and expert parallel
    for name, sizes, steps in (("dp", DP_SIZES, 2), ("ep", EP_SIZES, 3)):
        one = _one_process(steps, sizes)
        two = got[0][name] if name == "dp" else got[0][name].layers[0]
        assert two.counts.tolist() == one.counts.tolist(), name
        assert one.balance_loss > 0.01 and two.balance_loss == pytest.approx(one.balance_loss, rel=1e-4), name
        assert two.units.tolist() == one.units.tolist() and 0 < one.units.mean() <= 1, name  # units fired

    ep = got[0]["ep"]
    x = ep.exchange
    assert x["tokens_received_per_step_max"] >= x["tokens_received_per_step"] > 0
    assert x["a2a_mb_per_step_max"] >= x["a2a_mb_per_step"] > 0 and x["a2a_ms_per_step_max"] >= x["a2a_ms_per_step"] > 0
    assert 0 < x["a2a_share_of_step"] < 1  # time in the all-to-alls ÷ the 0.5 s each step was said to take
    # every (token, slot) assignment is computed by one rank's experts: each rank's series, and their sum
    per_rank = [x[f"ep_rank_{r:02d}/assignments_per_step"] for r in range(2)]
    assert sum(per_rank) == pytest.approx(sum(EP_SIZES) * K)
    assert per_rank == pytest.approx(ep.layers[0].counts.reshape(2, 2).sum(1) / 3)  # experts 0-1 on rank 0
    assert x["ep_max_mean_assignments"] == pytest.approx(max(per_rank) / np.mean(per_rank))
    assert ep.ep_size == 2 and 0 < x["layer_00/a2a_remote_share"] < 1
    assert all(x[f"ep_rank_{r:02d}/a2a_ms_per_step"] > 0 for r in range(2))
    assert got[1]["ep"].exchange == x  # every rank reduced the same figures


def test_resumed_run_continues_the_balance_over_time_history(tmp_path):
    first = Monitor(tmp_path, rank=0, total_steps=10, progress_bar=False)
    for step in (5, 10):
        first.routing(step, _log({0: [1.0, float(step)]}))
    first.close()
    again = Monitor(tmp_path, rank=0, total_steps=20, start_step=10, progress_bar=False)
    again.routing(15, _log({0: [3.0, 1.0]}))
    again.close()
    steps, shares = again.history.matrix(0)
    assert steps == [5, 10, 15]
    np.testing.assert_allclose(shares, [[1 / 6, 1 / 11, 3 / 4], [5 / 6, 10 / 11, 1 / 4]])


def test_expert_parallel_views_per_rank(tmp_path):
    """Each rank's series under its own tag, on one Custom Scalars chart; the images mark the ranks' experts."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    log = _log({0: [4.0, 1.0, 1.0, 2.0]})
    log.ep_size = 2
    log.exchange = {"ep_rank_00/assignments_per_step": 5.0, "ep_rank_01/assignments_per_step": 3.0}
    mon = Monitor(tmp_path, rank=0, total_steps=10, progress_bar=False)
    mon.routing(10, log)
    mon.close()
    acc = events(tmp_path)
    assert acc.Scalars("routing/ep_rank_01/assignments_per_step")[-1].value == 3.0
    assert acc.SummaryMetadata("routing/ep_rank_01/assignments_per_step").summary_description.startswith(
        "Expert parallelism, rank XX"
    )
    layout = layout_pb2.Layout.FromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    (chart,) = [c for cat in layout.category for c in cat.chart if "assignments" in c.title]
    assert any(re.match(rx, "routing/ep_rank_01/assignments_per_step") for rx in chart.multiline.tag)
    assert len(acc.Images("routing/layer_00/balance_over_time")) == 1


def test_monitor_from_the_logging_section(tmp_path):
    """from_config takes every setting of the ``logging`` section; the event reader finds the run's folder."""
    from sigma_moe.launch.monitor.config import LoggingConfig
    from sigma_moe.launch.monitor.event_reader import read_run_events, run_tensorboard_dir

    logging = LoggingConfig(run_dir=str(tmp_path), name="r1", progress_bar=False, starved_below=0.5, images_every=7)
    mon = Monitor.from_config(logging, rank=0, total_steps=10, log_every=5)
    assert (mon.starved_below, mon.images_every, mon.console.log_every) == (0.5, 7, 5)
    mon.scalars("train", 5, {"loss": 2.5})
    mon.close()
    assert run_tensorboard_dir(logging) == tmp_path / "r1"
    assert read_run_events(run_tensorboard_dir(logging)).last("train/loss") == 2.5
    off = Monitor.from_config(LoggingConfig(run_dir=str(tmp_path), tensorboard=False), rank=0, total_steps=10)
    assert off.writer is None
    off.close()
