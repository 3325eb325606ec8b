"""Shared body of the routed feedforward layers (σ-MoE, Switch, S-BASE): expert weights, the expert
MLP over sorted rows, and the forward that hands routing to the dispatcher.

Shapes: N tokens (batch × time flattened), d = d_model, E = n_experts (global), E_loc = local experts
(E in one process, a shard under expert parallelism), G = expert_size, K experts per token,
R = N·K (token, slot) rows sorted by expert.

Contract relied on by ``sigma_moe.distributed`` (keep it):
- ``n_experts`` (global), ``w1 [E_loc, d, G]``, ``w2 [E_loc, G, d]``, ``expert_param_names``;
- ``dispatcher(x, expert_idx, gates, run_experts) -> y`` and ``token_sum(t) -> t`` are plain
  attributes that may be replaced from outside;
- ``run_experts`` reads ``self.w1`` / ``self.w2`` at call time, so a swapped-in shard is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sigma_moe.config_check import Checks
from sigma_moe.kernels import ExpertSelection, count_per_expert, cvmm, cvmm_combine

from .dispatch import ExpertDispatcher, LocalDispatcher
from .feedforward import FeedForward, FeedForwardConfig, RoutingStats
from .reduction import LocalTokenSum


@dataclass(kw_only=True)
class RoutedConfig(FeedForwardConfig):
    """What every routed variant's config has (σ-MoE, Switch, S-BASE), and its checks."""

    n_experts: int
    """N_E: experts of the layer (over all ranks under expert parallelism)."""
    expert_size: int
    """G: hidden units of each expert."""
    k: int
    """Experts per token."""
    dropout: float = 0.0
    """Standard dropout on the expert hidden units."""
    backend: str = "auto"
    """CVMM backend: auto | reference | torch | triton."""

    def check(self, c: Checks) -> None:
        c.positive("n_experts", "expert_size", "k")
        c.require(self.k <= self.n_experts, "k", f"cannot exceed n_experts = {self.n_experts}")
        c.probability("dropout")

    def describe(self) -> str:
        return f"{self.n_experts}×{self.expert_size}, K {self.k}"


@dataclass
class Routing:
    """What a routed layer's ``route`` decides for N tokens."""

    expert_idx: torch.Tensor  # [N, K] long, global expert ids
    gates: torch.Tensor  # [N, K], weight of each chosen expert's output
    aux_loss: torch.Tensor  # scalar, float32 or wider, added to the LM loss
    mean_probs: torch.Tensor  # [E] detached, this process's batch-mean selection distribution


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Routing statistics and losses in float32 when the model runs in half precision."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class RoutedExperts(FeedForward):
    """Base of the routed layers. Subclasses create their selector, initialise, and implement ``route``."""

    expert_param_names = ("w1", "w2")

    def __init__(self, cfg: RoutedConfig, *, d_model: int):
        super().__init__()
        n_experts, expert_size = cfg.n_experts, cfg.expert_size
        self.d_model, self.n_experts, self.expert_size, self.k = d_model, n_experts, expert_size, cfg.k
        self.backend = cfg.backend
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, expert_size))
        self.w2 = nn.Parameter(torch.empty(n_experts, expert_size, d_model))
        self.hidden_dropout = nn.Dropout(cfg.dropout)  # on the expert hidden units
        self.dispatcher: ExpertDispatcher = LocalDispatcher(n_experts)
        self.token_sum = LocalTokenSum()
        self.track_units = False  # set by the monitor: routing.units_fired of each forward
        self._units_fired: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> Routing:
        raise NotImplementedError

    def global_token_mean(self, local_sum: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """Mean over the tokens of the global batch, from this process's sum over its N tokens
        (``local_sum [M]``): sums and count go through ``token_sum`` together, one reduction."""
        count = local_sum.new_full((1,), float(n_tokens))
        total = self.token_sum(torch.cat([local_sum, count]))
        return total[:-1] / total[-1].clamp_min(1)  # no tokens anywhere: the sums are 0, and so is the mean

    def run_experts(self, x: torch.Tensor, sel: ExpertSelection, row_gates: torch.Tensor | None) -> torch.Tensor:
        """``Σ_slots gate · ReLU(x W1[e]) W2[e]`` over the rows of ``sel`` -> [sel.n_tokens, d]."""
        h = F.relu(cvmm(x, sel, self.w1, backend=self.backend))
        if self.track_units:  # h ≥ 0: a unit fired for some row of expert e iff its sum over e's rows is > 0
            sums = h.new_zeros(sel.n_experts, h.shape[-1]).index_add_(0, sel.expert_ids, h.detach())
            fired = sums > 0
            self._units_fired = fired if self._units_fired is None else self._units_fired | fired
        h = self.hidden_dropout(h)
        return cvmm_combine(h, sel, self.w2, row_gates, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if shape[-1] != self.d_model:
            raise ValueError(f"input's last dim must be d_model = {self.d_model}, got shape {tuple(shape)}")
        x = x.reshape(-1, self.d_model)
        r = self.route(x)
        self._units_fired = None  # run_experts may run twice per forward (experts here, rows received)
        y = self.dispatcher(x, r.expert_idx, r.gates.to(x.dtype), self.run_experts)
        self.aux_loss = r.aux_loss
        self.routing = RoutingStats(
            tokens_per_expert=count_per_expert(r.expert_idx, self.n_experts).detach(),
            mean_probs=r.mean_probs.detach(),
            n_tokens=x.shape[0],
            units_fired=self._units_fired,
        )
        self._units_fired = None
        return y.reshape(shape)

    def mlp_flops_per_token(self) -> int:
        """K experts × two G×d matmuls, plus the selector's E×d (multiply-adds × 2)."""
        return self.k * self.expert_size * self.d_model * 2 * 2 + self.n_experts * self.d_model * 2

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_experts={self.n_experts}, expert_size={self.expert_size}, "
            f"k={self.k}, backend={self.backend!r}"
        )
