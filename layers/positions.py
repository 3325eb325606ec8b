"""Sinusoidal position encodings (Vaswani et al. 2017), shared by absolute and relative attention.

Shapes: P positions, d channels -> [P, d]; sin on even channels, cos on odd ones.
"""

from __future__ import annotations

import math

import torch


def sinusoids(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """[P] float positions -> [P, d] float32: wavelengths 2π … 10000·2π (any d, odd too)."""
    pos = positions.to(torch.float32)[:, None]
    freq = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32, device=positions.device) * (-math.log(10000.0) / d_model)
    )
    table = torch.zeros(len(positions), d_model, device=positions.device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : d_model // 2]
    return table


def sinusoidal_positions(context: int, d_model: int) -> torch.Tensor:
    """[context, d]: the absolute table for positions 0 … context - 1."""
    return sinusoids(torch.arange(context), d_model)
