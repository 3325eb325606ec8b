"""Model sizes for comparisons at equal parameter count: parameters, MLP FLOPs, parity d_ff.

MLP FLOPs follow the paper: multiply-adds × 2 of one token's forward pass through the feedforward
block (biases, activations and sorting not counted), e.g. dense 2·2·d·d_ff and σ-MoE
K·G·d·2·2 + N_E·d·2 (the selector). For a whole model they are summed over its feedforward layers.
"""
from __future__ import annotations

import torch
from torch import nn

from .feedforward import FeedForward, build_feedforward


def count_parameters(module: nn.Module) -> int:
    """Number of distinct parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())


def mlp_flops_per_token(model_or_ff: nn.Module) -> int:
    """One feedforward layer's MLP FLOPs per token, or the sum over a model's feedforward layers."""
    if isinstance(model_or_ff, FeedForward):
        return model_or_ff.mlp_flops_per_token()
    layers = [m for m in model_or_ff.modules() if isinstance(m, FeedForward)]
    if not layers:
        raise ValueError(f"{type(model_or_ff).__name__} contains no FeedForward layer")
    return sum(ff.mlp_flops_per_token() for ff in layers)


def feedforward_parameter_count(ff_cfg, d_model: int) -> int:
    """Parameters of one feedforward layer built from ``ff_cfg`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        ff = build_feedforward(ff_cfg, d_model=d_model, n_layers=1)
    return count_parameters(ff)


def parameter_equal_dense_d_ff(ff_cfg, d_model: int) -> int:
    """The dense d_ff (with biases) whose layer has as many parameters as ``ff_cfg``'s, rounded to the
    nearest: a dense layer has d_ff·(2d + 1) + d. σ-MoE 16 × 128 at d = 412 gives the paper's 2053."""
    n = feedforward_parameter_count(ff_cfg, d_model)
    return round((n - d_model) / (2 * d_model + 1))
