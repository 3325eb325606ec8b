"""A lower bound of one training step's memory per rank, checked before the model is built.

A config that cannot fit (``model.context: 300000``, a batch far too large) would otherwise allocate
for minutes and end in an out-of-memory kill with no message. The bound counts only what a step must
hold at once, so it never refuses a config that fits:

    weights, gradients, AdamW's two moments   16 bytes per parameter on this rank (experts sharded /P)
    logits and their gradient                 2 · B·T·V · 4 bytes (the cross-entropy is in fp32)
    block inputs kept for backward            L · B·T·d · 4 bytes (at least each block's input)
    XL attention scores                       L · B·H·T·(T+M) · 4 bytes (relative scores, no fused kernel)

(B: sequences per rank per forward, T: model.context, V: vocabulary, d: model.d_model, L: layers,
H: heads, M: memory length). It is compared with the memory free for this rank: the device's free
memory on a GPU, the host's available memory shared by the ranks on it on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from sigma_moe.distributed.checkpoint import routed_layers
from sigma_moe.launch.config import ConfigError, RunConfig
from sigma_moe.launch.deepspeed_config import micro_batch_size
from sigma_moe.layers import TransformerLM

GIB = 2**30


@dataclass(frozen=True)
class StepMemory:
    parts: dict[str, int]  # what -> bytes, per rank

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{name} {b / GIB:.2f} GiB" for name, b in self.parts.items())


def step_memory_lower_bound(cfg: RunConfig, world_size: int) -> StepMemory:
    m = cfg.model
    with torch.device("meta"):
        model = TransformerLM(m)
    expert_params = sum(
        getattr(layer, p).numel() for _, layer in routed_layers(model) for p in layer.expert_param_names
    )  # the [N_E, ...] stacks, sharded over the EP ranks
    params = sum(p.numel() for p in model.parameters())
    held = params - expert_params + expert_params // cfg.distributed.expert_parallel_size
    B, T = micro_batch_size(cfg, world_size), m.context
    parts = {
        "weights, gradients and AdamW moments": 16 * held,
        "logits and their gradient": 2 * B * T * m.vocab_size * 4,
        "block inputs": m.n_layers * B * T * m.d_model * 4,
    }
    if m.attention == "xl":
        memory = m.memory_segments * T
        parts["XL attention scores"] = m.n_layers * B * m.n_heads * T * (T + memory) * 4
    return StepMemory(parts)


def free_bytes_per_rank(device: torch.device, local_world_size: int) -> int:
    """Memory this rank may use: the GPU's free memory, or the host's MemAvailable over its ranks."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available // max(1, local_world_size)


def check_step_fits(cfg: RunConfig, world_size: int, device: torch.device, local_world_size: int) -> None:
    """Raise :class:`ConfigError` if one training step certainly needs more memory than this rank has."""
    free = free_bytes_per_rank(device, local_world_size)
    need = step_memory_lower_bound(cfg, world_size)
    if need.total <= free:
        return
    where = f"GPU {device}" if device.type == "cuda" else f"this host ({local_world_size} rank(s) on it)"
    raise ConfigError(
        f"memory: one training step needs at least {need.total / GIB:,.1f} GiB per rank ({need.describe()}; "
        f"model.context {cfg.model.context}, {micro_batch_size(cfg, world_size)} sequences per rank per "
        f"forward), but {where} has {free / GIB:,.1f} GiB free per rank; lower model.context or "
        f"training.batch_size, or raise training.grad_accumulation or the number of ranks"
    )
