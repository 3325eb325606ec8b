"""A step that cannot fit is refused before the model is built, with the figures and the fix; a config
that fits is not; the bound counts what a step must hold (weights and optimizer state, logits, block
inputs, attention scores where the kernel keeps them), and the planner's estimate is never below it."""

from __future__ import annotations

import time

import pytest
import torch

from launch_helpers import tiny_config, train_in_process
from sigma_moe.config_check import ConfigError
from sigma_moe.launch.guards.memory_estimate import (
    GIB,
    free_bytes_per_rank,
    parameter_counts,
    step_memory,
    step_memory_lower_bound,
)


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
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))  # the folder holds only its lock


LONG_TEXT = ("the quick brown fox jumps over the lazy dog. " * 8000)[:360_000]


@pytest.mark.parametrize(
    "context, attention, part",
    [(100_000, ("model.attention=xl",), "XL"), (300_000, ("model.attention_dropout=0.1",), "causal")],
)
def test_a_long_context_is_refused_by_its_attention_scores(tmp_path, context, attention, part):
    """Enough text, the tiny config's batch of 8: the logits fit, the [T, T] scores per head do not
    (XL always keeps them; causal attention with attention dropout runs SDPA's math kernel on a CPU)."""
    text = tmp_path / "long.txt"
    text.write_text(LONG_TEXT)
    args = (f"data.path={text}", f"model.context={context}", "training.steps=1", *attention)
    start = time.monotonic()
    with pytest.raises(
        ConfigError,
        match=rf"memory: one training step needs at least .*{part} attention scores "
        rf"[\d,.]+ GiB.*model.context {context}, 8 sequences .* lower model.context",
    ):
        train_in_process(tiny_config(tmp_path / "run", *args))
    assert time.monotonic() - start < 60
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))  # the folder holds only its lock


def test_fused_causal_attention_keeps_no_scores(tmp_path):
    """Without attention dropout SDPA takes a fused (flash) kernel, on the CPU too: O(T) per head, so the
    lower bound must not count T² scores (a context of 100000 then fits in memory; it is slow, not big)."""
    import torch.nn.functional as F

    q, k, v = (torch.randn(1, 2, 512, 16, requires_grad=True) for _ in range(3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert sum(saved) < 512 * 512  # nothing [T, T] kept: the fused kernel
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1)
    assert sum(saved) > 2 * 512 * 512  # dropout: the math kernel keeps [T, T] per head
    bound = step_memory_lower_bound(tiny_config(tmp_path, "model.context=100000"), world_size=1)
    assert not any("attention" in name for name in bound.parts)
    assert bound.total < 4 * GIB


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
    causal = step_memory_lower_bound(tiny_config(tmp_path, "model.attention_dropout=0.1"), world_size=1)
    assert causal.parts["causal attention scores"] == L * 8 * cfg.model.n_heads * T * T * 4
    assert "causal attention scores" not in step_memory_lower_bound(cfg, 1, "cuda").parts  # fused kernels
    # ZeRO 1 shares AdamW's moments over the data-parallel ranks (experts over W / P of them)
    zero = step_memory_lower_bound(
        tiny_config(tmp_path, "training.batch_size=8", "distributed.expert_parallel_size=2", "training.zero_stage=1"),
        world_size=4,
    )
    params = parameter_counts(cfg)
    assert zero.parts["weights, gradients and AdamW moments"] == 8 * (params.replicated + params.experts // 2) + (
        8 * params.replicated // 4 + 8 * params.experts // 4
    )


@pytest.mark.parametrize(
    "extra",
    [(), ("model.attention=xl",), ("training.activation_checkpointing=true",), ("training.precision=bf16",)],
)
def test_the_estimate_is_never_below_the_bound(tmp_path, extra):
    cfg = tiny_config(tmp_path, "model.attention_dropout=0.1", *extra)
    assert step_memory(cfg, 1, estimate=True).total >= step_memory_lower_bound(cfg, 1).total


def test_the_default_config_fits_here():
    from launch_helpers import ROOT
    from sigma_moe.launch.config import load_config

    cfg = load_config(ROOT / "configs" / "default.yaml")
    assert step_memory_lower_bound(cfg, world_size=1).total < free_bytes_per_rank(torch.device("cpu"), 1)
    assert free_bytes_per_rank(torch.device("cpu"), 2) * 2 == pytest.approx(
        free_bytes_per_rank(torch.device("cpu"), 1), rel=0.05
    )
    assert GIB == 1 << 30
