"""The dense baseline MLP: Linear(d, d_ff) with bias → ReLU → dropout → Linear(d_ff, d) with bias.

Shapes: x [..., d] -> h [..., d_ff] -> y [..., d]. Init: N(0, 2 / (fan_in · n_layers)), zero biases
(pre-LayerNorm init of the paper).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sigma_moe.config_check import Checks

from .feedforward import FeedForward, FeedForwardConfig, register_feedforward
from .init import pre_ln_std


@dataclass(kw_only=True)
class DenseConfig(FeedForwardConfig):
    kind: str = "dense"
    d_ff: int
    """Hidden units of the MLP."""
    dropout: float = 0.0
    """Dropout on the hidden units."""

    def check(self, c: Checks) -> None:
        c.positive("d_ff")
        c.probability("dropout")

    def describe(self) -> str:
        return f"d_ff {self.d_ff}"


def init_linear_pre_ln_(linear: nn.Linear, n_layers: int) -> None:
    with torch.no_grad():
        nn.init.normal_(linear.weight, std=pre_ln_std(linear.in_features, n_layers))
        if linear.bias is not None:
            linear.bias.zero_()


@register_feedforward("dense", DenseConfig)
class Dense(FeedForward):
    """Non-routed: ``aux_loss`` is a zero scalar and ``routing`` None after every forward."""

    def __init__(self, cfg: DenseConfig, *, d_model: int, n_layers: int):
        super().__init__()
        self.cfg, self.d_model = cfg, d_model
        self.w1 = nn.Linear(d_model, cfg.d_ff)
        self.w2 = nn.Linear(cfg.d_ff, d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        init_linear_pre_ln_(self.w1, n_layers)
        init_linear_pre_ln_(self.w2, n_layers)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(F.relu(self.w1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.aux_loss = x.new_zeros((), dtype=torch.float32)
        return self.w2(self.hidden(x))

    def mlp_flops_per_token(self) -> int:
        return 2 * 2 * self.d_model * self.cfg.d_ff
