"""Tokenisers: SentencePiece BPE (the paper's 8k model, trained on the train split) and UTF-8 bytes.

Both are exact: ``decode(encode(s)) == s`` for any text. BPE gets that from identity normalisation
(no NFKC, whitespace kept) and byte fallback (an unseen character becomes its UTF-8 bytes). Text is
encoded line by line, each line with SentencePiece's usual leading-space marker, and a line break is
the ``<0x0A>`` byte piece; so encoding a corpus in chunks of lines gives the same ids as encoding it
whole, and a word at the start of a line is the same token as in mid-line.

BPE models are cached under ``<cache>/tokenizers/`` by a hash of their training text and options:
the same train split never trains twice, a different one never reuses a stale model.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import sentencepiece as spm

from sigma_moe.atomic_io import atomic_write_bytes

from .cache import file_lock

logger = logging.getLogger(__name__)

TOKENIZER_KINDS = ("bpe", "bytes")
# Below this SentencePiece cannot fit 256 byte pieces, its specials, the alphabet and some merges.
MIN_BPE_VOCAB = 384
# Bump when the training options below change, so cached models are not reused.
_BPE_FORMAT = "bpe-v1"
_ENCODE_CHUNK_LINES = 1 << 16


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    eos_id: int  # the end-of-document token (data.end_of_document: eos)

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` for a whole corpus, as a 1-D integer array (faster, less memory)."""
        ...


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: uint8 for bytes, uint16 up to 65,536 ids, else
    uint32 (the token shards' size on disk is this per token)."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ByteTokenizer:
    """One token per UTF-8 byte (vocabulary 256): the character-level setting of enwik8."""

    kind = "bytes"
    vocab_size = 256
    eos_id = 0  # NUL: never in text (a file with many is refused as binary)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # A sampled sequence may cut a multi-byte character: show it as U+FFFD rather than fail.
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(token_dtype(self.vocab_size))


class BPETokenizer:
    """A trained SentencePiece BPE model (see the module docstring for the line-by-line scheme)."""

    kind = "bpe"

    def __init__(self, model_path: str | os.PathLike, *, threads: int | None = None) -> None:
        self.model_path = Path(model_path)
        self.threads = threads or _num_threads()  # 1 in a tokenising worker: the pool is the parallelism
        self._sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())  # </s>, kept by train_bpe's options
        self.newline_id = int(self._sp.piece_to_id("<0x0A>"))
        if self.newline_id == self._sp.unk_id():
            raise ValueError(f"{self.model_path} has no byte-fallback pieces; train it with train_bpe()")

    def _encode_lines(self, lines: list[str]) -> list[list[int]]:
        return self._sp.encode(lines, num_threads=self.threads)

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for i, ids in enumerate(self._encode_lines(text.split("\n"))):
            if i:
                out.append(self.newline_id)
            out.extend(ids)
        return out

    def encode_array(self, text: str) -> np.ndarray:
        lines = text.split("\n")
        dtype = token_dtype(self.vocab_size)
        parts = []
        for start in range(0, len(lines), _ENCODE_CHUNK_LINES):
            encoded = self._encode_lines(lines[start : start + _ENCODE_CHUNK_LINES])
            for ids in encoded:
                ids.append(self.newline_id)
            flat = itertools.chain.from_iterable(encoded)
            parts.append(np.fromiter(flat, dtype=dtype, count=sum(len(ids) for ids in encoded)))
        # Every line got a trailing newline above; the text's last line has none.
        return np.concatenate(parts)[:-1] if parts else np.zeros(0, dtype=dtype)

    def decode(self, ids: Sequence[int]) -> str:
        lines: list[list[int]] = [[]]
        for i in ids:
            i = int(i)
            if i == self.newline_id:
                lines.append([])
            else:
                lines[-1].append(i)
        return "\n".join(self._sp.decode(lines))


def _num_threads() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def bpe_cache_key(sample: str, vocab_size: int) -> str:
    digest = hashlib.sha256(f"{_BPE_FORMAT}|bpe|{vocab_size}|".encode())
    digest.update(sample.encode("utf-8", errors="surrogatepass"))
    return digest.hexdigest()[:20]


def train_bpe(sample: str, *, vocab_size: int, cache_root: Path) -> BPETokenizer:
    """The BPE model for ``sample`` (of the train split, bounded by data.bpe_train_chars, which keeps
    training to seconds: :func:`.sources.bpe_sample`): loaded from the cache, or trained and cached.
    The cache key hashes exactly that sample with the vocabulary size."""
    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(
            f"data.vocab_size={vocab_size} is too small for BPE; use ≥ {MIN_BPE_VOCAB} or tokenizer: bytes"
        )
    key = bpe_cache_key(sample, vocab_size)
    path = cache_root / "tokenizers" / f"bpe-{vocab_size}-{key}.model"
    with file_lock(cache_root, f"tokenizer-{key}"):
        if not path.exists():
            atomic_write_bytes(path, _train_model_bytes(sample, vocab_size))
        else:
            logger.info("BPE tokenizer cache hit: %s", path)
    tok = BPETokenizer(path)
    if tok.vocab_size < vocab_size:
        logger.warning(
            "BPE: the training text allows only %d pieces, not the %d asked for (data.vocab_size); "
            "the model's vocabulary is %d",
            tok.vocab_size,
            vocab_size,
            tok.vocab_size,
        )
    return tok


def _train_model_bytes(sample: str, vocab_size: int) -> bytes:
    lines = [line for line in sample.split("\n") if line.strip()]
    if not lines:
        raise ValueError("cannot train a BPE tokenizer on an empty train split; add text or lower data.valid_fraction")
    start = time.perf_counter()
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,  # a small corpus gets fewer pieces instead of an error
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            max_sentence_length=1 << 16,
            input_sentence_size=0,  # the sample is already bounded (data.bpe_train_chars)
            num_threads=_num_threads(),
            minloglevel=2,
        )
    except RuntimeError as err:
        raise ValueError(f"SentencePiece could not train a BPE model with vocab_size={vocab_size}: {err}") from err
    logger.info("trained BPE (vocab %d) on %d chars in %.1f s", vocab_size, len(sample), time.perf_counter() - start)
    return model.getvalue()


def load_tokenizer(kind: str, model_path: str | None, *, threads: int | None = None) -> Tokenizer:
    """Reopen a tokenizer recorded in a token cache's metadata."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe" and model_path is not None:
        return BPETokenizer(model_path, threads=threads)
    raise ValueError(f"cannot reopen tokenizer kind={kind!r} model={model_path!r}")
