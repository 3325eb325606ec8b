"""Activation checkpointing of one Transformer block: keep only its input, recompute it in backward.

``checkpointed(block, *args)`` is ``block(*args)`` through ``torch.utils.checkpoint`` (non-reentrant):
the forward keeps none of the block's intermediate tensors, and the first backward use of one reruns the
block's forward to rebuild them. Costs about one more forward of every block per step (~+33 % of the
matmul FLOPs); saves the activations of all but one block at a time.

Why it stays correct here:
- Randomness: dropout, attention dropout and σ-MoE's expert dropout draw from the RNG; checkpoint
  saves the RNG state (CPU and the input's device) before the forward and restores it for the
  recompute, so the masks, and therefore the routing, are the same.
- Layer state (STYLE.md 11): a routed layer overwrites ``aux_loss`` and ``routing`` on every forward,
  the recompute too. The model sums the aux losses after its forward, so the loss counts each once;
  but the recomputed ``aux_loss`` would hold the recomputed block's graph (its saved activations)
  until the next forward reaches that layer again. The recompute therefore leaves the layers as it
  found them: :class:`_RestoreLayerState` puts back what the real forward left.
- Collectives: under expert parallelism the recompute reruns the all-to-all and the regulariser's
  all-reduce. Every rank recomputes the same blocks in the same order of its backward (same graph,
  same autograd order), so the collectives pair up as in the forward. The exchange meter counts the
  rerun all-to-alls: they are traffic the step really sends.
- The reentrant variant is not usable: it runs the forward without autograd, so the aux losses,
  which leave the block as layer attributes rather than outputs, would get no gradient.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .feedforward import FeedForward


class _RestoreLayerState:
    """Context of the recompute: on exit, every feedforward layer of ``block`` gets back the
    ``aux_loss`` and ``routing`` it held on entry (those of the real forward)."""

    def __init__(self, block: nn.Module):
        self.layers = [m for m in block.modules() if isinstance(m, FeedForward)]

    def __enter__(self) -> None:
        self.saved = [(ff.aux_loss, ff.routing) for ff in self.layers]

    def __exit__(self, *exc) -> bool:
        for ff, (aux_loss, routing) in zip(self.layers, self.saved):
            ff.aux_loss, ff.routing = aux_loss, routing
        self.saved = []
        return False  # an early-stopped recompute raises through here on purpose


def _contexts(block: nn.Module):
    return contextlib.nullcontext(), _RestoreLayerState(block)


def checkpointed(block: nn.Module, *args):
    """``block(*args)``, recomputed in backward instead of keeping its activations (grad mode only;
    under ``torch.no_grad`` there is nothing to keep and it is a plain call)."""
    if not torch.is_grad_enabled():
        return block(*args)
    return checkpoint(block, *args, use_reentrant=False, context_fn=partial(_contexts, block))
