"""S-BASE: BASE layers' balanced assignment, approximated by a few Sinkhorn iterations (Clark et al.
2022), as the paper's baseline.

Shapes: N tokens, d = d_model, E = n_experts, G = expert_size, K = k.
    logits = x W3ᵀ                          [N, E]
    training:  idx = top-K(sinkhorn(logits)) balanced choice, no gradient through Sinkhorn
    inference: idx = top-K(logits)
    gate = sigmoid(logits[idx])              [N, K]
    y = Σ_K gate · ReLU(x W1[idx]) W2[idx]

Sinkhorn runs over the whole batch (all tokens of all sequences; the paper's code does it per
sequence), and its column sums go through ``token_sum``, so under data parallelism it balances the
global batch. No auxiliary loss. Init as σ-MoE's "paper" init (the paper runs S-BASE in the same layer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sigma_moe.config_check import Checks

from .feedforward import register_feedforward
from .init import pre_ln_std, renorm_rows_keep_std_
from .reduction import LocalTokenSum
from .routed import RoutedConfig, RoutedExperts, Routing, at_least_float32


@dataclass(kw_only=True)
class SBaseConfig(RoutedConfig):
    kind: str = "sbase"
    sinkhorn_iters: int = 3
    """Sinkhorn iterations of the balanced assignment (training only)."""

    def check(self, c: Checks) -> None:
        super().check(c)
        c.require(self.sinkhorn_iters >= 0, "sinkhorn_iters", "must be >= 0")


@torch.no_grad()
def sinkhorn_log(
    logits: torch.Tensor, n_iters: int, token_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """Log-space Sinkhorn on ``logits [N, E]``: each iteration normalises every token's row to mass 1,
    then every expert's column (summed over the global batch by ``token_sum``) to mass 1. Returns the
    log of the balanced matrix; its columns sum to 1 exactly after the last iteration.

    Rows are normalised first, so every exp() is <= 1 and the column sums cannot overflow; a column
    that underflows to 0 is clamped to the smallest normal number instead of giving log(0).
    """
    token_sum = token_sum or LocalTokenSum()
    x = at_least_float32(logits)
    tiny = torch.finfo(x.dtype).tiny
    for _ in range(n_iters):
        x = x - torch.logsumexp(x, dim=-1, keepdim=True)
        x = x - token_sum(x.exp().sum(0)).clamp_min(tiny).log()
    return x


@register_feedforward("sbase", SBaseConfig)
class SBase(RoutedExperts):
    def __init__(self, cfg: SBaseConfig, *, d_model: int, n_layers: int):
        super().__init__(cfg, d_model=d_model)
        self.cfg = cfg
        self.n_layers = n_layers
        self.selector = nn.Parameter(torch.empty(cfg.n_experts, d_model))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        d, L = self.d_model, self.n_layers
        nn.init.normal_(self.w1, std=pre_ln_std(d, L))
        nn.init.normal_(self.w2, std=pre_ln_std(self.n_experts * self.expert_size, L))
        nn.init.normal_(self.selector, std=pre_ln_std(d, L))
        renorm_rows_keep_std_(self.selector)

    def route(self, x: torch.Tensor) -> Routing:
        logits = at_least_float32(F.linear(x, self.selector))  # routing in fp32 under bf16/fp16
        if self.training:
            choice = sinkhorn_log(logits.detach(), self.cfg.sinkhorn_iters, self.token_sum)
        else:
            choice = logits.detach()
        idx = choice.topk(self.k, dim=-1, sorted=False).indices
        gates = torch.sigmoid(logits.gather(-1, idx))
        with torch.no_grad():
            mean_probs = torch.softmax(logits, dim=-1).mean(0)
        return Routing(expert_idx=idx, gates=gates, aux_loss=mean_probs.new_zeros(()), mean_probs=mean_probs)
