"""Expert-parallel rank arithmetic and the errors for sizes that do not divide (no processes needed)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from launch_helpers import ROOT
from sigma_moe.distributed import (
    ExpertParallelLayout,
    ExpertShard,
    is_expert_parallel,
    local_experts,
    moe_param_groups,
    parallelize,
)
from sigma_moe.distributed.deepspeed_moe import adapt_for_deepspeed
from sigma_moe.layers import SigmaMoE, SigmaMoEConfig


def test_layout_w4_e2():
    lay = ExpertParallelLayout(world_size=4, expert_parallel_size=2)
    assert lay.ep_groups() == [[0, 1], [2, 3]]
    assert lay.edp_groups() == [[0, 2], [1, 3]]
    assert lay.expert_data_parallel_size == 2
    assert [lay.ep_rank(r) for r in range(4)] == [0, 1, 0, 1]
    assert [lay.edp_rank(r) for r in range(4)] == [0, 0, 1, 1]
    assert [lay.expert_range(16, lay.ep_rank(r)) for r in range(4)] == [range(0, 8), range(8, 16)] * 2
    assert lay.group_name == "ep_size_2"


@pytest.mark.parametrize("world,e", [(8, 4), (6, 3), (4, 1), (4, 4)])
def test_layout_partitions_ranks_and_experts(world, e):
    lay = ExpertParallelLayout(world, e)
    # every rank is in exactly one EP group and one EDP group, and they meet in exactly that rank
    for r in range(world):
        (ep,) = [g for g in lay.ep_groups() if r in g]
        (edp,) = [g for g in lay.edp_groups() if r in g]
        assert set(ep) & set(edp) == {r}
        assert len(ep) == e and len(edp) == world // e
        # the ranks of an EDP group hold the same experts; those of an EP group, all of them once
        assert len({lay.ep_rank(q) for q in edp}) == 1
        assert sorted(x for q in ep for x in lay.expert_range(4 * e, lay.ep_rank(q))) == list(range(4 * e))


def test_layout_errors_name_the_setting():
    with pytest.raises(
        ValueError,
        match=r"expert_parallel_size = 3 must divide the number of processes \(4\); choose one of \[1, 2, 4\]",
    ):
        ExpertParallelLayout(4, 3)
    with pytest.raises(ValueError, match="expert_parallel_size must be >= 1"):
        ExpertParallelLayout(4, 0)
    with pytest.raises(ValueError, match=r"n_experts = 6 is not divisible by distributed.expert_parallel_size = 4"):
        ExpertParallelLayout(8, 4).expert_range(6, 0)
    with pytest.raises(ValueError, match=r"EP rank must lie in \[0, 2\)"):
        ExpertParallelLayout(4, 2).expert_range(8, 2)
    with pytest.raises(ValueError, match=r"expert_parallel_size = 8 needs 8 or more processes, this job has 4"):
        ExpertParallelLayout(4, 8)


def test_expert_shard_is_one_block_of_the_experts():
    shard = ExpertParallelLayout(4, 2).shard(16, 1)
    assert (shard.experts, shard.ep_size, shard.ep_rank, shard.n_local, shard.n_experts, shard.group_name) == (
        range(8, 16),
        2,
        1,
        8,
        16,
        "ep_size_2",
    )
    for bad in (range(0), range(1, 5), range(8, 16, 2), range(8, 12)):
        with pytest.raises(ValueError, match="non-empty block"):
            ExpertShard(bad, 2, "ep_size_2")


def _shard_by_hand(layer, experts=range(4, 8), ep_size=2):
    """What parallelize does to a layer on EP rank 1 of 2, without processes: its shard, then the adapter."""
    layer.expert_shard = ExpertShard(experts, ep_size, f"ep_size_{ep_size}")
    adapt_for_deepspeed(layer)


@dataclass(frozen=True)
class EP:
    expert_parallel_size: int
    transport: str = "torch"


def _layer(n_experts=8):
    return SigmaMoE(SigmaMoEConfig(n_experts=n_experts, expert_size=4, k=2), d_model=8, n_layers=1)


def test_parallelize_in_one_process():
    model = torch.nn.Sequential(_layer())
    before = {n: p.clone() for n, p in model.named_parameters()}
    assert parallelize(model, EP(1)) is model  # nothing to do without other processes
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(
        ValueError, match=r"expert_parallel_size = 2 needs 2 or more processes, this job has 1: choose one of \[1\]"
    ):
        parallelize(model, EP(2))
    with pytest.raises(
        ValueError, match=r"n_experts = 8 \(layer 0\) is not divisible by distributed.expert_parallel_size = 3"
    ):
        parallelize(model, EP(3))


def test_moe_param_groups_split_tagged_experts():
    from deepspeed.moe.layer import MoE

    layer = _layer()
    keys = list(layer.state_dict())
    _shard_by_hand(layer)
    # still the same layer (its forward, names) and now also what DeepSpeed's engine looks for
    assert isinstance(layer, SigmaMoE) and isinstance(layer, MoE) and type(layer).forward is SigmaMoE.forward
    assert list(layer.state_dict()) == keys
    assert (layer.num_experts, layer.num_local_experts, layer.ep_size) == (8, 4, 2)
    assert local_experts(layer) == range(4, 8) and local_experts(_layer()) == range(8)
    assert is_expert_parallel(layer) and not is_expert_parallel(_layer())
    assert [p.allreduce for p in (layer.w1, layer.w2)] == [False, False] and not hasattr(layer.selector, "allreduce")
    groups = moe_param_groups(
        [
            {"params": [layer.w1, layer.selector], "weight_decay": 0.1},
            {"params": [layer.w2], "weight_decay": 0.0, "name": "no_decay"},
        ]
    )
    by_content = [({id(p) for p in g["params"]}, g.get("moe", False), g["weight_decay"]) for g in groups]
    assert ({id(layer.selector)}, False, 0.1) in by_content
    assert ({id(layer.w1)}, True, 0.1) in by_content
    assert ({id(layer.w2)}, True, 0.0) in by_content
    assert all(g["name"] == "ep_size_2" for g in groups if g.get("moe"))
    with pytest.raises(ValueError, match="already a DeepSpeed MoE layer"):
        adapt_for_deepspeed(layer)
    with pytest.raises(ValueError, match="has no expert_shard"):
        adapt_for_deepspeed(_layer())


def test_exchange_figures_of_an_expert_parallel_layer():
    from sigma_moe.distributed.exchange_stats import exchange_figures, remote_rows

    ep_layer, local_layer = _layer(), _layer()
    _shard_by_hand(ep_layer)  # EP rank 1 of 2
    local = torch.arange(1.0, 9.0, dtype=torch.float64)  # rows this rank sent to experts 0..7
    global_ = torch.tensor([2.0, 2, 2, 2, 4, 4, 4, 4], dtype=torch.float64)
    assert remote_rows(ep_layer, local) == (1 + 2 + 3 + 4, 36)  # experts 0-3 live on EP rank 0
    remote = {0: (0.0, 36.0), 1: remote_rows(ep_layer, local)}
    figures = exchange_figures([local_layer, ep_layer], remote, {0: global_, 1: global_})
    assert figures == {
        "layer_01/a2a_remote_share": pytest.approx((1 + 2 + 3 + 4) / 36),  # experts 0-3 live on EP rank 0
        "layer_01/ep_max_mean_load": pytest.approx(16 / 12),  # EP ranks get 8 and 16 rows
    }
    assert exchange_figures([local_layer], {0: (0.0, 36.0)}, {0: global_}) == {}  # no all-to-all, no figures


def test_a_deepspeed_outside_the_range_is_refused_with_the_fix(monkeypatch):
    from sigma_moe.distributed.deepspeed_compat import DEEPSPEED_RANGE, UnsupportedDeepSpeed, check_deepspeed_version

    low, high = DEEPSPEED_RANGE
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"deepspeed>={low},<={high}"' in pyproject  # the check and the install declare one range
    monkeypatch.delenv("SIGMA_MOE_ALLOW_ANY_DEEPSPEED", raising=False)
    for inside in (low, high + "+cpu", "0.19.0"):  # both ends, a local build, a release between them
        check_deepspeed_version(inside)
    for outside in ("0.18.8", "0.20.0", "0.19.9"):
        with pytest.raises(
            UnsupportedDeepSpeed,
            match=rf"DeepSpeed {outside} is outside the range sigma-moe supports \({low} to {high}\): "
            rf"pip install 'deepspeed>={low},<={high}', or set SIGMA_MOE_ALLOW_ANY_DEEPSPEED=1",
        ):
            check_deepspeed_version(outside)
    monkeypatch.setenv("SIGMA_MOE_ALLOW_ANY_DEEPSPEED", "1")
    with pytest.warns(UserWarning, match=r"DeepSpeed 0\.20\.0 is outside .* running it anyway"):
        check_deepspeed_version("0.20.0")
