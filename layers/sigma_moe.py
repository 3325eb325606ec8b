"""σ-MoE: sigmoid-gated top-K mixture of small ReLU experts (Csordás et al. 2023; docs/paper.md, docs/design.md).

Shapes: N tokens, d = d_model, E = n_experts, G = expert_size, K = k.
    logits = x W3ᵀ                       [N, E]
    s = sigmoid(logits)                  [N, E]   (or a softmax: the paper's ablations)
    s[dropped] = 0                       training only, per token and expert, no rescaling
    gate, idx = top-K(s)                 [N, K]   raw gates, not renormalised
    y = Σ_K gate · ReLU(x W1[idx]) W2[idx]
    aux_loss = γ · Σ_e p_e log p_e,  p = mean over the global batch of softmax(logits)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sigma_moe.config_check import Checks

from .feedforward import register_feedforward
from .init import pre_ln_std, renorm_rows_keep_std_
from .routed import RoutedConfig, RoutedExperts, Routing, at_least_float32

SELECTIONS = ("sigmoid", "softmax_before_topk", "softmax_after_topk")
INITS = ("paper", "standard")


@dataclass(kw_only=True)
class SigmaMoEConfig(RoutedConfig):
    kind: str = "sigma_moe"
    entropy_reg: float = 1e-3
    """γ of the load-balancing regulariser (entropy of the batch-mean selection); 0 turns it off."""
    expert_dropout: float = 0.0
    """δ: probability of removing an expert for a token (training only)."""
    selection: str = "sigmoid"
    """sigmoid, or the paper's ablations softmax_before_topk | softmax_after_topk."""
    init: str = "paper"
    """paper: W2 scaled by the full N_E·G; standard: per expert (fan-in G)."""

    def check(self, c: Checks) -> None:
        super().check(c)
        c.require(self.entropy_reg >= 0, "entropy_reg", "must be >= 0 (0 turns the regulariser off)")
        c.probability("expert_dropout")
        c.choice("selection", SELECTIONS)
        c.choice("init", INITS)
        c.require(
            self.expert_dropout == 0 or self.selection != "softmax_after_topk",
            "expert_dropout",
            "needs scores that are >= 0 before top-K; use selection 'sigmoid' or 'softmax_before_topk'",
        )


@register_feedforward("sigma_moe", SigmaMoEConfig)
class SigmaMoE(RoutedExperts):
    def __init__(self, cfg: SigmaMoEConfig, *, d_model: int, n_layers: int):
        super().__init__(cfg, d_model=d_model)
        self.cfg = cfg
        self.n_layers = n_layers
        self.selector = nn.Parameter(torch.empty(cfg.n_experts, d_model))  # W3, replicated under EP
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        d, L = self.d_model, self.n_layers
        nn.init.normal_(self.w1, std=pre_ln_std(d, L))
        w2_fan_in = self.n_experts * self.expert_size if self.cfg.init == "paper" else self.expert_size
        nn.init.normal_(self.w2, std=pre_ln_std(w2_fan_in, L))
        nn.init.normal_(self.selector, std=pre_ln_std(d, L))
        renorm_rows_keep_std_(self.selector)

    def route(self, x: torch.Tensor) -> Routing:
        cfg = self.cfg
        logits = at_least_float32(F.linear(x, self.selector))  # routing in fp32 under bf16/fp16
        aux_loss, mean_probs = self._entropy_regulariser(logits)

        if cfg.selection == "sigmoid":
            scores = torch.sigmoid(logits)
        elif cfg.selection == "softmax_before_topk":
            scores = torch.softmax(logits, dim=-1)
        else:  # softmax_after_topk: choose on the logits, normalise the K chosen
            scores = logits
        if self.training and cfg.expert_dropout > 0:
            # Fill 0, not -inf: scores are > 0, so a dropped expert loses to any survivor, and a token
            # with fewer than K survivors gets gate 0 (not NaN) on the extra slots.
            dropped = torch.rand_like(scores) < cfg.expert_dropout
            scores = scores.masked_fill(dropped, 0.0)
        gates, idx = scores.topk(self.k, dim=-1, sorted=False)
        if cfg.selection == "softmax_after_topk":
            gates = torch.softmax(gates, dim=-1)
        return Routing(expert_idx=idx, gates=gates, aux_loss=aux_loss, mean_probs=mean_probs)

    def _entropy_regulariser(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """γ · Σ_e p_e log p_e over the global batch, and this process's batch-mean softmax (detached).

        The per-token softmax is summed in log space (logsumexp of log-softmax), in float32 or wider.
        """
        n = logits.shape[0]
        log_probs = F.log_softmax(logits, dim=-1)
        local_sum = torch.logsumexp(log_probs, dim=0).exp()  # [E] = Σ_tokens softmax
        mean_probs = (local_sum / max(n, 1)).detach()
        if self.cfg.entropy_reg == 0:
            return log_probs.new_zeros(()), mean_probs
        p = self.global_token_mean(local_sum, n)
        # clamp: an expert whose probability underflows to 0 adds 0 (not NaN) and a finite gradient.
        log_p = p.clamp_min(torch.finfo(p.dtype).tiny).log()
        return self.cfg.entropy_reg * (p * log_p).sum(), mean_probs
