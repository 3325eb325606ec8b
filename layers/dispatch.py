"""Expert dispatchers: how a routed layer's (token, expert, gate) assignments reach the experts.

A routed layer computes routing, then calls ``dispatcher(x, expert_idx, gates, run_experts)`` where
``run_experts(x_rows, sel, row_gates) -> y`` applies its *local* expert weights to the rows of ``sel``
(see :func:`sigma_moe.kernels.cvmm_combine`). The default :class:`LocalDispatcher` runs every expert in
this process. ``sigma_moe.distributed`` swaps in an all-to-all dispatcher with the same interface and
gives the layer its shard of experts; the layer's code does not change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from sigma_moe.kernels import ExpertSelection, prepare_selection

# run_experts(x [n, d], sel, gates per sorted row [R] or None) -> [sel.n_tokens, d]
RunExperts = Callable[[torch.Tensor, ExpertSelection, "torch.Tensor | None"], torch.Tensor]


class ExpertDispatcher(Protocol):
    def __call__(
        self, x: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor, run_experts: RunExperts
    ) -> torch.Tensor: ...


class LocalDispatcher:
    """All experts live here: sort the assignments and run the fused expert matmuls directly.

    x [N, d], expert_idx [N, K] (global expert ids), gates [N, K] -> y [N, d].
    """

    def __init__(self, n_experts: int) -> None:
        self.n_experts = n_experts

    def __call__(
        self, x: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor, run_experts: RunExperts
    ) -> torch.Tensor:
        sel = prepare_selection(expert_idx, self.n_experts)
        return run_experts(x, sel, sel.sort_rows(gates))
