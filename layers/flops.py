"""Model FLOPs of the Transformer LM per trained token: the numerator of MFU.

Convention (PaLM, Chowdhery et al. 2022, appendix B; Megatron-LM): matmul FLOPs only, multiply-adds
× 2; a training step costs 3 × the forward (the backward multiplies by the weights and by the
inputs). Not counted: norms, softmax, activations, residual adds, embedding lookups, routing's sort
and top-K, and activation checkpointing's recompute (model FLOPs, not hardware FLOPs).

Forward, per token (d = d_model, HD = n_heads · head_dim, T = context, L = n_layers, V = vocab_size):
    attention "causal"   2·d·3HD (q, k, v) + 2·HD·d (out) + 2·2·T·HD (q·kᵀ and p·v over all T keys:
                         no halving for the causal mask, as PaLM's 12·L·H·Q·T)
    attention "xl"       K = M + T keys, M = memory_segments · T (the training memory, full after the
                         first segment); B sequences per forward:
                         2·d·HD (q) + 2·d·2HD·K/T (k, v of memory and segment) + 2·HD·d (out)
                         + 3·2·K·HD (content score, position score, p·v over all K keys)
                         + 2·d·HD·K/(B·T) (W_r on the K distance sinusoids, once per forward)
    feedforward          the layer's own ``mlp_flops_per_token()``: its *active* FLOPs (σ-MoE: K
                         experts' 2·2·G·d plus the selector's 2·N_E·d), not its parameter count
    output layer         2·d·V (once, not per layer)
    training FLOPs per token = 3 · (L · (attention + feedforward) + 2·d·V)
The causal model's dense-MLP case is 6·N_matmul + 12·L·HD·T, PaLM's formula.
"""

from __future__ import annotations

import torch

from .feedforward import build_feedforward
from .transformer import TransformerConfig


def feedforward_flops_per_token(cfg: TransformerConfig) -> int:
    """One feedforward layer's forward FLOPs per token, from the layer's own counter (built on the
    meta device: no memory, no initialisation)."""
    with torch.device("meta"):
        ff = build_feedforward(cfg.ff, d_model=cfg.d_model, n_layers=cfg.n_layers)
    return ff.mlp_flops_per_token()


def attention_forward_flops(cfg: TransformerConfig, *, batch_size: int) -> int:
    """One attention layer's forward FLOPs on ``batch_size`` sequences of ``context`` tokens."""
    d, hd, t = cfg.d_model, cfg.n_heads * cfg.resolved_head_dim, cfg.context
    tokens = batch_size * t
    if cfg.attention == "causal":
        return tokens * (2 * d * 3 * hd + 2 * hd * d + 2 * 2 * t * hd)
    keys = cfg.memory_segments * t + t
    per_query = 2 * d * hd + 2 * hd * d + 3 * 2 * keys * hd
    return tokens * per_query + batch_size * keys * 2 * d * 2 * hd + keys * 2 * d * hd


def forward_flops(cfg: TransformerConfig, *, batch_size: int) -> int:
    """The model's forward FLOPs on ``batch_size`` sequences of ``context`` tokens."""
    tokens = batch_size * cfg.context
    per_layer = attention_forward_flops(cfg, batch_size=batch_size) + tokens * feedforward_flops_per_token(cfg)
    return cfg.n_layers * per_layer + tokens * 2 * cfg.d_model * cfg.vocab_size


def training_flops_per_token(cfg: TransformerConfig, *, batch_size: int = 1) -> float:
    """Model FLOPs of one trained token (forward and backward), for forwards of ``batch_size``
    sequences (it matters only for attention "xl", by the position projection's share)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return 3 * forward_flops(cfg, batch_size=batch_size) / (batch_size * cfg.context)
