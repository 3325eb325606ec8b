"""Weight initialisation of the paper (pre-LayerNorm models).

Every projection is drawn from N(0, 2 / (fan_in · n_layers)): the He std, shrunk by the depth so the
residual stream does not grow with the number of blocks (docs/paper.md, "Init"). σ-MoE's W2 takes the *full*
d_ff = N_E·G as fan-in, not the expert size: the experts together replace one dense MLP.
"""

from __future__ import annotations

import math

import torch


def pre_ln_std(fan_in: int, n_layers: int) -> float:
    return math.sqrt(2.0 / (fan_in * n_layers))


@torch.no_grad()
def renorm_rows_keep_std_(w: torch.Tensor) -> torch.Tensor:
    """Give every row of ``w [rows, d]`` the same norm, then rescale the whole matrix back to its
    std before the call. Unequal selector rows starve the experts whose rows are small."""
    std = w.std()
    w.div_(w.norm(dim=-1, keepdim=True))
    w.mul_(std / w.std())
    return w
