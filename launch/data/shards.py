"""Token shards: a split's ids as consecutive files ``<split>-00000.bin, ...`` (raw uint16 / uint32),
read as one array.

:class:`ShardWriter` appends the ids of a split's pieces in order; shard ``k`` holds pieces
``[k·P, (k+1)·P)`` (P = ``pieces_per_shard``), so a preparation that stopped can skip the pieces of
its finished shards and go on. A shard is written under a temporary name and renamed when full, then
its record ``<split>-00000.json`` (tokens, characters, UTF-8 bytes, pieces) is written: a shard
with its record is finished.

:class:`ShardedTokens` memory-maps the shards and indexes them as the concatenation: ``len``,
integer arrays of positions (what the window samplers read), slices and ``np.asarray``. A corpus in
one shard and in many gives the same ids at the same positions, so the same batches.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sigma_moe.atomic_io import atomic_write_text

_READ_TOKENS = 1 << 20  # block of sequential reads (token counts): np.bincount makes an int64 copy of it


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}.bin"


@dataclass
class ShardRecord:
    tokens: int = 0
    chars: int = 0
    bytes: int = 0  # UTF-8 bytes of the text
    pieces: int = 0


def finished_shards(folder: Path, split: str) -> list[ShardRecord]:
    """The records of ``split``'s finished shards 0, 1, ... up to the first missing one."""
    out = []
    while (folder / shard_name(split, len(out))).with_suffix(".json").is_file():
        out.append(ShardRecord(**json.loads((folder / shard_name(split, len(out))).with_suffix(".json").read_text())))
    return out


class ShardWriter:
    """Writes one split's shards under ``folder``, continuing after its finished ones."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, pieces_per_shard: int) -> None:
        self.folder, self.split, self.dtype = folder, split, np.dtype(dtype)
        self.pieces_per_shard = pieces_per_shard
        self.done = finished_shards(folder, split)
        self.first_piece = sum(r.pieces for r in self.done)  # pieces before it are in finished shards
        self.tokens = sum(r.tokens for r in self.done)
        self._file = None
        self._current = ShardRecord()

    def _tmp(self) -> Path:
        return self.folder / f".{shard_name(self.split, len(self.done))}.tmp"

    def add(self, ids: np.ndarray, chars: int, n_bytes: int) -> None:
        """The ids of the split's next piece."""
        if self._file is None:
            self._file = open(self._tmp(), "wb")
        self._file.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        r = self._current
        r.tokens, r.chars, r.bytes, r.pieces = r.tokens + len(ids), r.chars + chars, r.bytes + n_bytes, r.pieces + 1
        self.tokens += len(ids)
        if r.pieces == self.pieces_per_shard:
            self.close()

    def close(self) -> None:
        """Finish the current shard (if it holds anything)."""
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        path = self.folder / shard_name(self.split, len(self.done))
        os.replace(self._tmp(), path)
        atomic_write_text(path.with_suffix(".json"), json.dumps(self._current.__dict__))
        self.done.append(self._current)
        self._current = ShardRecord()


class ShardedTokens:
    """The shards of one split as a read-only 1-D array of token ids (see the module docstring)."""

    ndim = 1

    def __init__(self, shards: list[np.ndarray], dtype: np.dtype) -> None:
        self.shards = [s for s in shards if len(s)]
        self.dtype = np.dtype(dtype)
        self.offsets = np.concatenate([[0], np.cumsum([len(s) for s in self.shards], dtype=np.int64)])
        self.shape = (int(self.offsets[-1]),)

    @classmethod
    def open(cls, paths: list[Path], dtype: np.dtype) -> ShardedTokens:
        maps = [np.memmap(p, dtype=dtype, mode="r") if p.stat().st_size else np.zeros(0, dtype) for p in paths]
        return cls(maps, dtype)

    @property
    def size(self) -> int:
        return self.shape[0]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            return self[np.arange(start, stop, step, dtype=np.int64)]
        idx = np.asarray(index)
        if idx.ndim == 0:
            return self[idx[None]][0]
        idx = np.where(idx < 0, idx + len(self), idx)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} tokens")
        if len(self.shards) == 1:
            return np.asarray(self.shards[0][idx])
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        out = np.empty(idx.shape, dtype=self.dtype)
        for k in np.unique(which):
            mask = which == k
            out[mask] = self.shards[k][idx[mask] - self.offsets[k]]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = np.concatenate(self.shards) if self.shards else np.zeros(0, self.dtype)
        return whole if dtype is None else whole.astype(dtype)

    def tolist(self) -> list[int]:
        return np.asarray(self).tolist()

    def tobytes(self) -> bytes:
        return np.asarray(self).tobytes()

    def max(self):
        return max(int(s.max()) for s in self.shards)

    def token_counts(self, minlength: int) -> np.ndarray:
        """How often each id occurs (int64, at least ``minlength`` long), read in blocks: the count
        does not map the whole split into memory."""
        counts = np.zeros(minlength, dtype=np.int64)
        for shard in self.shards:
            for start in range(0, len(shard), _READ_TOKENS):
                block = np.bincount(np.array(shard[start : start + _READ_TOKENS]), minlength=minlength)
                if len(block) > len(counts):
                    counts = np.pad(counts, (0, len(block) - len(counts)))
                counts[: len(block)] += block
                _drop_pages(shard)
        return counts


def _drop_pages(shard: np.ndarray) -> None:
    """Tell the kernel the pages of a mapped shard that was read through are not needed again (they
    stay in the page cache, but leave this process's resident memory)."""
    mm = getattr(shard, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)
