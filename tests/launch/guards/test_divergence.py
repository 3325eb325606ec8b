"""The divergence guard on a real (one-process) DeepSpeed engine: a step with a non-finite gradient is
caught before its update; ``stop`` raises with the weights untouched, ``skip`` drops exactly that
update (weights, AdamW moments and the schedule as before; DeepSpeed counts it as skipped) and the
next finite step trains as usual; too many skips in a row stop the run. End to end: lr 1e6 without
clipping stops a real run (stop) or skips its steps (skip), and no checkpoint ever holds a
non-finite weight."""

from __future__ import annotations

import os

import pytest
import torch

from launch_helpers import restored_environ, tiny_config, train_in_process
from ranks import free_port
from sigma_moe.launch.guards.divergence import DivergenceGuard, TrainingDiverged
from sigma_moe.launch.optim import SkippableAdamW


def _engine():
    """Call inside ``restored_environ``: one process, as DeepSpeed's launcher would describe it."""
    import deepspeed

    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())),
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    optimizer = SkippableAdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def _step(engine, guard, step, poison=False):
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(step))
    loss = engine(x).pow(2).mean()
    engine.backward(loss)
    if poison:
        next(engine.module.parameters()).grad[0, 0] = float("nan")
    skipped = guard.before_update(step, engine, loss=float(loss))
    engine.step()
    return skipped


def _snapshot(engine):
    params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    moments = {n: engine.optimizer.state[p]["exp_avg"].clone() for n, p in engine.module.named_parameters()}
    return params, moments, engine.get_lr()[0]


def test_skip_drops_exactly_the_poisoned_update(tmp_path):
    with restored_environ():
        engine = _engine()
        guard = DivergenceGuard(policy="skip", max_skipped_steps=2)
        assert not _step(engine, guard, 1)
        before = _snapshot(engine)
        assert _step(engine, guard, 2, poison=True)
        after = _snapshot(engine)
        for a, b in zip(before[:2], after[:2]):
            for name in a:
                assert torch.equal(a[name], b[name]), name
        assert before[2] == after[2] and engine.skipped_steps == 1  # the schedule waited
        assert not _step(engine, guard, 3)  # a finite step trains again and resets the count
        assert any(not torch.equal(before[0][n], p) for n, p in engine.module.named_parameters())
        assert guard.skipped_in_a_row == 0 and guard.skipped == 1
        assert _step(engine, guard, 4, poison=True) and _step(engine, guard, 5, poison=True)
        with pytest.raises(
            TrainingDiverged,
            match=r"at step 6: the gradients are not finite after 2 skipped "
            r"steps in a row \(training.max_skipped_steps\)",
        ):
            _step(engine, guard, 6, poison=True)


def test_stop_leaves_the_weights_as_before_the_step(tmp_path):
    with restored_environ():
        engine = _engine()
        guard = DivergenceGuard(policy="stop", max_skipped_steps=10)
        _step(engine, guard, 1)
        before = _snapshot(engine)
        with pytest.raises(
            TrainingDiverged,
            match=r"at step 2: the gradients are not finite; the step was not "
            r"applied",
        ):
            _step(engine, guard, 2, poison=True)
        for name, p in engine.module.named_parameters():
            assert torch.equal(p, before[0][name]), name


@pytest.mark.parametrize(
    "policy,message",
    [
        ("stop", r"at step 2: the gradients are not finite; the step was not applied"),
        ("skip", r"at step 5: the gradients are not finite after 3 skipped steps in a row"),
    ],
)
def test_a_diverging_run_never_checkpoints_non_finite_weights(tmp_path, policy, message):
    """lr 1e6 without clipping: step 1's update leaves huge (finite) weights, every later gradient overflows."""
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=message):
        train_in_process(
            tiny_config(
                run,
                "training.steps=30",
                "checkpoint.every=1",
                "checkpoint.keep_last=5",
                "optimizer.lr=1e6",
                "training.grad_clip=0",
                "training.eval_every=0",
                "training.log_every=2",
                f"training.on_divergence={policy}",
                "training.max_skipped_steps=3",
            )
        )
    tags = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert tags == (["step_00000001"] if policy == "stop" else [f"step_0000000{i}" for i in range(1, 5)])
    for tag in tags:
        module = torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]
        assert all(torch.isfinite(t).all() for t in module.values()), tag


def test_skip_needs_the_basic_optimizer(tmp_path):
    from sigma_moe.config_check import ConfigError

    with pytest.raises(
        ConfigError, match="training.on_divergence: skip needs training.zero_stage 0 and precision fp32"
    ):
        tiny_config(tmp_path, "training.on_divergence=skip", "training.zero_stage=1")
