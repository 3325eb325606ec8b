"""A corpus as streams of text, cut into pieces of about ``CHUNK_CHARS`` for the tokenising workers.

A source is either *plain text* (one continuous text: its blocks may be cut anywhere) or *documents*
(each block one document; the tokens of each are followed by the end-of-document token). Sources:
the bundled corpora and WikiText / enwik8 (in memory, as :mod:`.corpora` loads them), local files
(a file or glob: plain text, or JSON lines ``*.jsonl`` / ``*.json`` / ``.gz`` with a text field),
read in blocks, and the streamed hub corpora (C4, peS2o), one row per document.

Splits. A corpus with official splits has a source per split. Otherwise one source is cut
``[train | valid | test]`` by ``data.valid_fraction`` and ``data.test_fraction`` of its characters:
plain text exactly at those characters (as the whole-text cut did, so the ids are unchanged),
documents by whole documents (a document belongs to the split where it starts). That needs the
length first: :func:`count_chars` reads the source once without keeping it (a decode, fast).

Pieces of plain text end after a line break where one is near (the BPE tokenizer encodes line by
line, so pieces cut there encode to the ids of the whole text); a line longer than ``LONG_LINE``
characters is cut inside.
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .corpora import HUB_CORPORA, CorpusUnavailableError, _hub_error, load_corpus, text_files

if TYPE_CHECKING:
    from .splits import DataConfig

logger = logging.getLogger(__name__)

CHUNK_CHARS = 1 << 20
LONG_LINE = 16 * CHUNK_CHARS
_READ_CHARS = 1 << 20
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
# More than this share of U+FFFD or NUL characters: not text in data.encoding.
_MAX_BAD_CHAR_FRACTION = 0.01


@dataclass(frozen=True)
class Piece:
    """Consecutive text of one split: plain text (one string) or whole documents."""

    split: str
    index: int  # its place in the split's pieces
    start: int  # characters of the split before it
    texts: tuple[str, ...]
    documents: bool

    @property
    def chars(self) -> int:
        return sum(len(t) for t in self.texts)


@dataclass
class Source:
    """Blocks of one stream of text, re-readable (each call of ``blocks`` starts again)."""

    blocks: Callable[[], Iterator[str]]
    documents: bool
    name: str
    counted: bool = True  # False for hub streams: their length is not read ahead


@dataclass
class SplitPlan:
    """Sources in reading order, each with the splits it feeds: ``(split, characters or None)``."""

    parts: list[tuple[Source, list[tuple[str, int | None]]]] = field(default_factory=list)

    def split_chars(self, split: str) -> int | None:
        return next(n for _, bounds in self.parts for s, n in bounds if s == split)


def _read_plain_file(path: Path, encoding: str) -> Iterator[str]:
    # Text mode: undecodable bytes become U+FFFD, "\r\n" and "\r" become "\n" (as datasets' text loader).
    last = ""
    with open(path, encoding=encoding, errors="replace") as f:
        while block := f.read(_READ_CHARS):
            last = block[-1]
            yield block
    if last and last != "\n":
        yield "\n"  # every file ends with a line break, so files never run together


def _read_json_lines(path: Path, encoding: str, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding=encoding, errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(
                    f"data.path: {path}:{number} is not a JSON object with a {text_field!r} string ({e!r}); "
                    f"set data.text_field to the field holding the text"
                ) from None
            if text:
                yield text


def file_source(cfg: DataConfig) -> Source:
    """``data.path``'s files in sorted order: all plain text, or all JSON lines (documents)."""
    files = text_files(cfg.path or "")
    is_json = [f.name.endswith(JSON_SUFFIXES) for f in files]
    if any(is_json) and not all(is_json):
        raise ValueError(
            f"data.path={cfg.path!r} matches JSON lines and plain text files; point it at one kind "
            f"(e.g. 'corpus/*.jsonl')"
        )
    documents = all(is_json)

    def read() -> Iterator[str]:
        for f in files:
            yield from (
                _read_json_lines(f, cfg.encoding, cfg.text_field) if documents else _read_plain_file(f, cfg.encoding)
            )

    return Source(read, documents=documents, name=str(cfg.path))


def _hub_documents(name: str, cfg: DataConfig, split: str, n_docs: int | None, skip: int = 0) -> Source:
    spec = HUB_CORPORA[name]

    def read() -> Iterator[str]:
        import datasets

        kwargs = dict(data_files=spec.data_files, revision=spec.revision, data_dir=spec.data_dir, streaming=True)
        try:  # nothing is downloaded up front: errors surface while iterating
            rows = datasets.load_dataset(spec.repo, spec.config, split=split, **kwargs)
            stop = None if n_docs is None else skip + n_docs
            for row in itertools.islice(rows, skip, stop):
                if row["text"]:
                    yield row["text"]
        except CorpusUnavailableError:
            raise
        except Exception as err:  # noqa: BLE001 - re-raised with the ways to get the data
            raise _hub_error(name, spec, err) from err

    return Source(read, documents=True, name=f"{spec.repo}:{split}", counted=False)


def _in_memory(text: str, name: str) -> Source:
    return Source(lambda: iter((text,)), documents=False, name=name)


def split_plan(cfg: DataConfig, root: Path) -> SplitPlan:
    """Where each split's text comes from, with the fraction cuts measured (a counting read)."""
    spec = HUB_CORPORA.get(cfg.dataset)
    if spec is not None and spec.streaming and not cfg.path:
        train, evals = spec.splits[0], spec.splits[1]
        n_eval = cfg.stream_eval_documents
        sources = {
            "train": _hub_documents(cfg.dataset, cfg, train, cfg.stream_documents),
            "valid": _hub_documents(cfg.dataset, cfg, evals, n_eval),
            "test": _hub_documents(cfg.dataset, cfg, evals, n_eval, skip=n_eval),
        }
        return SplitPlan([(src, [(s, cfg.max_chars)]) for s, src in sources.items()])
    if cfg.dataset == "text":
        whole = file_source(cfg)
    else:
        corpus = load_corpus(cfg, root)
        if corpus.valid is not None and corpus.test is not None:
            texts = {"train": corpus.train, "valid": corpus.valid, "test": corpus.test}
            texts = {s: t[: cfg.max_chars] if cfg.max_chars else t for s, t in texts.items()}
            return SplitPlan([(_in_memory(t, s), [(s, len(t))]) for s, t in texts.items()])
        whole = _in_memory(corpus.train, cfg.dataset)
    n = count_chars(whole, cfg.max_chars, check=cfg if cfg.dataset == "text" else None)
    n_test, n_valid = round(n * cfg.test_fraction), round(n * cfg.valid_fraction)
    return SplitPlan([(whole, [("train", n - n_valid - n_test), ("valid", n_valid), ("test", n_test)])])


def count_chars(source: Source, limit: int | None, *, check: DataConfig | None = None) -> int:
    """Characters of ``source`` (at most ``limit``; documents: up to the one that reaches it); with
    ``check``, an error for files with no text or mostly undecodable text."""
    n = bad = 0
    for block in source.blocks():
        n += len(block)
        if check is not None:
            bad += block.count("\ufffd") + block.count("\x00")
        if limit is not None and n >= limit:
            n = n if source.documents else limit
            break
    if check is None:
        return n
    if n == 0:
        raise ValueError(f"data.path={check.path!r}: its files hold no text (empty files)")
    if bad > _MAX_BAD_CHAR_FRACTION * n:
        raise ValueError(
            f"data.path={check.path!r}: {bad} of {n} characters could not be decoded as {check.encoding} (a "
            f"binary file, or another encoding such as UTF-16 or latin-1); set data.encoding or convert the "
            f"file (iconv -t utf-8)"
        )
    if bad:
        logger.warning("data.path=%r: %d undecodable bytes replaced by U+FFFD", check.path, bad)
    return n


def pieces(plan: SplitPlan, *, chunk_chars: int = CHUNK_CHARS) -> Iterator[Piece]:
    """Every split's pieces in reading order."""
    for source, bounds in plan.parts:
        cut = _document_pieces if source.documents else _plain_pieces
        yield from cut(source.blocks(), bounds, chunk_chars)


def _plain_pieces(blocks: Iterable[str], bounds: list[tuple[str, int | None]], chunk: int) -> Iterator[Piece]:
    it = iter(blocks)
    buf, done = "", False
    for split, size in bounds:
        index = start = 0
        while size is None or start < size:
            left = float("inf") if size is None else size - start
            while not done and not _can_cut(buf, chunk, left):
                block = next(it, None)
                done = block is None
                buf += block or ""
            if not buf:
                break
            end = _piece_end(buf, chunk, left)
            yield Piece(split, index, start, (buf[:end],), False)
            buf = buf[end:]
            index, start = index + 1, start + end


def _can_cut(buf: str, chunk: int, left: float) -> bool:
    """``buf`` holds the next piece: the split's end, or a line break to end it at (or a long line)."""
    if left <= chunk:
        return len(buf) >= left
    return len(buf) > chunk and (
        buf.rfind("\n", 0, chunk) >= 0 or buf.find("\n", chunk) >= 0 or len(buf) >= min(left, LONG_LINE)
    )


def _piece_end(buf: str, chunk: int, left: float) -> int:
    """Where the next piece of ``buf`` ends: the split's end if within a chunk, else after the last
    line break in the first chunk, else after the first line break, else inside a long line."""
    if left <= chunk or len(buf) <= chunk:
        return int(min(len(buf), left))
    last = buf.rfind("\n", 0, chunk)
    if last >= 0:
        return last + 1
    first = buf.find("\n", chunk, int(min(left, LONG_LINE)))
    return first + 1 if first >= 0 else int(min(len(buf), left, LONG_LINE))


def _document_pieces(docs: Iterable[str], bounds: list[tuple[str, int | None]], chunk: int) -> Iterator[Piece]:
    """Documents go to the split in whose character range they start; a split with no bound takes
    the rest (bounded by the caller's document count)."""
    ends = list(itertools.accumulate(n if n is not None else float("inf") for _, n in bounds))
    k, pos, group, group_chars, index, start = 0, 0, [], 0, 0, 0
    for doc in docs:
        while k < len(bounds) and pos >= ends[k]:
            if group:
                yield Piece(bounds[k][0], index, start, tuple(group), True)
            k, group, group_chars, index, start = k + 1, [], 0, 0, 0
        if k == len(bounds):
            return
        group.append(doc)
        group_chars += len(doc)
        pos += len(doc)
        if group_chars >= chunk:
            yield Piece(bounds[k][0], index, start, tuple(group), True)
            index, start, group, group_chars = index + 1, start + group_chars, [], 0
    if group and k < len(bounds):
        yield Piece(bounds[k][0], index, start, tuple(group), True)


def bpe_sample(plan: SplitPlan, max_chars: int, n_runs: int = 64) -> str:
    """At most ``max_chars`` of the train split for BPE training, read as a stream: all of it when it
    fits, else ``n_runs`` evenly spread runs of whole lines (one per stretch of the split; a stream of
    unknown length gives its first ``max_chars``)."""
    total = plan.split_chars("train")
    train = itertools.takewhile(lambda p: p.split == "train", pieces(plan))  # train is read first
    texts = ("\n".join(p.texts) if p.documents else p.texts[0] for p in train)
    if total is None or total <= max_chars:
        out, n = [], 0
        for text in texts:
            out.append(text[: max_chars - n])
            n += len(out[-1])
            if n >= max_chars:
                break
        return "".join(out)
    run, stride = max_chars // n_runs, total // n_runs
    runs, pos = [], 0
    for text in texts:  # run k starts at the line holding character k·stride (pieces end at line ends)
        while len(runs) < n_runs and pos <= len(runs) * stride < pos + len(text):
            begin = text.rfind("\n", 0, len(runs) * stride - pos) + 1
            end = text.rfind("\n", begin, begin + run)
            runs.append(text[begin : end if end > begin else begin + run])
        pos += len(text)
        if len(runs) == n_runs:
            break
    return "\n".join(runs)[:max_chars]
