"""Windows of token ids: random, seeded and resumable for training; in order and exhaustive for evaluation.

Shapes: B = batch_size (per rank), T = seq_len, W = world_size (data-parallel ranks). A window is T + 1
consecutive ids; ``inputs = window[:-1]`` and ``targets = window[1:]``, both int64 tensors [B, T].

Sharding: every rank computes the same global batch of W·B windows and takes rows
``[rank·B, (rank+1)·B)``, so the W ranks together see exactly what one process with batch W·B sees.

Two training orders (``training.batching``): :class:`WindowSampler` draws windows at random offsets;
:class:`StreamSampler` reads the split as contiguous columns, each step the next T tokens of every
column, so a row's previous segment is the context of its current one (what Transformer-XL's memory
needs). Evaluation likewise: windows in order (:class:`EvalBatches`) or columns in order
(``eval_batches(..., stream=True)``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

# Target value of padding positions in evaluation batches: torch's cross_entropy ignores it by default.
IGNORE_INDEX = -100


def _check_shard(batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be ≥ 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    """[len(starts), T + 1] int64: ``tokens[s : s + T + 1]`` for each start (clipped at the end)."""
    idx = np.minimum(starts[:, None] + np.arange(seq_len + 1), len(tokens) - 1)
    return torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))


def _inputs_and_targets(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows [B, T + 1] -> (inputs, targets) [B, T]: targets are the inputs shifted left by one."""
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


class Sampler(Protocol):
    """What the training loop uses of a training order (both below are one)."""

    @property
    def at_stream_start(self) -> bool:
        """The next batch opens a stream: memory carried from the last batch is not its context."""
        ...

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class _TrainSampler:
    """What both training orders share: the global batch size and an endless iterator of batches."""

    batch_size: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def at_stream_start(self) -> bool:
        return False  # random windows: no batch continues another

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()


class WindowSampler(_TrainSampler):
    """Contiguous windows at uniformly random offsets; batch ``k`` is a pure function of (seed, k).

    ``state_dict()`` is the same on every rank (seed and step), so one copy in a checkpoint resumes
    all ranks, also at another world size with the same global batch W·B.
    """

    def __init__(
        self, tokens: np.ndarray, *, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        _check_shard(batch_size, seq_len, rank, world_size)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array of ids, got shape {tokens.shape}")
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"the split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                f"lower seq_len or use more data (data.max_chars, data.valid_fraction)"
            )
        if seed < 0:
            raise ValueError(f"seed={seed} must be ≥ 0")
        self.tokens = tokens
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.step = 0

    def _starts(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.global_batch_size)
        return starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 [B, T]; targets are inputs shifted left by one token."""
        window = _windows(self.tokens, self._starts(self.step), self.seq_len)
        self.step += 1
        return _inputs_and_targets(window)

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "step": self.step,
            "global_batch_size": self.global_batch_size,
            "seq_len": self.seq_len,
            "n_tokens": len(self.tokens),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind", "random") != "random":
            raise ValueError(
                f"sampler state was saved by training.batching={state['kind']}, this run has "
                "random; resume with the batching it was saved with"
            )
        mine = self.state_dict()
        for key in ("global_batch_size", "seq_len", "n_tokens"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]}, this run has {mine[key]}: resuming would "
                    f"not reproduce the batches; keep batch size × world size, seq_len and the data config"
                )
        self.seed, self.step = int(state["seed"]), int(state["step"])


class StreamSampler(_TrainSampler):
    """The split as C = W·A·B contiguous columns (A = accumulation micro-batches per optimizer step),
    each step the next T tokens of every column: call ``i`` is micro-batch ``a = i mod A`` of segment
    ``i div A`` and takes columns ``a·W·B + rank·B + [0, B)``, so one optimizer step covers all C
    columns whatever W and A are (W ranks together see what one process with batch W·B sees).

    Column c of epoch e is ``tokens[o_e + c·L : o_e + (c+1)·L]``, L = (n - T) div C; an epoch is
    (L - 1) div T segments. The offset o_e in [0, T) is drawn from (seed, e), so later epochs cut
    the segments elsewhere. :attr:`at_stream_start` says that the next batch opens an epoch: memory
    carried from the last batch is not its context. ``state_dict()`` is the same on every rank.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        accumulation: int = 1,
    ) -> None:
        _check_shard(batch_size, seq_len, rank, world_size)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array of ids, got shape {tokens.shape}")
        if accumulation < 1 or seed < 0:
            raise ValueError(f"accumulation={accumulation} must be ≥ 1 and seed={seed} ≥ 0")
        self.tokens = tokens
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size, self.accumulation = rank, world_size, accumulation
        self.n_columns = batch_size * world_size * accumulation
        self.column_len = (len(tokens) - seq_len) // self.n_columns
        self.segments_per_epoch = (self.column_len - 1) // seq_len
        if self.segments_per_epoch < 1:
            raise ValueError(
                f"the split has {len(tokens)} tokens, too few for {self.n_columns} columns of seq_len + 1 = "
                f"{seq_len + 1} tokens (plus {seq_len} of offset); lower training.batch_size or model.context, "
                f"or use more data"
            )
        self.seed = seed
        self.step = 0  # next_batch calls so far

    @property
    def at_stream_start(self) -> bool:
        return (self.step // self.accumulation) % self.segments_per_epoch == 0

    def _offset(self, epoch: int) -> int:
        return int(np.random.default_rng([self.seed, epoch]).integers(0, self.seq_len))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 [B, T]: the next segment of this rank's columns of this micro-batch."""
        segment, micro = divmod(self.step, self.accumulation)
        epoch, j = divmod(segment, self.segments_per_epoch)
        B = self.batch_size
        columns = micro * self.world_size * B + self.rank * B + np.arange(B)
        starts = self._offset(epoch) + columns * self.column_len + j * self.seq_len
        window = _windows(self.tokens, starts, self.seq_len)
        self.step += 1
        return _inputs_and_targets(window)

    def state_dict(self) -> dict:
        if self.step % self.accumulation:
            raise RuntimeError(
                f"StreamSampler saved mid optimizer step (call {self.step}, accumulation "
                f"{self.accumulation}); save between steps"
            )
        return {
            "kind": "stream",
            "seed": self.seed,
            "segment": self.step // self.accumulation,
            "n_columns": self.n_columns,
            "seq_len": self.seq_len,
            "n_tokens": len(self.tokens),
        }

    def load_state_dict(self, state: dict) -> None:
        kind = state.get("kind", "random")
        if kind != "stream":
            raise ValueError(
                f"sampler state was saved by training.batching={kind}, this run has stream; "
                "resume with the batching it was saved with"
            )
        mine = {"n_columns": self.n_columns, "seq_len": self.seq_len, "n_tokens": len(self.tokens)}
        for key, value in mine.items():
            if state[key] != value:
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]}, this run has {value}: resuming would not "
                    f"continue the columns; keep training.batch_size, model.context and the data config"
                )
        self.seed, self.step = int(state["seed"]), int(state["segment"]) * self.accumulation


def _inputs_targets(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T + 1] windows -> (inputs, targets), two [B, T] tensors of their own: padding written into
    the targets must not reach the inputs (with B = 1 a ``contiguous()`` slice is a view of both)."""
    return window[:, :-1].clone(), window[:, 1:].clone()


class EvalBatches:
    """Non-overlapping windows in order, covering every target of the split once across the ranks.

    The last windows may be short and the last global batch partial: padding has target
    ``IGNORE_INDEX`` (input 0), so every rank yields the same number of [B, T] batches (expert
    parallelism needs all ranks in each forward). Sum the loss over targets ≠ IGNORE_INDEX and
    divide by their count, both summed over batches and ranks.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        batch_size: int,
        seq_len: int,
        max_batches: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_shard(batch_size, seq_len, rank, world_size)
        if len(tokens) < 2:
            raise ValueError(f"the split has {len(tokens)} tokens: nothing to evaluate (check data.*_fraction)")
        self.tokens = tokens
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.n_windows = math.ceil((len(tokens) - 1) / seq_len)
        n = math.ceil(self.n_windows / (batch_size * world_size))
        self.n_batches = n if max_batches is None else min(n, max_batches)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, T, B = len(self.tokens), self.seq_len, self.batch_size
        for g in range(self.n_batches):
            first = (g * self.world_size + self.rank) * B
            starts = (first + np.arange(B)) * T
            window = _windows(self.tokens, starts, T)
            inputs, targets = _inputs_targets(window)
            # position t of a row predicts token start + t + 1, which must exist
            pad = torch.from_numpy(starts[:, None] + np.arange(T) + 1 >= n)
            inputs[pad] = 0
            targets[pad] = IGNORE_INDEX
            yield inputs, targets


class StreamEvalBatches(EvalBatches):
    """The n - 1 targets of the split as C = W·B contiguous columns of L = ceil((n - 1) / C) targets,
    read in order, T per batch: row b of rank r is column ``r·B + b``, so a row's previous batch is
    the context of its current one (evaluation with memory). Padding (input 0, target
    ``IGNORE_INDEX``) only follows a column's end, so it never precedes a real target in a row."""

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        batch_size: int,
        seq_len: int,
        max_batches: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(tokens, batch_size=batch_size, seq_len=seq_len, rank=rank, world_size=world_size)
        self.column_len = math.ceil((len(tokens) - 1) / (batch_size * world_size))
        n = math.ceil(self.column_len / seq_len)
        self.n_batches = n if max_batches is None else min(n, max_batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n_targets, T, L = len(self.tokens) - 1, self.seq_len, self.column_len
        columns = self.rank * self.batch_size + np.arange(self.batch_size)
        ends = np.minimum((columns + 1) * L, n_targets)
        for g in range(self.n_batches):
            starts = columns * L + g * T
            window = _windows(self.tokens, starts, T)
            inputs, targets = _inputs_targets(window)
            pad = torch.from_numpy(starts[:, None] + np.arange(T) >= ends[:, None])
            inputs[pad] = 0
            targets[pad] = IGNORE_INDEX
            yield inputs, targets


def eval_batches(
    tokens: np.ndarray,
    *,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    stream: bool = False,
) -> EvalBatches:
    """Iterable of (inputs, targets) [B, T] over the split in order: windows (:class:`EvalBatches`), or
    with ``stream`` contiguous columns (:class:`StreamEvalBatches`)."""
    cls = StreamEvalBatches if stream else EvalBatches
    return cls(
        tokens, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches, rank=rank, world_size=world_size
    )
