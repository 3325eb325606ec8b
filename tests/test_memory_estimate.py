"""A step that cannot fit is refused before the model is built, with the figures and the fix; a config
that fits is not; the bound counts what a step must hold (weights and optimizer state, logits, block inputs)."""

from __future__ import annotations

import time

import pytest
import torch

from launch_helpers import tiny_config, train_in_process
from sigma_moe.launch.config import ConfigError
from sigma_moe.launch.guards.memory_estimate import GIB, free_bytes_per_rank, step_memory_lower_bound


def test_a_context_that_cannot_fit_is_refused_before_allocating(tmp_path):
    text = tmp_path / "long.txt"
    text.write_text(("the quick brown fox jumps over the lazy dog. " * 8000)[:360_000])
    cfg_args = (f"data.path={text}", "model.context=300000", "training.batch_size=1024", "training.steps=1")
    start = time.monotonic()
    with pytest.raises(
        ConfigError,
        match=r"memory: one training step needs at least [\d,.]+ GiB per rank "
        r"\(.*logits and their gradient [\d.]+ GiB.*model.context 300000, 1024 "
        r"sequences per rank per forward\), but this host .* GiB free per rank; "
        r"lower model.context or training.batch_size",
    ):
        train_in_process(tiny_config(tmp_path / "run", *cfg_args))
    assert time.monotonic() - start < 60  # nothing of the 630 GB was allocated
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_bound_counts_what_a_step_must_hold(tmp_path):
    cfg = tiny_config(tmp_path, "training.batch_size=8")
    one = step_memory_lower_bound(cfg, world_size=1)
    two = step_memory_lower_bound(
        tiny_config(tmp_path, "training.batch_size=8", "distributed.expert_parallel_size=2"), world_size=2
    )
    B, T, V, d, L = 8, cfg.model.context, cfg.model.vocab_size, cfg.model.d_model, cfg.model.n_layers
    assert one.parts["logits and their gradient"] == 2 * B * T * V * 4
    assert one.parts["block inputs"] == L * B * T * d * 4
    ff = cfg.model.ff
    experts = 2 * L * ff.n_experts * d * ff.expert_size  # w1 and w2 of every layer
    # two EP ranks: half the experts each, half the batch each
    assert (
        one.parts["weights, gradients and AdamW moments"] - two.parts["weights, gradients and AdamW moments"]
        == 16 * experts // 2
    )
    assert two.parts["logits and their gradient"] == one.parts["logits and their gradient"] // 2
    xl = step_memory_lower_bound(tiny_config(tmp_path, "model.attention=xl"), world_size=1)
    assert xl.parts["XL attention scores"] == L * 8 * cfg.model.n_heads * T * 2 * T * 4


def test_the_default_config_fits_here():
    from launch_helpers import ROOT
    from sigma_moe.launch.config import load_config

    cfg = load_config(ROOT / "configs" / "default.yaml")
    assert step_memory_lower_bound(cfg, world_size=1).total < free_bytes_per_rank(torch.device("cpu"), 1)
    assert free_bytes_per_rank(torch.device("cpu"), 2) * 2 == pytest.approx(
        free_bytes_per_rank(torch.device("cpu"), 1), rel=0.05
    )
    assert GIB == 1 << 30
