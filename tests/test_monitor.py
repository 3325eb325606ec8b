"""Monitor: routing figures from the layers' RoutingStats, and what lands in the TensorBoard event files."""
from __future__ import annotations

import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from sigma_moe.launch.monitor import LayerRouting, Monitor, RoutingAccumulator, reduce_routing
from sigma_moe.layers.feedforward import RoutingStats


class _FakeRouted(nn.Module):
    def __init__(self):
        super().__init__()
        self.routing = None


def test_accumulator_sums_forwards_and_skips_unrouted_layers():
    routed, dense, routed2 = _FakeRouted(), nn.Linear(2, 2), _FakeRouted()
    acc = RoutingAccumulator([routed, dense, routed2])
    routed.routing = RoutingStats(torch.tensor([3, 0, 1, 0]), torch.tensor(0.5), 2)
    routed2.routing = RoutingStats(torch.tensor([1, 1]), torch.tensor(0.7), 1)
    acc.add()
    routed.routing = RoutingStats(torch.tensor([1, 0, 2, 1]), torch.tensor(1.5), 2)
    acc.add()
    assert sorted(acc.layers) == [0, 2]  # the plain layer has no routing
    first = acc.layers[0]
    assert first.tokens_per_expert.tolist() == [4, 0, 3, 1]
    assert first.selection_entropy == pytest.approx(1.0)  # mean of 0.5 and 1.5
    assert first.max_mean_load == pytest.approx(4 / 2)  # max 4, mean 8 / 4
    assert first.dead_experts == 1
    assert acc.layers[2].tokens_per_expert.tolist() == [2, 2] and acc.layers[2].n_forwards == 2
    # one process: the reduction changes nothing
    reduced = reduce_routing(acc.layers)
    assert [r.tokens_per_expert.tolist() for r in reduced] == [[4, 0, 3, 1], [2, 2]]
    acc.reset()
    assert acc.layers == {}


def test_event_files_hold_scalars_histograms_and_heatmap(tmp_path):
    layers = [
        LayerRouting(0, torch.tensor([5.0, 0.0, 2.0, 1.0], dtype=torch.float64), 2.4, 2),
        LayerRouting(3, torch.tensor([2.0, 2.0, 2.0, 2.0], dtype=torch.float64), 1.3, 1),
    ]
    mon = Monitor(tmp_path, rank=0, total_steps=10, progress_bar=False)
    mon.scalars("train", 7, {"loss": 2.5, "lr": 1e-3, "grad_norm": float("nan")})  # NaN is left out
    mon.routing(7, layers)
    mon.close()

    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    scalars = {t: acc.Scalars(t)[-1] for t in acc.Tags()["scalars"]}
    assert "train/grad_norm" not in scalars
    assert scalars["train/loss"].step == 7 and scalars["train/loss"].value == pytest.approx(2.5)
    assert scalars["routing/layer_00/selection_entropy"].value == pytest.approx(1.2)
    assert scalars["routing/layer_00/max_mean_load"].value == pytest.approx(5 / 2)
    assert scalars["routing/layer_00/dead_experts"].value == 1
    assert scalars["routing/layer_03/max_mean_load"].value == pytest.approx(1.0)
    assert scalars["routing/layer_03/dead_experts"].value == 0

    h = acc.Histograms("routing/layer_00/tokens_per_expert")[-1].histogram_value
    assert list(h.bucket) == [5.0, 0.0, 2.0, 1.0]  # bucket e holds expert e's tokens
    assert list(h.bucket_limit) == [0.5, 1.5, 2.5, 3.5]
    assert h.num == 8 and h.sum == pytest.approx(0 * 5 + 2 * 2 + 3 * 1)

    (img,) = acc.Images("routing/load_heatmap")
    assert img.step == 7 and img.width > 100 and img.height > 50
    assert img.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"


def test_other_ranks_write_nothing(tmp_path):
    mon = Monitor(tmp_path, rank=1, total_steps=10)
    mon.scalars("train", 1, {"loss": 1.0})
    mon.routing(1, [LayerRouting(0, torch.ones(4, dtype=torch.float64), 1.0, 1)])
    mon.write("not printed")
    mon.close()
    assert not (tmp_path / "tensorboard").exists()


def test_layer_routing_edge_cases():
    idle = LayerRouting(0, torch.zeros(3, dtype=torch.float64), 0.0, 0)
    assert idle.max_mean_load == 0.0 and idle.dead_experts == 3 and idle.selection_entropy == 0.0
    uniform = LayerRouting(0, torch.full((8,), 5.0, dtype=torch.float64), 8 * math.log(8), 8)
    assert uniform.max_mean_load == 1.0 and uniform.selection_entropy == pytest.approx(math.log(8))
