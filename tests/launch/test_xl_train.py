"""The paper's backbone end to end: tiny Transformer-XL runs through the CLI and resume bit-exactly
(segment memory and stream position saved per rank), evaluation in stream order with memory, config
errors, and the paper configs using it."""

from __future__ import annotations

import shutil

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch_helpers import ROOT, one_thread, restored_environ, tiny_overrides, train_in_process
from sigma_moe.config_check import ConfigError
from sigma_moe.launch.checkpoint.manifest import write_manifest
from sigma_moe.launch.cli import main
from sigma_moe.launch.config import load_config
from sigma_moe.launch.data.splits import load_token_splits
from sigma_moe.launch.evaluate import evaluate_checkpoint
from sigma_moe.launch.train import batching

TINY_XL = ROOT / "configs" / "tiny-xl.yaml"
N = 6
# Dropout, expert dropout and two micro-batch slots (two memories per rank), logged every step.
NOISY = (
    "model.dropout=0.1",
    "model.ff.expert_dropout=0.1",
    "training.grad_accumulation=2",
    "training.eval_every=0",
    "training.log_every=1",
)


def _cli_train(run_dir, *extra):
    with restored_environ(), one_thread():
        argv = ["train", str(TINY_XL)]
        for item in tiny_overrides(run_dir, *extra):
            argv += ["--set", item]
        assert main(argv) == 0


def _logged_losses(run_dir) -> dict[int, float]:
    acc = EventAccumulator(str(run_dir / run_dir.name), size_guidance={"scalars": 0})  # RUN_DIR/<run name>
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("xl") / "full"
    _cli_train(run_dir, f"training.steps={2 * N}", f"checkpoint.every={N}", "checkpoint.keep_last=2", *NOISY)
    return run_dir


def test_cli_run_resumes_bit_exactly(full_run, tmp_path):
    ckpt = full_run / "checkpoints" / f"step_{N:08d}"
    _cli_train(tmp_path / "resumed", f"training.steps={2 * N}", f"checkpoint.resume={ckpt}", *NOISY)
    full, resumed = _logged_losses(full_run), _logged_losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(N + 1, 2 * N + 1))
    assert resumed == {s: full[s] for s in resumed}  # exact: weights, optimizer, data, RNG and memory


def test_checkpoint_holds_each_slots_memory_and_the_stream_position(full_run):
    cfg = load_config(TINY_XL, tiny_overrides(full_run, *NOISY))
    state = torch.load(full_run / "checkpoints" / f"step_{N:08d}" / "rank_00000.pt", weights_only=False)
    assert state["sampler"]["kind"] == "stream" and state["sampler"]["segment"] == N
    slots = state["memory"]["slots"]
    micro = cfg.training.batch_size // cfg.training.grad_accumulation
    want = (micro, cfg.model.memory_segments * cfg.model.context, cfg.model.d_model)
    assert len(slots) == 2 and all(len(m) == cfg.model.n_layers for m in slots)
    assert all(t.shape == want for m in slots for t in m)
    assert not torch.equal(slots[0][0], slots[1][0])  # two slots read different columns


def test_resume_without_the_memory_differs(full_run, tmp_path):
    """The bit-exact resume above depends on the saved memory: dropping it changes the next loss."""
    src = full_run / "checkpoints" / f"step_{N:08d}"
    ckpt = tmp_path / "ckpt" / src.name
    shutil.copytree(src, ckpt)
    state = torch.load(ckpt / "rank_00000.pt", weights_only=False)
    del state["memory"]
    torch.save(state, ckpt / "rank_00000.pt")
    write_manifest(ckpt)  # a deliberate edit: list the new file, or the damaged checkpoint is refused
    cfg = load_config(
        TINY_XL,
        tiny_overrides(
            tmp_path / "run",
            f"training.steps={N + 1}",
            f"checkpoint.resume={ckpt}",
            "checkpoint.save_final=false",
            *NOISY,
        ),
    )
    resumed = train_in_process(cfg)
    full = _logged_losses(full_run)
    assert abs(resumed.losses[0] - full[N + 1]) > 1e-4


def test_evaluation_of_the_checkpoint_streams_the_whole_split_with_memory(full_run):
    cfg = load_config(TINY_XL, tiny_overrides(full_run, *NOISY))
    with restored_environ(), one_thread():
        res = evaluate_checkpoint(cfg, str(full_run / "checkpoints"), splits=("valid",))["valid"]
        no_memory = evaluate_checkpoint(
            load_config(TINY_XL, tiny_overrides(full_run, *NOISY, "model.eval_memory_segments=0")),
            str(full_run / "checkpoints"),
            splits=("valid",),
        )["valid"]
    splits = load_token_splits(cfg.data)
    assert res.n_tokens == no_memory.n_tokens == len(splits.valid) - 1
    assert res.loss < no_memory.loss  # the memory of earlier segments helps predict this one


def test_batching_resolves_and_bad_combinations_fail():
    base = tiny_overrides(ROOT / "runs" / "unused")
    assert batching(load_config(TINY_XL, base)) == "stream"
    assert batching(load_config(ROOT / "configs" / "tiny.yaml", base)) == "random"
    assert batching(load_config(ROOT / "configs" / "tiny.yaml", [*base, "training.batching=stream"])) == "stream"
    with pytest.raises(ConfigError, match="training.batching: random"):
        load_config(TINY_XL, [*base, "training.batching=random"])
    # no memory in training: random windows are fine
    assert batching(load_config(TINY_XL, [*base, "training.batching=random", "model.memory_segments=0"])) == "random"
    with pytest.raises(ConfigError, match="positions"):
        load_config(TINY_XL, [*base, "model.positions=learned"])


@pytest.mark.parametrize("name", ["wt103-47m-sigma-moe", "enwik8-41m-dense", "wt103-262m-pkm", "c4-47m-switch"])
def test_paper_configs_use_the_papers_backbone(name):
    cfg = load_config(ROOT / "configs" / "paper" / f"{name}.yaml")
    m = cfg.model
    assert (m.attention, m.memory_segments, m.eval_memory_segments) == ("xl", 1, 4)
    assert batching(cfg) == "stream"


@pytest.mark.multiprocess
def test_two_expert_parallel_ranks_train_like_one_process(tmp_path):
    """torchrun, 2 ranks, expert_parallel_size 2: each rank streams its half of the columns and keeps
    its own memory; together they train as one process on the whole batch does."""
    import os
    import subprocess
    import sys

    from ranks import free_port

    steps = ("training.steps=8", "training.eval_every=0", "training.log_every=1", "checkpoint.save_final=false")
    one = train_in_process(load_config(TINY_XL, tiny_overrides(tmp_path / "one", *steps)))
    binary = os.path.dirname(sys.executable)
    port = free_port()
    sets = tiny_overrides(tmp_path / "two", *steps, "distributed.expert_parallel_size=2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port), "PATH": f"{binary}:{os.environ['PATH']}"}
    proc = subprocess.run(
        [
            os.path.join(binary, "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
            "-m",
            "sigma_moe.launch.train",
            str(TINY_XL),
            *[x for s in sets for x in ("--set", s)],
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = _logged_losses(tmp_path / "two")
    assert sorted(two) == list(range(1, 9))
    for step, loss in two.items():
        assert loss == pytest.approx(one.losses[step - 1], rel=1e-4), step
    assert one.losses[-1] < one.losses[0] - 0.5  # it learns, with memory from step 2 on
