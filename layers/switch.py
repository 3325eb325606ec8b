"""Switch Transformer feedforward (Fedus et al. 2021) as the paper's baseline: softmax router, top-K
(K = 1 by default), gate = the softmax probability, no capacity factor and no dropped tokens.

Shapes: N tokens, d = d_model, E = n_experts, G = expert_size, K = k.
    probs = softmax(x W3ᵀ)                     [N, E]
    gate, idx = top-K(probs)                   [N, K]
    y = Σ_K gate · ReLU(x W1[idx]) W2[idx]
    aux_loss = coef · E · Σ_e f_e · P_e
f_e: fraction of the global batch's N·K assignments that go to e (no gradient; Σ f = 1 for any K);
P_e: mean router probability of e over the global batch.

Init ("init scale" s = 0.1 of the Switch paper): truncated normal, std sqrt(s / fan_in), cut at ±2 std,
for W1 (fan-in d), W2 (fan-in G: each expert is its own MLP) and the router (fan-in d).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sigma_moe.config_check import Checks

from .feedforward import register_feedforward
from .routed import RoutedConfig, RoutedExperts, Routing, at_least_float32


@dataclass(kw_only=True)
class SwitchConfig(RoutedConfig):
    kind: str = "switch"
    k: int = 1
    """Experts per token (the Switch Transformer's top-1)."""
    aux_loss_coef: float = 0.01
    """Coefficient of the load-balancing loss E·Σ_e f_e·P_e; 0 turns it off."""
    init_scale: float = 0.1
    """s of the Switch paper's init: truncated normal, std sqrt(s / fan_in)."""

    def check(self, c: Checks) -> None:
        super().check(c)
        c.positive("init_scale")
        c.require(self.aux_loss_coef >= 0, "aux_loss_coef", "must be >= 0 (0 turns it off)")


def trunc_normal_scaled_(w: torch.Tensor, scale: float, fan_in: int) -> None:
    std = math.sqrt(scale / fan_in)
    nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


@register_feedforward("switch", SwitchConfig)
class Switch(RoutedExperts):
    def __init__(self, cfg: SwitchConfig, *, d_model: int, n_layers: int):
        super().__init__(cfg, d_model=d_model)
        self.cfg = cfg
        self.selector = nn.Parameter(torch.empty(cfg.n_experts, d_model))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        s = self.cfg.init_scale
        trunc_normal_scaled_(self.w1, s, self.d_model)
        trunc_normal_scaled_(self.w2, s, self.expert_size)
        trunc_normal_scaled_(self.selector, s, self.d_model)

    def route(self, x: torch.Tensor) -> Routing:
        n, e, k = x.shape[0], self.n_experts, self.k
        probs = torch.softmax(at_least_float32(F.linear(x, self.selector)), dim=-1)
        gates, idx = probs.topk(k, dim=-1, sorted=False)
        mean_probs = (probs.sum(0) / max(n, 1)).detach()
        if self.cfg.aux_loss_coef == 0:
            aux_loss = probs.new_zeros(())
        else:
            # counts / K summed over tokens, divided by the global N: f_e = count_e / (N·K).
            assigned = torch.bincount(idx.reshape(-1), minlength=e).to(probs.dtype) / k
            means = self.global_token_mean(torch.cat([probs.sum(0), assigned]), n)
            big_p, f = means[:e], means[e:]
            aux_loss = self.cfg.aux_loss_coef * e * (f * big_p).sum()
        return Routing(expert_idx=idx, gates=gates, aux_loss=aux_loss, mean_probs=mean_probs)
