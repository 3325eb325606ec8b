"""Expert-sharded checkpoints with real processes: 4 ranks, E = 2 (so only EDP rank 0 of each expert
slice writes). Resuming at the same size continues exactly like the uninterrupted run (weights,
AdamW state); the weights load at E = 4 and in one process, each expert by its global id."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_distributed_ep import EP, Case, build_model, global_batch, loss_fn, rank_rows

from ranks import run_ranks

pytestmark = pytest.mark.multiprocess

CASE = Case("ckpt", "mixed", 2, (5, 11, 2, 8))
TAG = "step_1"


def _engine(ep_size: int):
    import deepspeed

    from sigma_moe.distributed import moe_param_groups, parallelize

    model = parallelize(build_model(CASE), EP(ep_size))
    optimizer = torch.optim.AdamW(moe_param_groups(list(model.parameters())), lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _step(engine, rank: int, world: int, seed: int) -> None:
    x, target = global_batch(Case("ckpt", "mixed", 2, CASE.sizes, seed=seed))
    rows = rank_rows(CASE, rank)
    y = engine(x[rows])
    engine.backward(loss_fn(engine.module, y, target[rows], world / sum(CASE.sizes)))
    engine.step()


def _state(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _worker(rank: int, world: int, save_dir: str) -> dict:
    import torch.distributed as dist

    from sigma_moe.distributed.checkpoint import load_weights, module_loader, save_experts

    engine = _engine(2)
    _step(engine, rank, world, seed=1)
    engine.save_checkpoint(save_dir, tag=TAG)
    save_experts(engine.module, Path(save_dir) / TAG)
    dist.barrier()
    saved = _state(engine)
    _step(engine, rank, world, seed=2)  # the uninterrupted run
    continued = _state(engine)

    resumed = _engine(2)
    resumed.load_checkpoint(save_dir, tag=TAG, custom_load_fn=module_loader(Path(save_dir) / TAG))
    loaded = _state(resumed)
    _step(resumed, rank, world, seed=2)

    wider = _engine(4)  # weights only, another expert-parallel size
    load_weights(wider.module, Path(save_dir) / TAG)
    return {
        "saved": saved,
        "continued": continued,
        "loaded": loaded,
        "resumed": _state(resumed),
        "wider": _state(wider),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[list[dict], Path]:
    save_dir = tmp_path_factory.mktemp("ckpt")
    return run_ranks(_worker, 4, str(save_dir), timeout=150), save_dir


def _exact(a, b, what):
    torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")


def test_one_file_per_layer_and_global_expert(results):
    _, save_dir = results
    names = sorted(p.name for p in (save_dir / TAG).glob("layer_*_expert_*"))
    assert names == sorted(f"layer_{i}_expert_{g}_mp_rank_00_model_states.pt" for i in range(3) for g in range(8))


def test_resume_at_the_same_size_is_exact(results):
    ranks, _ = results
    for rank, res in enumerate(ranks):
        for name in res["saved"]:
            _exact(res["loaded"][name], res["saved"][name], f"rank {rank} loaded {name}")
            _exact(res["resumed"][name], res["continued"][name], f"rank {rank} step after resume {name}")


def _full(ranks: list[dict], key: str, name: str, ep_size: int) -> torch.Tensor:
    """The whole expert stack from the shards of EP ranks 0..E-1 (ranks 0..E-1 hold them)."""
    return torch.cat([ranks[r][key][name] for r in range(ep_size)])


def test_weights_load_at_other_sizes(results):
    from sigma_moe.distributed.checkpoint import load_weights

    ranks, save_dir = results
    one = build_model(CASE)
    load_weights(one, save_dir / TAG)  # one process: every expert of every layer
    for name, p in one.named_parameters():
        want = _full(ranks, "saved", name, 2) if name.endswith((".w1", ".w2")) else ranks[0]["saved"][name]
        _exact(p.detach(), want, f"one process {name}")
        for rank, res in enumerate(ranks):  # E = 4: rank r holds experts [2r, 2r + 2)
            expect = want[2 * rank : 2 * rank + 2] if name.endswith((".w1", ".w2")) else want
            _exact(res["wider"][name], expect, f"E=4 rank {rank} {name}")


def test_missing_expert_file_is_named(results, tmp_path):
    from sigma_moe.distributed.checkpoint import CheckpointMismatch, load_weights

    _, save_dir = results
    tag = tmp_path / TAG
    tag.mkdir()
    for f in (save_dir / TAG).iterdir():
        if f.name != "layer_1_expert_5_mp_rank_00_model_states.pt":
            (tag / f.name).symlink_to(f)
    with pytest.raises(CheckpointMismatch, match=r"expert 5 of routed layer 1 \(2\) is missing"):
        load_weights(build_model(CASE), tag)
