"""One training step's memory per rank: a lower bound checked before the model is built, and the
fuller estimate ``sigma-moe plan`` prints. Both come from the terms below (one formula).

A config that cannot fit (``model.context: 300000``, a batch far too large) would otherwise allocate
for minutes and end in an out-of-memory kill with no message. The lower bound counts only what a step
must hold at once, so it never refuses a config that fits:

    model state        weights, gradients and AdamW state of the parameters this rank holds (experts
                       sharded /P): fp32 4 + 4 + 8 bytes per parameter; bf16/fp16 2 + 2 + 12 (fp32
                       master weights and moments); ZeRO 1 divides the optimizer state, ZeRO 2 also the
                       gradients, by the data-parallel ranks that share them (W, experts W/P)
    logits             2 · B·T·V · 4 bytes (the logits and their gradient: the cross-entropy is in fp32)
    block inputs       L · B·T·d · e bytes (at least each block's input is kept for backward)
    attention scores   per layer, where the kernel materialises them (the bound takes one [T, keys]
                       tensor per head, the estimate the three the kernels keep):
                         xl      L · B·H·T·(T+M) · e  (the relative position scores, a mask to SDPA)
                         causal  L · B·H·T·T · e on the CPU's math kernel, which SDPA takes with
                                 attention dropout; without it, and on a GPU, SDPA's fused kernels
                                 keep O(T) per head and the term is 0

The estimate adds what the backward of a block keeps besides its input, per token (elements of e
bytes): 3·d for the two LayerNorm outputs and the feedforward's input, 5·HD for q, k, v, the
attention output and its reshaped copy, and the feedforward's hidden activations before and after
the nonlinearity, 2 · (its active FLOPs per token ÷ 4d), plus 3·E fp32 router figures (logits,
scores, the regulariser's softmax) in a routed layer, and 2·d one-byte dropout masks with dropout;
with activation checkpointing only the block inputs are kept and one block's activations are rebuilt
at a time. Under expert parallelism each routed layer also keeps the rows other ranks sent it
(distributed/exchange_volume.py: (P − 1)·reach rows per token under uniform routing). (B: sequences per rank per
forward, T: model.context, V: vocabulary, d: model.d_model, L: layers, H·D = HD: heads × head size,
M: memory length, e: 4 in fp32, 2 in bf16/fp16.) The bound is compared with the memory free for this
rank: the device's free memory on a GPU, the host's available memory shared by its ranks on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from sigma_moe.config_check import ConfigError
from sigma_moe.distributed.checkpoint import routed_layers
from sigma_moe.distributed.exchange_volume import dispatch_row_bytes, rows_sent_per_token
from sigma_moe.launch.config import RunConfig
from sigma_moe.launch.deepspeed_config import micro_batch_size
from sigma_moe.layers import TransformerLM
from sigma_moe.layers.routed import RoutedConfig

GIB = 2**30
ACTIVATION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
STATE_BYTES = {"fp32": (4, 4, 8), "bf16": (2, 2, 12), "fp16": (2, 2, 12)}  # weights, gradients, optimizer


@dataclass(frozen=True)
class StepMemory:
    parts: dict[str, int]  # what -> bytes, per rank

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{name} {b / GIB:.2f} GiB" for name, b in self.parts.items())


@dataclass(frozen=True)
class ParameterCounts:
    replicated: int  # every rank holds these (attention, embeddings, norms, routers)
    experts: int  # the [N_E, ...] stacks of every routed layer, all experts
    ff_flops_per_token: int  # one feedforward layer's active forward FLOPs per token

    def held(self, ep_size: int) -> int:
        return self.replicated + self.experts // ep_size


def parameter_counts(cfg: RunConfig) -> ParameterCounts:
    """The model's parameters (built on the meta device: no memory), experts apart."""
    with torch.device("meta"):
        model = TransformerLM(cfg.model)
    experts = sum(getattr(layer, p).numel() for _, layer in routed_layers(model) for p in layer.expert_param_names)
    ff_flops = model.feedforward_layers()[0].mlp_flops_per_token()
    return ParameterCounts(sum(p.numel() for p in model.parameters()) - experts, experts, ff_flops)


def model_state_bytes(cfg: RunConfig, world_size: int, params: ParameterCounts) -> dict[str, int]:
    """Weights, gradients and optimizer state on one rank, by precision and ZeRO stage."""
    t, p = cfg.training, cfg.distributed.expert_parallel_size
    w, g, o = STATE_BYTES[t.precision]
    rep, exp = params.replicated, params.experts // p  # this rank's; data-parallel over W and W/P ranks
    shared = lambda per_param: per_param * rep // world_size + per_param * exp * p // world_size  # noqa: E731
    return {
        "weights": w * (rep + exp),
        "gradients": shared(g) if t.zero_stage >= 2 else g * (rep + exp),
        "optimizer state": shared(o) if t.zero_stage >= 1 else o * (rep + exp),
    }


def attention_score_elements(cfg: RunConfig, batch: int, device_type: str) -> int:
    """Elements of one [T, keys] score tensor per head and sequence, over a layer, where the attention
    kernel materialises them (0 where SDPA's fused kernel runs)."""
    m = cfg.model
    if m.attention == "xl":
        return batch * m.n_heads * m.context * (m.context + m.memory_segments * m.context)
    if device_type == "cpu" and m.attention_dropout > 0:  # SDPA's math kernel; flash has no dropout on CPU
        return batch * m.n_heads * m.context * m.context
    return 0


def step_memory(
    cfg: RunConfig,
    world_size: int,
    *,
    device_type: str = "cpu",
    estimate: bool = False,
    params: ParameterCounts | None = None,
) -> StepMemory:
    """The lower bound (``estimate=False``) or the estimate of one step's memory per rank."""
    m, t = cfg.model, cfg.training
    params = params or parameter_counts(cfg)
    e = ACTIVATION_BYTES[t.precision]
    B = micro_batch_size(cfg, world_size)
    tokens = B * m.context
    state = model_state_bytes(cfg, world_size, params)
    parts = (
        state
        if estimate
        else {"weights, gradients and AdamW moments": sum(state.values())}  # one figure in the error line
    )
    if estimate:  # the logits are kept for the loss's backward, their gradient is transient
        parts["logits"] = parts["logits' gradient"] = tokens * m.vocab_size * 4
    else:
        parts["logits and their gradient"] = 2 * tokens * m.vocab_size * 4
    parts["block inputs"] = m.n_layers * tokens * m.d_model * e
    scores = attention_score_elements(cfg, B, device_type) * e
    if not estimate:
        if scores:
            parts[f"{'XL' if m.attention == 'xl' else 'causal'} attention scores"] = m.n_layers * scores
        return StepMemory(parts)
    hd = m.n_heads * m.resolved_head_dim
    hidden = params.ff_flops_per_token // (4 * m.d_model)  # active hidden units per token
    router = 3 * getattr(m.ff, "n_experts", 0) * 4  # bytes per token: logits, scores, softmax (fp32)
    masks = 2 * m.d_model if m.dropout > 0 else 0  # the residual branches' dropout masks, 1 byte each
    per_block = tokens * ((3 * m.d_model + 5 * hd + 2 * hidden) * e + router + masks) + 3 * scores
    blocks = 1 if t.activation_checkpointing else m.n_layers
    name = "one block's activations (recomputed)" if t.activation_checkpointing else "block activations"
    parts[f"{name}, attention's included"] = blocks * per_block
    p = cfg.distributed.expert_parallel_size
    if isinstance(m.ff, RoutedConfig) and p > 1:  # rows other ranks sent, kept for the experts' backward
        rows = tokens * rows_sent_per_token(n_experts=m.ff.n_experts, ep_size=p, k=m.ff.k)
        row = dispatch_row_bytes(d_model=m.d_model, k=m.ff.k, element_size=e)
        parts["received expert rows"] = int(m.n_layers * rows * row)
    return StepMemory(parts)


def step_memory_lower_bound(cfg: RunConfig, world_size: int, device_type: str = "cpu") -> StepMemory:
    return step_memory(cfg, world_size, device_type=device_type)


def free_bytes_per_rank(device: torch.device, local_world_size: int) -> int:
    """Memory this rank may use: the GPU's free memory, or the host's MemAvailable over its ranks."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available // max(1, local_world_size)


def check_step_fits(cfg: RunConfig, world_size: int, device: torch.device, local_world_size: int) -> None:
    """Raise :class:`ConfigError` if one training step certainly needs more memory than this rank has."""
    free = free_bytes_per_rank(device, local_world_size)
    need = step_memory_lower_bound(cfg, world_size, device.type)
    if need.total <= free:
        return
    where = f"GPU {device}" if device.type == "cuda" else f"this host ({local_world_size} rank(s) on it)"
    raise ConfigError(
        f"memory: one training step needs at least {need.total / GIB:,.1f} GiB per rank ({need.describe()}; "
        f"model.context {cfg.model.context}, {micro_batch_size(cfg, world_size)} sequences per rank per "
        f"forward), but {where} has {free / GIB:,.1f} GiB free per rank; lower model.context or "
        f"training.batch_size, or raise training.grad_accumulation or the number of ranks"
    )
