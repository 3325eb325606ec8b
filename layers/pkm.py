"""Product-Key Memory feedforward (Lample et al. 2019) in the paper's form: no query projection.

Shapes: N tokens, d = d_model, H = n_heads, n = n_keys (sub-keys per half), k = knn, M = n² values.
Every head reads the same input, split in halves x = [x₁, x₂] (d/2 each); head h has its own sub-keys
K_h¹, K_h² [n, d/2]. The score of value (i, j) is x₁·K_h¹[i] + x₂·K_h²[j], so its top-k lies among the
k² sums of the per-half top-k:
    per head:  top-k of x₁ K_h¹ᵀ and of x₂ K_h²ᵀ   [N, H, 2, k]
               k² candidate sums -> top-k          [N, H, k]  (scores, value ids i·n + j)
    joint:     concatenate heads -> [N, H·k], one activation (ReLU or softmax) over the joint list
    y = Σ act · V[id]                              [N, d]  (EmbeddingBag-style weighted sum)

Init: sub-keys U(±1/sqrt(d/2)) (Lample et al.); values N(0, 1/d) ("standard", Lample et al.) or
N(0, 2/(M·L)) ("paper": σ-MoE's W2 init, the M values playing the role of d_ff units).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sigma_moe.config_check import Checks

from .feedforward import FeedForward, FeedForwardConfig, register_feedforward
from .init import pre_ln_std


@dataclass(kw_only=True)
class PKMConfig(FeedForwardConfig):
    kind: str = "pkm"
    n_keys: int
    """Sub-keys per half; the memory has n_keys² values."""
    n_heads: int = 4
    """Query heads."""
    knn: int = 32
    """Values kept per head."""
    activation: str = "relu"
    """relu, or softmax over the heads' joint list."""
    value_init: str = "standard"
    """standard, or paper."""
    dropout: float = 0.0
    """Dropout on the activations of the selected values."""

    def check(self, c: Checks) -> None:
        c.positive("n_keys", "n_heads", "knn")
        c.require(self.knn <= self.n_keys, "knn", f"cannot exceed n_keys = {self.n_keys}")
        c.choice("activation", ("relu", "softmax"))
        c.choice("value_init", ("standard", "paper"))
        c.probability("dropout")

    def describe(self) -> str:
        return f"{self.n_keys}² values, {self.n_heads} heads, knn {self.knn}"


@register_feedforward("pkm", PKMConfig)
class PKM(FeedForward):
    """Non-routed: ``aux_loss`` is a zero scalar and ``routing`` None after every forward."""

    def __init__(self, cfg: PKMConfig, *, d_model: int, n_layers: int):
        super().__init__()
        if d_model % 2:
            raise ValueError(f"PKM splits the input in halves: d_model = {d_model} must be even")
        self.cfg, self.d_model, self.n_layers = cfg, d_model, n_layers
        self.keys = nn.Parameter(torch.empty(cfg.n_heads, 2, cfg.n_keys, d_model // 2))
        self.values = nn.Parameter(torch.empty(cfg.n_keys**2, d_model))
        self.dropout = nn.Dropout(cfg.dropout)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.d_model // 2)
        nn.init.uniform_(self.keys, -bound, bound)
        if self.cfg.value_init == "paper":
            std = pre_ln_std(self.cfg.n_keys**2, self.n_layers)
        else:
            std = self.d_model**-0.5
        nn.init.normal_(self.values, std=std)

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, d] -> (scores [N, H·knn], value ids [N, H·knn]): each head's top-knn values."""
        n_keys, knn = self.cfg.n_keys, self.cfg.knn
        halves = x.view(x.shape[0], 2, self.d_model // 2)
        sub_scores = torch.einsum("nsc,hskc->nhsk", halves, self.keys)  # [N, H, 2, n_keys]
        top, ids = sub_scores.topk(knn, dim=-1)  # [N, H, 2, knn]
        cand = top[:, :, 0, :, None] + top[:, :, 1, None, :]  # [N, H, knn, knn]
        cand_ids = ids[:, :, 0, :, None] * n_keys + ids[:, :, 1, None, :]
        scores, pos = cand.flatten(2).topk(knn, dim=-1)  # [N, H, knn]
        value_ids = cand_ids.flatten(2).gather(-1, pos)
        return scores.flatten(1), value_ids.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.d_model)
        self.aux_loss = x.new_zeros((), dtype=torch.float32)
        scores, value_ids = self.select(x)
        act = F.relu(scores) if self.cfg.activation == "relu" else torch.softmax(scores, dim=-1)
        act = self.dropout(act)
        y = F.embedding_bag(value_ids, self.values, mode="sum", per_sample_weights=act.to(self.values.dtype))
        return y.reshape(shape)

    def mlp_flops_per_token(self) -> int:
        """Sub-key scores (H heads × 2 halves × n_keys × d/2) plus the H·knn values read (× 2)."""
        h, n, k, d = self.cfg.n_heads, self.cfg.n_keys, self.cfg.knn, self.d_model
        return 2 * h * n * d + 2 * h * k * d
