"""Preparing a corpus: its text, read as a stream, tokenised by a pool of worker processes into token
shards on disk, in bounded memory.

    split plan (sources.py) -> BPE sample -> tokenizer -> pieces -> workers (encode) -> shards (in order)

The work happens in ``<cache>/tokens/.<key>.partial/``: the BPE model first, then each split's
shards as they fill (:class:`.shards.ShardWriter`). An interrupted preparation run again finds that
folder and goes on at each split's first missing shard (the tokenizer is kept, the pieces before are
read but not encoded again). At the end come ``meta.json`` and the manifest (every file's size and
SHA-256, :mod:`sigma_moe.file_manifest`), and the folder is renamed to ``<cache>/tokens/<key>/``.

Memory: the main process holds a few pieces (``CHUNK_CHARS`` each) in flight per worker and the
current piece's ids; a worker holds one piece. BPE training reads a bounded sample
(``data.bpe_train_chars``). Nothing grows with the corpus.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
import types
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from sigma_moe.atomic_io import atomic_write_text
from sigma_moe.file_manifest import write_manifest

from .shards import ShardWriter, shard_name
from .sources import CHUNK_CHARS, Piece, SplitPlan, bpe_sample, pieces, split_plan
from .tokenizers import ByteTokenizer, Tokenizer, load_tokenizer, token_dtype, train_bpe

if TYPE_CHECKING:
    from .splits import DataConfig

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
TOKENS_FORMAT = 2  # shards + manifest (format 1: one .npy per split, rebuilt when met)
# Below this many pieces of text the pool's start costs more than it saves.
_MIN_PIECES_FOR_POOL = 4


class PieceEncoder:
    """Text pieces -> token ids: plain text as the tokenizer encodes it, documents each followed by
    the end-of-document token (``eos``) or a line break (``newline``)."""

    def __init__(self, kind: str, model_path: str | None, end_of_document: str) -> None:
        self.tokenizer = load_tokenizer(kind, model_path, threads=1)
        self.end_of_document = end_of_document

    def __call__(self, piece: Piece) -> tuple[str, int, np.ndarray, int]:
        """(its split, its characters, its ids, its UTF-8 bytes): no text goes back."""
        tok = self.tokenizer
        if not piece.documents:
            texts = piece.texts
            ids = tok.encode_array(texts[0])
        elif self.end_of_document == "newline":
            texts = tuple(t + "\n" for t in piece.texts)
            ids = tok.encode_array("".join(texts))
        else:
            texts = piece.texts
            eos = np.array([tok.eos_id], dtype=token_dtype(tok.vocab_size))
            ids = np.concatenate([part for t in texts for part in (tok.encode_array(t), eos)])
        n_bytes = sum(len(t.encode("utf-8", errors="surrogatepass")) for t in texts)
        return piece.split, piece.chars, ids, n_bytes


_worker_encoder: PieceEncoder | None = None  # one per worker process, set by its initializer


def _start_worker(kind: str, model_path: str | None, end_of_document: str) -> None:
    global _worker_encoder
    _worker_encoder = PieceEncoder(kind, model_path, end_of_document)


def _encode_in_worker(piece: Piece) -> tuple[str, int, np.ndarray, int]:
    return _worker_encoder(piece)


def encoded_in_order(
    items: Iterable[Piece], encoder_args: tuple[str, str | None, str], workers: int
) -> Iterator[tuple[str, int, np.ndarray, int]]:
    """The pieces encoded, in their order, by ``workers`` processes (in this one for 1), with at most
    two pieces per worker in flight, so reading never runs ahead of encoding."""
    if workers <= 1:
        yield from map(PieceEncoder(*encoder_args), items)
        return
    # spawn, not fork: a training process has threads (torch, the process group) a fork would copy.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_worker, initargs=encoder_args) as pool:
        with _without_main_module():
            for started in [pool.submit(int) for _ in range(workers)]:  # starts every worker now
                started.result()
        window: deque = deque()
        try:
            for item in items:
                window.append(pool.submit(_encode_in_worker, item))
                if len(window) >= 2 * workers:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for future in window:
                future.cancel()


@contextlib.contextmanager
def _without_main_module() -> Iterator[None]:
    """A spawned process imports its parent's ``__main__`` first: the ``sigma-moe`` script, which
    imports torch (~240 MB of resident memory per worker). Started while this holds, it does not."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class PrepareStats:
    """What one preparation did (benchmarks/bench_data.py reads it)."""

    chars: int  # characters tokenised now (a resumed preparation: those after its finished shards)
    encode_seconds: float  # reading, tokenising and writing them
    seconds: float  # all of it: the split plan's count, the BPE sample and training, the manifest
    workers: int


def prepare_tokens(cfg: DataConfig, root: Path, folder: Path, *, progress: bool | None = None) -> PrepareStats:
    """Build the token shards of ``cfg`` into ``folder`` (call under the folder's lock)."""
    start = time.perf_counter()
    partial = folder.with_name(f".{folder.name}.partial")
    partial.mkdir(parents=True, exist_ok=True)
    plan = split_plan(cfg, root)
    tokenizer = _tokenizer(cfg, root, plan, partial)
    shard_chars = max(1, int(cfg.shard_mb * 1e6))
    chunk = min(CHUNK_CHARS, shard_chars)
    writers = {
        s: ShardWriter(partial, s, token_dtype(tokenizer.vocab_size), max(1, shard_chars // chunk)) for s in SPLITS
    }
    resumed = {s: len(w.done) for s, w in writers.items() if w.done}
    if resumed:
        logger.info("resuming the preparation in %s after the finished shards %s", partial, resumed)
    budget = cfg.max_tokens

    def todo() -> Iterator[Piece]:
        for piece in pieces(plan, chunk_chars=chunk):
            if piece.index < writers[piece.split].first_piece:
                continue  # in a finished shard
            if piece.split == "train" and budget is not None and writers["train"].tokens >= budget:
                continue
            yield piece

    known = [n for _, bounds in plan.parts for _, n in bounds]
    total = sum(known) if None not in known else None
    workers = cfg.workers or default_workers()
    if total is not None and total < _MIN_PIECES_FOR_POOL * chunk:
        workers = 1
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenising {cfg.dataset}", disable=not show)
    model = str(partial / "tokenizer.model") if tokenizer.kind == "bpe" else None
    read_chars, encode_start = 0, time.perf_counter()
    for split, chars, ids, n_bytes in encoded_in_order(todo(), (tokenizer.kind, model, cfg.end_of_document), workers):
        writer = writers[split]
        if split == "train" and budget is not None:
            if writer.tokens >= budget:
                continue  # encoded while the budget filled up
            keep = min(len(ids), budget - writer.tokens)
            chars, n_bytes = chars * keep // max(1, len(ids)), n_bytes * keep // max(1, len(ids))
            ids = ids[:keep]
        writer.add(ids, chars, n_bytes)
        if split == "train" and budget is not None and writer.tokens >= budget:
            writer.close()
        read_chars += chars
        bar.update(chars)
    bar.close()
    encode_seconds = time.perf_counter() - encode_start
    _finish(cfg, tokenizer, writers, partial, folder)
    stats = PrepareStats(read_chars, encode_seconds, time.perf_counter() - start, workers)
    logger.info(
        "%s: %s tokens in %.1f s; tokenised %.1f MB of text in %.1f s (%d worker(s), %.2f MB/s)",
        cfg.dataset,
        ", ".join(f"{s} {w.tokens:,}" for s, w in writers.items()),
        stats.seconds,
        read_chars / 1e6,
        encode_seconds,
        workers,
        read_chars / 1e6 / max(encode_seconds, 1e-9),
    )
    return stats


def _tokenizer(cfg: DataConfig, root: Path, plan: SplitPlan, partial: Path) -> Tokenizer:
    """The tokenizer, trained once and kept in the folder (a resumed preparation reuses it)."""
    if cfg.tokenizer == "bytes":
        return ByteTokenizer()
    model = partial / "tokenizer.model"
    if not model.is_file():
        sample = bpe_sample(plan, cfg.bpe_train_chars)
        trained = train_bpe(sample, vocab_size=cfg.vocab_size, cache_root=root)
        del sample
        shutil.copyfile(trained.model_path, partial / ".tokenizer.model.tmp")
        os.replace(partial / ".tokenizer.model.tmp", model)
    return load_tokenizer("bpe", str(model))


def _finish(cfg: DataConfig, tokenizer: Tokenizer, writers: dict[str, ShardWriter], partial: Path, folder: Path):
    for w in writers.values():
        w.close()
    for stale in partial.glob(".*.tmp"):  # a shard an interrupted run had begun
        stale.unlink()
    meta = {
        "format": TOKENS_FORMAT,
        "config": dataclasses.asdict(cfg),
        # A copy of the BPE model travels with the ids, so the folder is self-contained.
        "tokenizer": {"kind": tokenizer.kind, "model": "tokenizer.model" if tokenizer.kind == "bpe" else None},
        "vocab_size": tokenizer.vocab_size,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "splits": {
            s: {
                "chars": sum(r.chars for r in w.done),
                "bytes": sum(r.bytes for r in w.done),
                "tokens": sum(r.tokens for r in w.done),
                "shards": [shard_name(s, k) for k in range(len(w.done))],
            }
            for s, w in writers.items()
        },
    }
    atomic_write_text(partial / "meta.json", json.dumps(meta, indent=1))
    write_manifest(partial, extra={"kind": "token shards"})  # last: the folder is complete
    if folder.exists():
        shutil.rmtree(folder)  # an older format's folder
    os.replace(partial, folder)
