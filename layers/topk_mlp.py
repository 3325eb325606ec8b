"""Top-K activation MLP: the dense MLP keeping only the K largest hidden activations of each token.

Shapes: x [..., d] -> h [..., d_ff] (K non-zero per token) -> y [..., d]. The mask is chosen after
dropout and without gradient; gradients flow through the kept units only. Saves the W2 part of the
compute (a sparse second matmul); this module computes it densely, which is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sigma_moe.config_check import Checks

from .dense import Dense, DenseConfig
from .feedforward import FeedForwardConfig, register_feedforward


@dataclass(kw_only=True)
class TopKMLPConfig(FeedForwardConfig):
    kind: str = "topk_mlp"
    d_ff: int
    """Hidden units of the MLP."""
    k: int
    """Hidden units kept per token (the K largest activations)."""
    dropout: float = 0.0
    """Dropout on the hidden units."""

    def check(self, c: Checks) -> None:
        c.positive("d_ff", "k")
        c.require(self.k <= self.d_ff, "k", f"cannot exceed d_ff = {self.d_ff}")
        c.probability("dropout")

    def describe(self) -> str:
        return f"d_ff {self.d_ff}, K {self.k}"


@register_feedforward("topk_mlp", TopKMLPConfig)
class TopKMLP(Dense):
    def __init__(self, cfg: TopKMLPConfig, *, d_model: int, n_layers: int):
        super().__init__(DenseConfig(d_ff=cfg.d_ff, dropout=cfg.dropout), d_model=d_model, n_layers=n_layers)
        self.cfg = cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.aux_loss = x.new_zeros((), dtype=torch.float32)
        h = self.hidden(x)
        with torch.no_grad():
            keep = torch.zeros_like(h).scatter_(-1, h.topk(self.cfg.k, dim=-1).indices, 1.0)
        return self.w2(h * keep)

    def mlp_flops_per_token(self) -> int:
        """The full first matmul, and K columns of the second (multiply-adds × 2)."""
        return 2 * self.d_model * self.cfg.d_ff + 2 * self.cfg.k * self.d_model
