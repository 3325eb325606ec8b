"""Pure-PyTorch reference CVMM: plainly correct, one row at a time per expert, autograd does the rest.

Same signatures as :func:`sigma_moe.kernels.cvmm.cvmm` and :func:`cvmm_combine`; tests compare every
backend against these. Far too slow for training.
"""

from __future__ import annotations

import torch

from .selection import ExpertSelection


def cvmm_reference(x: torch.Tensor, sel: ExpertSelection, w: torch.Tensor) -> torch.Tensor:
    """``out[r] = x[token(r)] @ w[expert(r)]`` for every sorted row r. x: [n_tokens, d_in] -> [R, d_out]."""
    return torch.einsum("ri,rio->ro", x[sel.token_ids], w[sel.expert_ids])


def cvmm_combine_reference(
    h: torch.Tensor, sel: ExpertSelection, w: torch.Tensor, gates: torch.Tensor | None
) -> torch.Tensor:
    """``out[t] = Σ_{rows r of token t} gates[r] · (h[r] @ w[expert(r)])``. h: [R, d_in] -> [n_tokens, d_out].

    ``gates`` is given per sorted row ([R]); None means weight 1.
    """
    y_rows = torch.einsum("ri,rio->ro", h, w[sel.expert_ids])
    if gates is not None:
        y_rows = y_rows * gates.unsqueeze(-1)
    out = y_rows.new_zeros(sel.n_tokens, w.shape[-1])
    return out.index_add(0, sel.token_ids, y_rows)
