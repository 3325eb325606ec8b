"""Model FLOPs, TFLOP/s and MFU: the formula against torch's FLOP counter, the peak table, and what a
training run logs to TensorBoard and prints at the end."""

from __future__ import annotations

import math
import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.nn.attention import SDPBackend, sdpa_kernel

from launch_helpers import one_thread, tiny_config, train_in_process
from sigma_moe.launch.monitor.throughput import Throughput, si, table_peak_tflops
from sigma_moe.layers import DenseConfig, SigmaMoEConfig, TransformerConfig, TransformerLM
from sigma_moe.layers.flops import forward_flops, training_flops_per_token


def counted_flops(model: TransformerLM, tokens: torch.Tensor, memory, *, backward: bool) -> int:
    """torch's own count of the matmul FLOPs (SDPA through its math path, which the counter sees)."""
    # imported here, not at collection: it imports triton, which must first see test_triton_cvmm's
    # TRITON_INTERPRET=1 (set when that module is collected) or its kernels cannot run on a CPU
    from torch.utils.flop_counter import FlopCounterMode

    args = (tokens,) if memory is None else (tokens, memory)
    with one_thread(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        with torch.set_grad_enabled(backward):
            out = model(*args)
            if backward:
                (out.logits.square().mean() + out.aux_loss).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("attention", ["causal", "xl"])
@pytest.mark.parametrize(
    "ff", [DenseConfig(d_ff=48), SigmaMoEConfig(n_experts=8, expert_size=12, k=3)], ids=["dense", "sigma_moe"]
)
def test_formula_matches_torchs_flop_counter(ff, attention):
    """Forward exactly; forward + backward within 5 % of 3 × (the backward skips the gradients of
    inputs that need none: tokens' positions, XL's memory and distance table)."""
    torch.manual_seed(0)
    cfg = TransformerConfig(
        vocab_size=50,
        d_model=24,
        n_layers=2,
        n_heads=3,
        head_dim=5,
        context=16,
        ff=ff,
        attention=attention,
        memory_segments=2,
    )
    model = TransformerLM(cfg).train()
    batch = 3
    tokens = torch.randint(0, 50, (batch, cfg.context))
    memory = None if attention == "causal" else [torch.randn(batch, 2 * cfg.context, 24) for _ in range(2)]
    assert counted_flops(model, tokens, memory, backward=False) == forward_flops(cfg, batch_size=batch)
    trained = training_flops_per_token(cfg, batch_size=batch) * batch * cfg.context
    assert counted_flops(model, tokens, memory, backward=True) == pytest.approx(trained, rel=0.05)


def test_routed_layers_count_active_flops_only():
    base = dict(vocab_size=50, d_model=24, n_layers=2, n_heads=3, context=16)
    few = TransformerConfig(**base, ff=SigmaMoEConfig(n_experts=8, expert_size=12, k=2))
    many = TransformerConfig(**base, ff=SigmaMoEConfig(n_experts=64, expert_size=12, k=2))
    # 8× the experts adds only the selector's 2·d FLOPs per expert, per layer, × 3 for training
    assert training_flops_per_token(many) - training_flops_per_token(few) == 3 * 2 * 2 * 24 * 56


def test_peak_table_and_mfu():
    assert table_peak_tflops("NVIDIA H200", "bf16") == 989.5
    assert table_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.5
    assert table_peak_tflops("NVIDIA H100 PCIe", "fp16") == 756.5
    assert table_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert table_peak_tflops("NVIDIA GeForce RTX 3090", "bf16") is None
    assert table_peak_tflops("cpu", "fp32") is None
    t = Throughput(
        flops_per_token=2e9, tokens_per_step=1000, world_size=4, peak_tflops_per_device=100.0, peak_source="test"
    )
    assert t.scalars(50_000) == {"tflops_per_s": 100.0, "mfu": 0.25}
    assert t.summary(steps=10, seconds=0.2) == "100 TFLOP/s of model FLOPs, MFU 25.00%"
    assert si(1.234e13) == "12.34 T" and si(149e3) == "149 k" and si(12.0) == "12 "
    no_peak = Throughput(2e9, 1000, 4, None, "cpu, fp32")
    assert no_peak.scalars(50_000)["mfu"] is None and "MFU" not in no_peak.summary(10, 0.2)
    assert "set training.peak_tflops_per_device" in no_peak.describe()


def test_training_logs_tflops_and_mfu(tmp_path, capsys):
    peak = 0.25
    run_dir = tmp_path / "run"
    cfg = tiny_config(
        run_dir,
        "training.steps=4",
        "training.log_every=1",
        "training.eval_every=0",
        "checkpoint.save_final=false",
        f"training.peak_tflops_per_device={peak}",
    )
    train_in_process(cfg)
    acc = EventAccumulator(str(cfg.logging.tensorboard_dir()), size_guidance={"scalars": 0})
    acc.Reload()
    tokens_per_s = {e.step: e.value for e in acc.Scalars("train/tokens_per_s")}
    tflops = {e.step: e.value for e in acc.Scalars("train/tflops_per_s")}
    mfu = {e.step: e.value for e in acc.Scalars("train/mfu")}
    assert sorted(tflops) == sorted(mfu) == sorted(tokens_per_s) == [1, 2, 3, 4]
    flops_per_step = (
        training_flops_per_token(cfg.model, batch_size=cfg.training.batch_size)
        * cfg.training.batch_size
        * cfg.model.context
    )
    for step, rate in tokens_per_s.items():
        step_seconds = cfg.training.batch_size * cfg.model.context / rate
        assert tflops[step] == pytest.approx(flops_per_step / step_seconds / 1e12, rel=1e-5)
        assert mfu[step] == pytest.approx(tflops[step] / peak, rel=1e-5)
    out = capsys.readouterr().out
    assert f"peak {peak:g} TFLOP/s per device (training.peak_tflops_per_device) × 1" in out
    summary = re.search(
        r"done: 4 steps in \d+ s \(training steps: ([\d.]+) ([kMGT]?)FLOP/s of model FLOPs, "
        r"MFU ([\d.]+)%\)",
        out,
    )
    assert summary, out
    overall = float(summary.group(1)) * {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[summary.group(2)] / 1e12
    overall_mfu = float(summary.group(3)) / 100
    assert min(tflops.values()) * 0.999 <= overall <= max(tflops.values()) * 1.001  # total ÷ total time
    assert overall_mfu == pytest.approx(overall / peak, rel=1e-3, abs=1e-4)
    assert math.isfinite(overall) and overall > 0
