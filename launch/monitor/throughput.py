"""Model TFLOP/s and MFU of a training run.

    tflops_per_s = model FLOPs per trained token × tokens per second / 1e12      (the whole job's)
    mfu          = tflops_per_s / (peak TFLOP/s per device × world size)
Model FLOPs per token: :func:`sigma_moe.layers.flops.training_flops_per_token` (3 × the forward's
matmul FLOPs, the routed layers' *active* FLOPs; recompute not counted). The peak is
``training.peak_tflops_per_device`` when set, else the data-sheet dense peak of a known GPU at the
run's precision (:data:`PEAK_TFLOPS`); on a CPU, or on a GPU not in the table, there is no MFU
unless it is set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sigma_moe.layers.flops import training_flops_per_token

# Dense (no 2:4 sparsity) peaks per GPU, TFLOP/s, from NVIDIA's data sheets: bf16 / fp16 on tensor
# cores; fp32 without TF32 (torch's default for matmuls). First matching name wins (case-insensitive).
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200 NVL", {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.5, "fp16": 989.5, "fp32": 67.0}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "fp32": 51.0}),
    ("H100", {"bf16": 989.5, "fp16": 989.5, "fp32": 67.0}),  # SXM: "NVIDIA H100 80GB HBM3"
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def table_peak_tflops(name: str, precision: str) -> float | None:
    """The table's peak for a device called ``name`` (e.g. "NVIDIA H200") at ``precision``, or None."""
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peaks.get(precision)
    return None


@dataclass(frozen=True)
class Throughput:
    """Turns step timings into model TFLOP/s and MFU."""

    flops_per_token: float  # model FLOPs of one trained token
    tokens_per_step: int  # the global batch
    world_size: int
    peak_tflops_per_device: float | None
    peak_source: str  # where the peak came from, for the log

    @classmethod
    def of_run(cls, cfg, *, world_size: int, micro_batch: int, device: torch.device) -> Throughput:
        """For a RunConfig ``cfg`` on ``world_size`` devices like ``device``."""
        peak, source = cfg.training.peak_tflops_per_device, "training.peak_tflops_per_device"
        name = device_name(device)
        if peak is None:
            peak = table_peak_tflops(name, cfg.training.precision)
            source = f"{name}, {cfg.training.precision}"
        return cls(
            training_flops_per_token(cfg.model, batch_size=micro_batch),
            cfg.training.batch_size * cfg.model.context,
            world_size,
            peak,
            source,
        )

    def tflops_per_s(self, tokens_per_s: float) -> float:
        return self.flops_per_token * tokens_per_s / 1e12

    def mfu(self, tokens_per_s: float) -> float | None:
        if self.peak_tflops_per_device is None:
            return None
        return self.tflops_per_s(tokens_per_s) / (self.peak_tflops_per_device * self.world_size)

    def scalars(self, tokens_per_s: float) -> dict[str, float | None]:
        """TensorBoard figures for a step that processed ``tokens_per_s`` (the global batch's rate);
        ``mfu`` is None (not logged) without a peak."""
        return {"tflops_per_s": self.tflops_per_s(tokens_per_s), "mfu": self.mfu(tokens_per_s)}

    def describe(self) -> str:
        peak = (
            f"peak {self.peak_tflops_per_device:g} TFLOP/s per device ({self.peak_source}) × {self.world_size}"
            if self.peak_tflops_per_device is not None
            else f"no MFU: no peak figure for {self.peak_source}; set training.peak_tflops_per_device"
        )
        return f"model FLOPs: {si(self.flops_per_token)}FLOP per trained token; {peak}"

    def summary(self, steps: int, seconds: float) -> str:
        """'X TFLOP/s of model FLOPs, MFU Y%' over ``steps`` training steps that took ``seconds`` in all."""
        if steps <= 0 or seconds <= 0:
            return "none timed"
        tokens_per_s = steps * self.tokens_per_step / seconds
        mfu = self.mfu(tokens_per_s)
        rate = f"{si(self.tflops_per_s(tokens_per_s) * 1e12)}FLOP/s of model FLOPs"
        return rate + (f", MFU {mfu:.2%}" if mfu is not None else "")


def si(x: float) -> str:
    """4 significant digits and an SI prefix, with its space: 1.234e13 -> '12.34 T'."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.4g} {prefix}"
    return f"{x:.4g} "
