"""Data layer: tokenisers, token cache, splits, window sampler, eval batches (corpora: test_data_corpora.py).

Never touches the network: PyPI downloads are replaced by archives built here, the hub is forced
offline in a subprocess, and every cache lives under tmp_path.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from launch_helpers import SLICE
from sigma_moe.launch.data import splits as token_splits
from sigma_moe.launch.data import tokenizers
from sigma_moe.launch.data.sampling import IGNORE_INDEX, WindowSampler, eval_batches
from sigma_moe.launch.data.splits import DataConfig, load_token_splits
from sigma_moe.launch.data.tokenizers import ByteTokenizer, train_bpe
from sigma_moe.launch.evaluate import EvalResult

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
    return train_bpe(TEXT, vocab_size=1000, cache_root=tmp_path_factory.mktemp("bpe"))


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
    first = train_bpe(TEXT, vocab_size=500, cache_root=tmp_path)
    mtime = first.model_path.stat().st_mtime_ns
    again = train_bpe(TEXT, vocab_size=500, cache_root=tmp_path)
    assert len(calls) == 1 and again.model_path == first.model_path
    assert again.model_path.stat().st_mtime_ns == mtime
    assert again.encode(TEXT[:5000]) == first.encode(TEXT[:5000])
    other_text = train_bpe(TEXT[:-5000], vocab_size=500, cache_root=tmp_path)
    other_vocab = train_bpe(TEXT, vocab_size=600, cache_root=tmp_path)
    assert len(calls) == 3
    assert len({first.model_path, other_text.model_path, other_vocab.model_path}) == 3


# --- splits and the token cache ---------------------------------------------------------------


def test_splits_are_contiguous_disjoint_and_sized(tmp_path):
    splits = load_token_splits(text_cfg(tmp_path, tokenizer="bytes", vocab_size=256))
    n = len(TEXT)  # ASCII: one byte token per character
    assert (len(splits.valid), len(splits.test)) == (round(n * 0.05), round(n * 0.05))
    whole = np.concatenate([splits.train, splits.valid, splits.test])
    assert whole.tobytes() == TEXT.encode()  # one uint8 id per byte
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

    monkeypatch.setattr(token_splits, "prepare_tokens", no_rebuild)
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
        real = data.prepare_tokens
        def slow_build(*a, **k):
            with open({str(builds)!r}, "a") as f:
                f.write("x")
            while not pathlib.Path({str(b_started)!r}).exists():  # hold the lock until B is waiting
                time.sleep(0.05)
            time.sleep(0.5)
            return real(*a, **k)
        data.prepare_tokens = slow_build
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
