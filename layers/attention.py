"""Causal multi-head self-attention (absolute positions are added to the input by the LM).

Shapes: B batch, T time, d = d_model, H heads of size D (H·D need not equal d: the paper's 47M model
has d = 412 and 10 heads × 41).
    qkv = x W_qkv            [B, T, 3·H·D]  -> q, k, v [B, H, T, D]
    o = softmax(q kᵀ / sqrt(D) + causal mask) v, via F.scaled_dot_product_attention(is_causal=True)
    y = o W_o                [B, T, d]
With a key/value cache (incremental decoding, ``decoding.py``) the T new queries attend to the S cached
keys and causally to each other: query i sees keys j <= S + i.
No biases; weights N(0, 2 / (fan_in · n_layers)) like every projection of the pre-LN model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .decoding import KVCache
from .init import pre_ln_std


class CausalSelfAttention(nn.Module):
    def __init__(self, *, d_model: int, n_heads: int, head_dim: int, n_layers: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = n_heads, head_dim, dropout
        self.qkv = nn.Linear(d_model, 3 * n_heads * head_dim, bias=False)
        self.out = nn.Linear(n_heads * head_dim, d_model, bias=False)
        with torch.no_grad():
            nn.init.normal_(self.qkv.weight, std=pre_ln_std(d_model, n_layers))
            nn.init.normal_(self.out.weight, std=pre_ln_std(n_heads * head_dim, n_layers))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x [B, T, d]; ``cache``: the earlier tokens' keys and values, which this call extends."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        past = 0 if cache is None else cache.length
        mask = None
        if cache is not None:
            k, v = cache.append(k, v)
            if past and t > 1:  # is_causal aligns the mask top-left; here the queries sit at the end
                mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
        o = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=past == 0,  # one new query after the cache sees every key: no mask
        )
        return self.out(o.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
