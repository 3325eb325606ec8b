"""Transformer-XL relative multi-head attention (Dai et al. 2019, "Transformer-XL", section 3.3).

Shapes: B batch, T queries (the segment), M memory tokens (earlier segments, no gradient),
K = M + T keys, d = d_model, H heads of size D.
    x [B, T, d], memory [B, M, d] (both already layer-normed by the block)
    q = x W_q                     [B, H, T, D]
    k, v = [memory; x] W_k, W_v   [B, H, K, D]
    r = sin(δ) W_r                [H, K, D]    δ = K-1 … 0: the distance from query to key
    score[i, j] = (q_i + u)·k_j              content term (a) + global content bias (c)
                + (q_i + v)·r_{M+i-j}        position term (b) + global position bias (d)
    y = softmax(score / sqrt(D) + mask) v W_o    [B, T, d]
Query i sits at position M + i of the keys and sees keys j <= M + i: all of the memory and its
causal past. No absolute positions anywhere, so a segment reads its memory exactly as it would read
those tokens inside one longer segment (the causal-consistency property the tests check).

The position term is computed for all K distances per query ([B, H, T, K]) and then shifted so
column j holds distance M + i - j (the "relative shift": one padded copy, no gather).
Init: projections N(0, 2 / (fan_in · n_layers)) like every projection of the pre-LN model; u, v start
at 0 (the biases are learned from plain content/position attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .init import pre_ln_std
from .positions import sinusoids


def relative_positions(key_len: int, d_model: int, *, device=None) -> torch.Tensor:
    """[K, d] float32 sinusoids of the distances K-1, K-2, …, 0 (the order ``rel_shift`` expects)."""
    return sinusoids(torch.arange(key_len - 1, -1, -1, device=device), d_model)


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """[..., T, K] with column c = distance K-1-c  ->  [..., T, K] with column j = distance K-T+i-j.

    Pad one zero column on the left, reinterpret the rows, drop the first one: row i moves left by
    T-1-i. Entries j > K-T+i (future keys) are garbage and must be masked."""
    *lead, t, k = x.shape
    padded = F.pad(x, (1, 0))  # [..., T, K+1]
    return padded.reshape(*lead, k + 1, t)[..., 1:, :].reshape(*lead, t, k)


class RelativeSelfAttention(nn.Module):
    def __init__(self, *, d_model: int, n_heads: int, head_dim: int, n_layers: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = n_heads, head_dim, dropout
        hd = n_heads * head_dim
        self.q = nn.Linear(d_model, hd, bias=False)
        self.kv = nn.Linear(d_model, 2 * hd, bias=False)
        self.pos = nn.Linear(d_model, hd, bias=False)  # W_r: sinusoid -> per-head position key
        self.out = nn.Linear(hd, d_model, bias=False)
        self.content_bias = nn.Parameter(torch.zeros(n_heads, head_dim))  # u
        self.position_bias = nn.Parameter(torch.zeros(n_heads, head_dim))  # v
        with torch.no_grad():
            for lin in (self.q, self.kv, self.pos):
                nn.init.normal_(lin.weight, std=pre_ln_std(d_model, n_layers))
            nn.init.normal_(self.out.weight, std=pre_ln_std(hd, n_layers))

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, T, d]; memory [B, M, d] or None (M = 0); positions [K, d] from
        :func:`relative_positions` (computed here if None; the LM passes one table to every layer)."""
        b, t, d = x.shape
        h, dh = self.n_heads, self.head_dim
        m = 0 if memory is None else memory.shape[1]
        if memory is not None and (memory.shape[0] != b or memory.shape[2] != d):
            raise ValueError(f"memory must be [batch={b}, M, d_model={d}], got {tuple(memory.shape)}")
        kx = x if m == 0 else torch.cat([memory, x], dim=1)  # [B, K, d]
        k_len = m + t
        if positions is None:
            positions = relative_positions(k_len, d, device=x.device)
        if positions.shape != (k_len, d):
            raise ValueError(f"positions must be [K={k_len}, d_model={d}], got {tuple(positions.shape)}")
        q = self.q(x).view(b, t, h, dh).transpose(1, 2)  # [B, H, T, D]
        k, v = self.kv(kx).view(b, k_len, 2, h, dh).permute(2, 0, 3, 1, 4)  # [B, H, K, D] each
        r = self.pos(positions.to(x.dtype)).view(k_len, h, dh).transpose(0, 1)  # [H, K, D]
        scale = dh**-0.5
        bd = rel_shift((q + self.position_bias[:, None]) @ r.transpose(-1, -2))  # [B, H, T, K]
        future = torch.ones(t, k_len, dtype=torch.bool, device=x.device).triu(m + 1)  # key j > M + i
        bias = (bd * scale).masked_fill(future, float("-inf"))
        o = F.scaled_dot_product_attention(
            q + self.content_bias[:, None],
            k,
            v,
            attn_mask=bias,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(o.transpose(1, 2).reshape(b, t, h * dh))
