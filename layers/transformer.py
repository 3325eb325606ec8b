"""Pre-LayerNorm causal Transformer language model with a pluggable feedforward block.

Shapes: B batch, T time (<= context), d = d_model, V = vocab_size.
    h = dropout(E[tokens] + P[:T])                           [B, T, d]
    each block: h = h + dropout(attn(LN(h)));  h = h + dropout(ff(LN(h)))
    logits = LN(h) W_outᵀ                                    [B, T, V]   (untied from E)
    aux_loss = Σ_layers ff.aux_loss                          scalar float32

attention = "causal" (default): absolute positions, sinusoidal (no parameters, the Vaswani et al.
table) or learned, added to the embeddings. ``model(tokens) -> LMOutput(logits, aux_loss)`` for
either attention; ``out.memory`` is None unless a memory was passed.

attention = "xl", the paper's backbone (Transformer-XL, Dai et al. 2019): relative positional
attention (``attention_xl.py``), no absolute positions, and a segment memory per layer:
    model(tokens)                -> LMOutput(logits, aux_loss)              no memory (M = 0)
    model(tokens, memory)        -> LMOutput(logits, aux_loss, new_memory)
``memory`` is a list of n_layers tensors [B, M, d]: the inputs h of each block over the previous
segments (``empty_memory(B)`` to start). ``new_memory`` holds the last ``memory_length`` of
[memory; h], detached (no gradient flows into earlier segments). ``memory_length`` is
``memory_segments · context`` in training mode and ``eval_memory_segments · context`` in eval mode
(the paper: one segment in training, four at evaluation).

Incremental decoding (generation): ``state = model.start_decoding(B)``, then ``model.decode(tokens,
state) -> logits`` for the prompt and for each new token; attention "causal" keeps a key/value cache
(at most ``context`` tokens, ``state.room``), "xl" its segment memory (``decoding.py``).

``TransformerLM(cfg, activation_checkpointing=True)`` (a run setting, ``training.activation_checkpointing``;
not part of the model config): each block is recomputed in backward instead of keeping its activations
(``activation_checkpointing.py``); outputs, aux losses, routing stats and gradients are unchanged.
Init: see ``TransformerLM.reset_parameters`` and each block's modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sigma_moe.config_check import Checked, Checks

from .activation_checkpointing import checkpointed
from .attention import CausalSelfAttention
from .attention_xl import RelativeSelfAttention, relative_positions
from .decoding import DecodeState, KVCache
from .feedforward import FeedForward, FeedForwardConfig, build_feedforward
from .positions import sinusoidal_positions

POSITIONS = ("sinusoidal", "learned")
ATTENTIONS = ("causal", "xl")


@dataclass(kw_only=True)
class TransformerConfig(Checked):
    vocab_size: int
    """Token ids the model embeds (left out in a run config: data.vocab_size)."""
    d_model: int
    """Width of the residual stream."""
    n_layers: int
    """Transformer blocks."""
    n_heads: int
    """Attention heads."""
    context: int
    """Longest sequence the model accepts (the size of the position table), and the training window."""
    ff: FeedForwardConfig
    """The feedforward block of every layer; its kind picks the variant, its other keys are that variant's."""
    dropout: float = 0.0
    """Dropout on the embeddings and on both residual branches."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities."""
    head_dim: int | None = None
    """Width of each head; null: d_model / n_heads (which must then divide)."""
    positions: str = "sinusoidal"
    """Absolute positions of attention causal: sinusoidal | learned."""
    attention: str = "causal"
    """causal, or xl: Transformer-XL relative attention with a segment memory."""
    memory_segments: int = 1
    """xl: the memory holds this many segments (× context tokens) in training."""
    eval_memory_segments: int = 4
    """xl: the same at evaluation (model.eval())."""

    def check(self, c: Checks) -> None:
        c.positive("vocab_size", "d_model", "n_layers", "n_heads", "context")
        c.probability("dropout", "attention_dropout")
        c.choice("positions", POSITIONS)
        c.choice("attention", ATTENTIONS)
        for name in ("memory_segments", "eval_memory_segments"):
            c.require(getattr(self, name) >= 0, name, "must be >= 0 (0: no memory)")
        c.require(
            not (self.attention == "xl" and self.positions == "learned"),
            "positions",
            "'learned' adds absolute positions, which attention 'xl' does not use (it encodes relative "
            "distances); remove positions or use attention 'causal'",
        )
        if self.head_dim is not None:
            c.positive("head_dim")
        elif self.n_heads > 0:
            c.require(
                self.d_model % self.n_heads == 0,
                "n_heads",
                f"does not divide d_model = {self.d_model}; set head_dim explicitly (e.g. 41 for 412 / 10)",
            )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, ff: FeedForward):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.d_model)
        self.attn = _attention(cfg)
        self.ff_norm = nn.LayerNorm(cfg.d_model)
        self.ff = ff
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        h: torch.Tensor,
        memory: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """h [B, T, d]; memory [B, M, d] and positions [M + T, d]: attention "xl" only; cache: "causal"
        only (incremental decoding)."""
        if isinstance(self.attn, RelativeSelfAttention):
            mem = None if memory is None or memory.shape[1] == 0 else self.attn_norm(memory)
            a = self.attn(self.attn_norm(h), mem, positions)
        else:
            a = self.attn(self.attn_norm(h), cache)
        h = h + self.dropout(a)
        return h + self.dropout(self.ff(self.ff_norm(h)))


def _attention(cfg: TransformerConfig) -> nn.Module:
    cls = RelativeSelfAttention if cfg.attention == "xl" else CausalSelfAttention
    return cls(
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        head_dim=cfg.resolved_head_dim,
        n_layers=cfg.n_layers,
        dropout=cfg.attention_dropout,
    )


class LMOutput(dict):
    """What :meth:`TransformerLM.forward` returns, for either attention: ``logits`` [B, T, V], ``aux_loss``
    (scalar float32: the feedforward layers' aux losses summed) and ``memory`` (attention xl, given a
    memory: the next one, see the module doc; else None), read as attributes.

    A dict, as Hugging Face's ``ModelOutput`` is, because DeepSpeed's engine finds the output tensors on
    which it hooks its backward prologue (ZeRO's gradient bookkeeping, the engine's timers) by walking
    tensors, tuples, lists and dicts only: a dataclass would hide them and skip that prologue."""

    def __init__(self, logits: torch.Tensor, aux_loss: torch.Tensor, memory: list[torch.Tensor] | None = None):
        super().__init__(logits=logits, aux_loss=aux_loss, memory=memory)

    @property
    def logits(self) -> torch.Tensor:
        return self["logits"]

    @property
    def aux_loss(self) -> torch.Tensor:
        return self["aux_loss"]

    @property
    def memory(self) -> list[torch.Tensor] | None:
        return self["memory"]


class TransformerLM(nn.Module):
    def __init__(self, cfg: TransformerConfig, *, activation_checkpointing: bool = False):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.attention == "xl":
            self.positions = None  # relative: each forward builds the sinusoids of its key distances
        elif cfg.positions == "learned":
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
        self.activation_checkpointing = activation_checkpointing  # recompute each block in backward (module doc)
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

    def compile_blocks(self, **compile_kwargs) -> None:
        """``torch.compile`` every block in place (``nn.Module.compile``: the module tree, parameter
        names and state dict keys stay as they are, so checkpoints match eager models'). Per block, not
        the whole model: blocks of one structure share one compiled graph (compile time does not grow
        with depth), and what runs between blocks (XL memory, activation checkpointing) stays eager."""
        for block in self.blocks:
            block.compile(**compile_kwargs)

    def feedforward_layers(self) -> list[FeedForward]:
        return [block.ff for block in self.blocks]

    @property
    def uses_memory(self) -> bool:
        return self.cfg.attention == "xl"

    @property
    def memory_length(self) -> int:
        """Tokens of memory kept per layer: depends on the mode (train / eval), see the module doc."""
        segments = self.cfg.memory_segments if self.training else self.cfg.eval_memory_segments
        return segments * self.cfg.context

    def empty_memory(self, batch_size: int) -> list[torch.Tensor]:
        """The memory before the first segment: n_layers tensors [B, 0, d] (device and dtype of the model)."""
        if not self.uses_memory:
            raise ValueError("model.attention is 'causal': it has no segment memory; use attention 'xl'")
        return [self.embedding.weight.new_zeros(batch_size, 0, self.cfg.d_model) for _ in self.blocks]

    def forward(self, tokens: torch.Tensor, memory: Sequence[torch.Tensor] | None = None) -> LMOutput:
        """tokens [B, T] long -> :class:`LMOutput`; with ``memory`` (attention "xl") its ``memory`` is
        the next one (see the module doc)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tuple(tokens.shape)}")
        t = tokens.shape[1]
        if t > self.cfg.context:
            raise ValueError(f"sequence length {t} exceeds the model's context {self.cfg.context}")
        if not self.uses_memory:
            if memory is not None:
                raise ValueError("memory was passed, but model.attention is 'causal'; use attention 'xl'")
            h = self.dropout(self.embedding(tokens) + self.positions[:t])
            for block in self.blocks:
                h = self._block(block, h)
            return LMOutput(*self._head(h))
        h = self.dropout(self.embedding(tokens))
        m = self._check_memory(memory, tokens.shape[0])
        positions = relative_positions(m + t, self.cfg.d_model, device=h.device)
        new_memory = []
        for i, block in enumerate(self.blocks):
            if memory is not None:
                new_memory.append(self._next_memory(memory[i], h))
            h = self._block(block, h, None if memory is None else memory[i], positions)
        return LMOutput(*self._head(h), memory=None if memory is None else new_memory)

    def start_decoding(self, batch_size: int) -> DecodeState:
        """An empty :class:`DecodeState` for :meth:`decode` (``decoding.py``)."""
        if self.uses_memory:
            return DecodeState(memory=self.empty_memory(batch_size))
        return DecodeState(caches=[KVCache(self.cfg.context) for _ in self.blocks], capacity=self.cfg.context)

    def decode(self, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """tokens [B, T] that follow the ``state.length`` tokens decoded so far -> logits [B, T, V], the
        same as a forward over all of them would give at these positions; ``state`` is advanced."""
        t = tokens.shape[1]
        if self.uses_memory:
            out = self(tokens, state.memory)
            logits, state.memory = out.logits, out.memory
        else:
            if state.room is not None and t > state.room:
                raise ValueError(
                    f"{state.length} tokens decoded and {t} more exceed the model's context {self.cfg.context}; "
                    "start again (start_decoding) from the last tokens"
                )
            h = self.dropout(self.embedding(tokens) + self.positions[state.length : state.length + t])
            for block, cache in zip(self.blocks, state.caches):
                h = block(h, cache=cache)
            logits, _ = self._head(h)
        state.length += t
        return logits

    def _block(self, block: Block, *args) -> torch.Tensor:
        return checkpointed(block, *args) if self.activation_checkpointing else block(*args)

    def _check_memory(self, memory: Sequence[torch.Tensor] | None, batch: int) -> int:
        """Memory length M; the memory must be one [B, M, d] tensor per layer, all of one length."""
        if memory is None:
            return 0
        shapes = {tuple(m.shape) for m in memory}
        m = memory[0].shape[1] if len(memory) else 0
        if len(memory) != len(self.blocks) or shapes != {(batch, m, self.cfg.d_model)}:
            raise ValueError(
                f"memory must be {len(self.blocks)} tensors [batch={batch}, M, d_model={self.cfg.d_model}] "
                f"(start with model.empty_memory(batch)), got {len(memory)} of shapes {sorted(shapes)}"
            )
        return m

    def _next_memory(self, memory: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The last memory_length positions of [memory; h], detached and in their own storage."""
        keep = self.memory_length
        full = h if memory.shape[1] == 0 else torch.cat([memory, h], dim=1)
        return full[:, full.shape[1] - min(keep, full.shape[1]) :].detach().clone()

    def _head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.output(self.final_norm(h))
        aux_loss = torch.zeros((), device=logits.device, dtype=torch.float32)
        for ff in self.feedforward_layers():
            if ff.aux_loss is not None:  # None: a layer that has no aux loss (all of ours set 0)
                aux_loss = aux_loss + ff.aux_loss
        return logits, aux_loss
