"""Incremental decoding state: what a model keeps between calls so each new token costs one position.

Shapes: B batch, H heads of size D, S tokens cached (<= capacity = the model's context), d = d_model.

- attention "causal": a :class:`KVCache` per layer, the keys and values of every token seen so far,
  [B, H, S, D] in a buffer allocated once at ``capacity`` (appending never copies the past). The
  absolute positions of the next tokens start at ``DecodeState.length``, so the cache holds at most
  ``context`` tokens: ``room`` says how many more fit (the caller restarts from a shorter window).
- attention "xl": the segment memory of ``TransformerLM.forward`` (n_layers tensors [B, M, d], the
  block inputs of the last ``memory_length`` tokens); each call is one more segment. Relative
  positions make this exact, and the memory slides by itself: there is no room limit.

Either way ``TransformerLM.decode(tokens, state)`` returns the logits that a forward over every token
decoded so far would give at the new positions (within float summation order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCache:
    """The keys and values one causal attention layer has seen, [B, H, S, D] each."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0
        self._k: torch.Tensor | None = None  # [B, H, capacity, D], allocated at the first append
        self._v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new tokens' k, v [B, H, T, D]; return every cached k, v [B, H, S + T, D] (views)."""
        b, h, t, dh = k.shape
        end = self.length + t
        if end > self.capacity:
            raise ValueError(f"the key/value cache holds {self.capacity} tokens; {self.length} + {t} do not fit")
        if self._k is None:
            self._k = k.new_empty(b, h, self.capacity, dh)
            self._v = v.new_empty(b, h, self.capacity, dh)
        self._k[:, :, self.length : end] = k
        self._v[:, :, self.length : end] = v
        self.length = end
        return self._k[:, :, :end], self._v[:, :, :end]


@dataclass
class DecodeState:
    """What ``TransformerLM.decode`` carries from one call to the next (``TransformerLM.start_decoding``)."""

    length: int = 0  # tokens decoded so far (absolute position of the next one, attention "causal")
    caches: list[KVCache] | None = None  # attention "causal": one per layer
    memory: list[torch.Tensor] | None = None  # attention "xl": one [B, M, d] per layer
    capacity: int | None = None  # attention "causal": the context; None: unbounded (xl)

    @property
    def room(self) -> int | None:
        """Tokens that can still be decoded with this state; None: no limit (the XL memory slides)."""
        return None if self.capacity is None else self.capacity - self.length
