"""Pre-LayerNorm causal Transformer language model with a pluggable feedforward block.

Shapes: B batch, T time (<= context), d = d_model, V = vocab_size.
    h = dropout(E[tokens] + P[:T])                           [B, T, d]
    each block: h = h + dropout(attn(LN(h)));  h = h + dropout(ff(LN(h)))
    logits = LN(h) W_outᵀ                                    [B, T, V]   (untied from E)
    aux_loss = Σ_layers ff.aux_loss                          scalar float32

Positions are absolute: sinusoidal (default; no parameters, the Vaswani et al. table) or learned.
The paper uses Transformer-XL relative attention; that is a later option of ``attention``, which is
why the attention module is built in one place (``_attention``) and positions are added only here.
Init: see ``TransformerLM.reset_parameters`` and each block's modules.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .attention import CausalSelfAttention
from .config_check import check_choice, check_positive, check_probability, check_types, require
from .feedforward import (
    FeedForward,
    build_feedforward,
    feedforward_config_class,
    feedforward_config_from_dict,
    feedforward_kinds,
)

POSITIONS = ("sinusoidal", "learned")


@dataclass(kw_only=True)
class TransformerConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    context: int  # longest sequence the model accepts (size of the position table)
    ff: Any  # any registered feedforward config: DenseConfig, SigmaMoEConfig, ...
    dropout: float = 0.0  # on the embeddings and on both residual branches
    attention_dropout: float = 0.0  # on the attention probabilities
    head_dim: int | None = None  # None: d_model // n_heads (must divide)
    positions: str = "sinusoidal"  # or "learned"

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "context")
        check_probability(self, "dropout", "attention_dropout")
        check_choice(self, "positions", POSITIONS)
        if self.head_dim is None:
            require(
                self.d_model % self.n_heads == 0,
                self,
                "n_heads",
                f"does not divide d_model = {self.d_model}; set head_dim explicitly (e.g. 41 for 412 / 10)",
            )
        else:
            check_positive(self, "head_dim")
        if isinstance(self.ff, dict):
            self.ff = _ff_from_dict(self.ff)
        kind = getattr(self.ff, "kind", None)
        registered = isinstance(kind, str) and kind in feedforward_kinds()
        if not registered or type(self.ff) is not feedforward_config_class(kind):
            raise TypeError(
                f"TransformerConfig.ff must be a mapping with a 'kind' (or a feedforward config), got {self.ff!r}"
            )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        """Nested dict (e.g. from YAML) -> config; unknown or missing keys are named in the error."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in the model config; valid keys: {sorted(fields)}")
        missing = sorted(
            n
            for n, f in fields.items()
            if n not in d and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ValueError(f"model config lacks required key(s) {missing}")
        return cls(**d)


def _ff_from_dict(d: dict):
    try:
        return feedforward_config_from_dict(dict(d))
    except (TypeError, ValueError) as e:
        raise type(e)(f"in model config 'ff': {e}") from e


def sinusoidal_positions(context: int, d_model: int) -> torch.Tensor:
    """[context, d]: sin on even, cos on odd channels, wavelengths 2π … 10000·2π (any d, odd too)."""
    pos = torch.arange(context, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(context, d_model)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : d_model // 2]
    return table


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, ff: FeedForward):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.d_model)
        self.attn = _attention(cfg)
        self.ff_norm = nn.LayerNorm(cfg.d_model)
        self.ff = ff
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.dropout(self.attn(self.attn_norm(h)))
        return h + self.dropout(self.ff(self.ff_norm(h)))


def _attention(cfg: TransformerConfig) -> nn.Module:
    return CausalSelfAttention(
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        head_dim=cfg.resolved_head_dim,
        n_layers=cfg.n_layers,
        dropout=cfg.attention_dropout,
    )


class TransformerLM(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.positions == "learned":
            self.positions = nn.Parameter(torch.empty(cfg.context, cfg.d_model))
        else:
            self.register_buffer("positions", sinusoidal_positions(cfg.context, cfg.d_model), persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg, build_feedforward(cfg.ff, d_model=cfg.d_model, n_layers=cfg.n_layers))
            for _ in range(cfg.n_layers)
        )
        self.final_norm = nn.LayerNorm(cfg.d_model)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Embeddings N(0, 1) (the sinusoids have the same scale); learned positions likewise; the
        output projection N(0, 1/d), so the logits start at unit scale after the final LayerNorm.
        Blocks initialise themselves (pre-LN rule, N(0, 2 / (fan_in · n_layers)))."""
        nn.init.normal_(self.embedding.weight)
        if isinstance(self.positions, nn.Parameter):
            nn.init.normal_(self.positions)
        nn.init.normal_(self.output.weight, std=self.cfg.d_model**-0.5)

    def feedforward_layers(self) -> list[FeedForward]:
        return [block.ff for block in self.blocks]

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] long -> (logits [B, T, V], aux_loss: the feedforward aux losses summed)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tuple(tokens.shape)}")
        t = tokens.shape[1]
        if t > self.cfg.context:
            raise ValueError(f"sequence length {t} exceeds the model's context {self.cfg.context}")
        h = self.dropout(self.embedding(tokens) + self.positions[:t])
        for block in self.blocks:
            h = block(h)
        logits = self.output(self.final_norm(h))
        aux_loss = torch.zeros((), device=logits.device, dtype=torch.float32)
        for ff in self.feedforward_layers():
            if ff.aux_loss is not None:  # None: a layer that has no aux loss (all of ours set 0)
                aux_loss = aux_loss + ff.aux_loss
        return logits, aux_loss
