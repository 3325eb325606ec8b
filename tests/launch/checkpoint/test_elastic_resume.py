"""Elastic resume: a run saved at one expert-parallel size continues at another (2 -> 1, 1 -> 2, 2 -> 4
ranks; E follows the ranks), AdamW's moments following their experts. Real launches (torchrun, gloo):
the tiny config has no dropout, and the global batch and its order are the same at every size, so the
resumed losses match the uninterrupted E = 2 run to float summation order. The re-sharded state itself
is exact: loaded in one process, every moment and weight equals the saved shards, bit for bit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from launch_helpers import one_thread, restored_environ, tiny_config
from launcher_runs import STEPS, finish, launch, train_losses

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
ALL_STEPS = (f"training.steps={STEPS}", "checkpoint.keep_last=4")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("elastic")
    d = {name: base / name for name in ("ep2", "to1", "to4", "back2")}
    finish(launch("torchrun", d["ep2"], "distributed.expert_parallel_size=2", *ALL_STEPS, "checkpoint.every=10"))
    step10 = d["ep2"] / "checkpoints" / "step_00000010"
    d["to1_log"] = finish(
        launch(
            "torchrun",
            d["to1"],
            "distributed.expert_parallel_size=1",
            *ALL_STEPS,
            "checkpoint.every=5",
            f"checkpoint.resume={step10}",
            nproc=1,
        )
    )
    finish(
        launch(
            "torchrun",
            d["to4"],
            "distributed.expert_parallel_size=4",
            *ALL_STEPS,
            f"checkpoint.resume={step10}",
            nproc=4,
        )
    )
    step15 = d["to1"] / "checkpoints" / "step_00000015"  # saved by one process at E = 1
    finish(
        launch("torchrun", d["back2"], "distributed.expert_parallel_size=2", *ALL_STEPS, f"checkpoint.resume={step15}")
    )
    return d


@pytest.mark.parametrize("name,first", [("to1", 11), ("to4", 11), ("back2", 16)])
def test_resumed_at_another_size_continues_the_run(runs, name, first):
    ref, got = train_losses(runs["ep2"]), train_losses(runs[name])
    assert sorted(got) == list(range(first, STEPS + 1))
    for step, loss in got.items():
        assert loss == pytest.approx(ref[step], rel=1e-4), f"{name} step {step}: {loss} vs uninterrupted {ref[step]}"


def test_the_resume_says_what_it_did(runs):
    assert "saved at expert_parallel_size=2, resumed at 1: weights and AdamW state re-sharded" in runs["to1_log"]


def test_resharded_state_is_the_saved_state(runs, tmp_path):
    """Load the E = 2 checkpoint in one process: each expert's moments and weights are the saved ones."""
    from sigma_moe.distributed.checkpoint import expert_file, routed_layers
    from sigma_moe.distributed.deepspeed_compat import EXPERT_OPTIMIZER_FILE
    from sigma_moe.launch.checkpoint.manager import CheckpointManager
    from sigma_moe.launch.session import start_session

    tag = runs["ep2"] / "checkpoints" / "step_00000010"
    with restored_environ(), one_thread():
        s = start_session(tiny_config(tmp_path / "one"))
        try:
            state = CheckpointManager(tag.parent, keep_last=1, model_config=s.model_config).load(s.engine, tag)
            names = {id(p): n for n, p in s.engine.module.named_parameters()}
            loaded = {
                names[id(p)]: (p.detach().clone(), dict(s.engine.optimizer.state[p]))
                for g in s.engine.optimizer.param_groups
                for p in g["params"]
            }
        finally:
            s.close()
    assert state["step"] == 10
    meta = json.loads((tag / "meta.json").read_text())
    shards = [torch.load(tag / EXPERT_OPTIMIZER_FILE.format(rank=r), weights_only=True)["optimizer"] for r in range(2)]
    expert_group = next(i for i, g in enumerate(shards[0]["param_groups"]) if g.get("moe"))
    for position, name in enumerate(meta["optimizer_params"][expert_group]):  # w1, w2 of each routed layer
        weight, moments = loaded[name]
        for key in ("exp_avg", "exp_avg_sq"):  # rank r's shard holds experts [2r, 2r + 2)
            saved = [
                shards[r]["state"][shards[r]["param_groups"][expert_group]["params"][position]][key] for r in range(2)
            ]
            assert torch.equal(moments[key], torch.cat(saved)), f"{name} {key}"
        layer, param = name.rsplit(".", 1)
        index = [n for n, _ in routed_layers(s.engine.module)].index(layer)
        for g in range(4):
            assert torch.equal(weight[g], torch.load(expert_file(tag, index, g), weights_only=True)[f"{name}.{g}"])
    assert int(moments["step"]) == 10


def test_a_partitioned_optimizer_refuses_another_world_size(runs, tmp_path):
    """ZeRO 1/2 (and bf16/fp16) keep flat per-rank partitions: a one-line error, not DeepSpeed's traceback."""
    from launch_helpers import train_in_process
    from sigma_moe.launch.checkpoint.manager import CheckpointError
    from sigma_moe.launch.checkpoint.manifest import write_manifest

    tag = tmp_path / "ck" / "step_00000010"
    shutil.copytree(runs["ep2"] / "checkpoints" / "step_00000010", tag)
    meta = json.loads((tag / "meta.json").read_text())
    (tag / "meta.json").write_text(json.dumps({**meta, "zero_stage": 1, "optimizer_params": None}))
    (tag / "manifest.json").unlink()
    write_manifest(tag)
    with pytest.raises(
        CheckpointError,
        match=r"saved by 2 ranks with an optimizer state partitioned over them "
        r"\(training.zero_stage=1.*Resume with 2 ranks",
    ):
        train_in_process(tiny_config(tmp_path / "one", f"checkpoint.resume={tag}"))
