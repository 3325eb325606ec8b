"""Monitor: the interval's routing figures (every training forward, all ranks, one reduction) and what
lands in the TensorBoard event files, read back with TensorBoard's own loader."""

from __future__ import annotations

import io
import math

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
from sigma_moe.launch.monitor.balance_images import SNAPSHOT_AXES, SNAPSHOT_COLORBAR, colour_scale
from sigma_moe.launch.monitor.routing import IntervalMetrics, LayerLoad, LogStep, model_scalars
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


def run_interval(ff: list[nn.Module], metrics: IntervalMetrics, batches: list[torch.Tensor]) -> torch.Tensor:
    """One training step per batch (forward + after_forward), an evaluation forward after each (not
    counted); returns the counts the layer reported over the training forwards."""
    want = torch.zeros(E, dtype=torch.long)
    for x in batches:
        metrics.begin_step()
        ff[1](x)
        metrics.after_forward()
        want += ff[1].routing.tokens_per_expert
        metrics.end_step(0.01)
        with torch.no_grad():
            ff[1](torch.randn(50, D))  # evaluation: not the interval's
    return want


def test_interval_sums_every_training_forward_and_starts_again_after_the_log_step():
    ff = layers()
    metrics = IntervalMetrics(ff)
    want = run_interval(ff, metrics, [torch.randn(n, D) for n in (5, 9, 3)])
    log = metrics.reduce({"loss": 2.0})
    assert log.train == {"loss": 2.0} and log.steps == 3
    (layer,) = log.layers
    assert layer.index == 1 and layer.n_forwards == 3
    assert layer.counts.tolist() == want.tolist() and layer.total == (5 + 9 + 3) * K
    assert log.exchange == {} and log.expert_rows_per_rank is None  # no expert parallelism here
    want = run_interval(ff, metrics, [torch.randn(4, D)])
    assert metrics.reduce({"loss": 1.0}).layers[0].counts.tolist() == want.tolist()  # the new interval only


def test_figures_of_a_constructed_routing():
    # mean load 128; expert 0 got nothing, expert 1 two slots (alive, but starved below ¼ of the mean)
    load = LayerLoad(0, np.array([0.0, 2.0, 250.0, 260.0]), entropy_sum=2 * math.log(4) - 0.2, n_forwards=2)
    assert load.dead_experts == 1 and load.starved_experts(0.25) == 2 and load.starved_experts(0.01) == 1
    assert load.max_mean_load == pytest.approx(260 / 128) and load.min_mean_load == 0.0
    p = np.array([2.0, 250.0, 260.0]) / 512
    assert load.selection_entropy == pytest.approx(-(p * np.log(p)).sum() / math.log(4))
    assert load.balance_loss == pytest.approx(0.1)  # log E − mean entropy of the router's distribution
    even = LayerLoad(3, np.full(4, 5.0), entropy_sum=math.log(4), n_forwards=1)
    assert even.selection_entropy == pytest.approx(1.0) and even.max_mean_load == even.min_mean_load == 1.0
    assert even.starved_experts(0.25) == even.dead_experts == 0 and even.balance_loss == pytest.approx(0.0)
    total = model_scalars([load, even], starved_below=0.25)
    assert total["dead_experts"] == 1 and total["starved_experts"] == 2
    assert total["max_mean_load"] == pytest.approx(260 / 128) and total["min_mean_load"] == 0.0
    assert total["balance_loss"] == pytest.approx(0.1) and total["routed_slots_per_layer"] == (512 + 20) / 2
    idle = LayerLoad(0, np.zeros(3))
    assert idle.max_mean_load == 0.0 and idle.dead_experts == idle.starved_experts(0.25) == 3


def _log(counts_by_layer: dict[int, list[float]]) -> LogStep:
    return LogStep(
        train={"loss": 2.5},
        layers=[LayerLoad(i, np.array(c, dtype=np.float64), math.log(len(c)), 1) for i, c in counts_by_layer.items()],
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

    assert {i.split("/")[-1] for i in acc.Tags()["images"]} == {"balance_over_time", "load_heatmap"}
    assert len(acc.Tags()["images"]) == 3  # per layer, and the snapshot (the last step: images are due)
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
    x0, y0, w, h = SNAPSHOT_AXES
    cell = (x0 + w * (0.5 / 3), y0 + h * 0.75)  # expert 0 of layer 0 (top row of two)
    other = (x0 + w * (1.5 / 3), y0 + h * 0.75)  # expert 1: 0.75 × the mean at both steps
    want_2 = np.array(cmap(norm(2.0))[:3])
    assert np.abs(_pixel(images[20], cell) - want_2).max() < 0.02
    assert np.abs(_pixel(images[10], other) - _pixel(images[20], other)).max() < 0.02
    assert np.abs(_pixel(images[10], cell) - np.array(cmap(norm(1.5))[:3])).max() < 0.02
    bx, by, bw, bh = SNAPSHOT_COLORBAR
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
    g = torch.Generator().manual_seed(rank)
    out["local"] = run_interval(ff, metrics, [torch.randn(3 + 4 * rank, D, generator=g) for _ in range(2)])
    log = metrics.reduce({"loss": float(rank)})
    out["train"], out["counts"] = log.train, log.layers[0].counts
    mon = Monitor(tb_dir, rank=rank, total_steps=100, progress_bar=False)
    mon.routing(5, log)
    mon.close()
    # expert parallel: the meters of the all-to-all dispatcher, forward and backward, 3 steps
    ff = [parallelize(layers()[1], EP(2))]
    metrics = IntervalMetrics(ff, rank=rank, world_size=world)
    rows = 0
    for _ in range(3):
        metrics.begin_step()
        y = ff[0](torch.randn(6 + 10 * rank, D, generator=g))
        metrics.after_forward()
        y.square().sum().backward()
        metrics.end_step(0.5)
        rows += (6 + 10 * rank) * K
    out["ep"] = metrics.reduce({"loss": 0.0})
    out["slots"] = rows
    return out


@pytest.mark.multiprocess
def test_two_ranks_reduce_their_intervals_into_one_log_step(tmp_path):
    got = run_ranks(_two_ranks, 2, str(tmp_path / "tb"), timeout=120)
    total = got[0]["local"] + got[1]["local"]
    for res in got:
        assert res["counts"].tolist() == total.tolist()  # both ranks, every forward of the interval
        assert res["train"] == {"loss": 0.5}  # the mean over ranks
    acc = events(tmp_path / "tb")
    (h,) = acc.Histograms("routing/layer_01/load_share")
    slots = acc.Scalars("routing/model/routed_slots_per_layer")[0].value
    assert slots == total.sum() == (3 + 7) * 2 * K
    assert np.round(np.array(h.histogram_value.bucket) * slots).tolist() == total.tolist()

    ep = got[0]["ep"]
    x = ep.exchange
    assert x["rows_received_per_step_max"] >= x["rows_received_per_step"] > 0
    assert x["a2a_mb_per_step_max"] >= x["a2a_mb_per_step"] > 0 and x["a2a_ms_per_step_max"] >= x["a2a_ms_per_step"] > 0
    assert 0 < x["a2a_share_of_step"] < 1  # time in the all-to-alls ÷ the 0.5 s each step was said to take
    # every (token, slot) row is computed by one rank's experts
    assert ep.expert_rows_per_rank.sum() == pytest.approx((got[0]["slots"] + got[1]["slots"]) / 3)
    assert x["ep_busiest_rank"] == float(np.argmax(ep.expert_rows_per_rank))
    assert 1 <= x["ep_max_mean_rows"] <= 2 and 0 < x["layer_00/a2a_remote_share"] < 1
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
