"""Evaluation: mean cross-entropy per token over a split, perplexity, bits per byte; unigram baseline.

Bits per byte = total nats / ln 2 / bytes of text those tokens encode, so byte-level and BPE runs are
comparable (for bytes it is bits per character, the enwik8 figure).

A model with segment memory (``model.attention: xl``) is evaluated in stream order: the split as
W·B contiguous columns read front to back, each batch with the memory of the previous ones
(``model.eval_memory_segments`` segments, the paper's four); every target is still counted once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from sigma_moe.distributed.collectives import world_all_reduce_
from sigma_moe.launch.data.sampling import IGNORE_INDEX, eval_batches

if TYPE_CHECKING:  # the session imports DeepSpeed
    from sigma_moe.launch.session import Session
    from sigma_moe.launch.world import World

logger = logging.getLogger(__name__)
FEW_TOKENS = 1000  # a split evaluated whole on fewer targets than this gets a warning


def perplexity(nats_per_token: float) -> float:
    """exp(loss), capped where exp would overflow (a diverging run's loss)."""
    return math.exp(min(nats_per_token, 700.0))


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy, nats per token
    n_tokens: int
    bytes_per_token: float | None  # None: unknown, no bits per byte

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)

    @property
    def bits_per_byte(self) -> float | None:
        if not self.bytes_per_token:
            return None
        return self.loss / math.log(2) / self.bytes_per_token

    def scalars(self) -> dict[str, float]:
        out = {"loss": self.loss, "perplexity": self.perplexity}
        if self.bits_per_byte is not None:
            out["bits_per_byte"] = self.bits_per_byte
        return out

    def describe(self) -> str:
        bpb = f", {self.bits_per_byte:.3f} bits/byte" if self.bits_per_byte is not None else ""
        return f"loss {self.loss:.4f}, perplexity {self.perplexity:.2f}{bpb} ({self.n_tokens:,} tokens)"


@torch.no_grad()
def evaluate(
    model,
    tokens: np.ndarray,
    *,
    batch_size: int,
    seq_len: int,
    max_batches: int | None,
    device: torch.device,
    world: World | None = None,
    bytes_per_token: float | None = None,
    on_forward: Callable[[], None] | None = None,
) -> EvalResult:
    """Collective over the process group: each rank takes its share of the windows (padding targets
    are ``IGNORE_INDEX``), the sums of nats and of real targets are reduced over ranks. ``on_forward``
    is called after each forward (the monitor reads the routing there). ``world``: this rank's place
    (:func:`evaluate_split` passes the session's); None for one process.

    ``model`` is the DeepSpeed engine or a plain :class:`TransformerLM`; when it ``uses_memory`` the
    memory is carried from batch to batch."""
    rank, world_size = (world.rank, world.world_size) if world is not None else (0, 1)
    module = getattr(model, "module", model)  # the engine's model
    with_memory = bool(getattr(module, "uses_memory", False))
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)  # [sum of nats, tokens]
    try:
        memory = module.empty_memory(batch_size) if with_memory else None
        for x, y in eval_batches(
            tokens,
            batch_size=batch_size,
            seq_len=seq_len,
            max_batches=max_batches,
            rank=rank,
            world_size=world_size,
            stream=with_memory,
        ):
            out = model(x.to(device), memory)
            memory = out.memory
            if on_forward is not None:
                on_forward()
            y = y.to(device).flatten()
            nats = F.cross_entropy(out.logits.float().flatten(0, 1), y, reduction="sum", ignore_index=IGNORE_INDEX)
            total += torch.tensor([float(nats), int((y != IGNORE_INDEX).sum())], dtype=torch.float64)
    finally:
        model.train(was_training)
    world_all_reduce_(total)
    n = int(total[1])
    if n == 0:
        raise ValueError(
            f"no evaluation windows: the split has {len(tokens)} tokens, fewer than "
            f"seq_len + 1 = {seq_len + 1}; use more data or a shorter model.context"
        )
    if max_batches is None and n < FEW_TOKENS:  # a whole split this small: a figure, but not a measurement
        logger.warning(
            "evaluated on %d tokens only: a loss and perplexity this noisy say little; give the split at least %d",
            n,
            FEW_TOKENS,
        )
    return EvalResult(float(total[0]) / n, n, bytes_per_token)


def unigram_perplexity(train: np.ndarray, valid: np.ndarray, vocab_size: int) -> float:
    """Perplexity on ``valid`` of token frequencies counted on ``train`` (add-one smoothed): the
    baseline a language model must clearly beat."""
    if hasattr(train, "token_counts"):  # token shards: counted in blocks, never loaded whole
        counts = train.token_counts(vocab_size).astype(np.float64) + 1.0
    else:
        counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[np.asarray(valid, dtype=np.int64)].mean()))


def evaluate_split(s: Session, split: str, *, max_batches: int | None, on_forward=None) -> EvalResult:
    """The session's model on one of its splits (collective over all ranks)."""
    return evaluate(
        s.engine,
        s.splits.split(split),
        batch_size=s.micro_batch,
        seq_len=s.cfg.model.context,
        max_batches=max_batches,
        device=s.world.device,
        world=s.world,
        bytes_per_token=s.splits.bytes_per_token.get(split),
        on_forward=on_forward,
    )


def checkpoint_session(cfg, checkpoint: str) -> Session:
    """A session of the model ``cfg`` describes, with the weights of ``checkpoint`` (a checkpoint
    folder, one tag folder, or an export folder)."""
    from sigma_moe.launch.checkpoint.weights import load_model_weights, resolve_weights
    from sigma_moe.launch.session import start_session

    source = resolve_weights(checkpoint)  # fails before any work if it is neither
    s = start_session(cfg)
    load_model_weights(
        s.engine.module, source, model_config=s.model_config, expert_parallel_size=s.expert_parallel_size
    )
    return s


def evaluate_checkpoint(
    cfg, checkpoint: str, *, splits: tuple[str, ...] = ("valid", "test"), max_batches: int | None = None
) -> dict[str, EvalResult]:
    """Load the weights of ``checkpoint`` into the model ``cfg`` describes and evaluate it on ``splits``
    (collective over all ranks)."""
    s = checkpoint_session(cfg, checkpoint)
    return {name: evaluate_split(s, name, max_batches=max_batches) for name in splits}
