"""Token shards: streaming preparation by a pool of workers, resume, documents, the token budget, old
caches, and sampling over many shards exactly as over one array (prepare.py, sources.py, shards.py).

Every cache lives under tmp_path; the corpus is the committed Shakespeare slice (or JSON lines made here).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from launch_helpers import SLICE
from sigma_moe.launch import cli
from sigma_moe.launch.data import prepare, sources
from sigma_moe.launch.data import splits as token_splits
from sigma_moe.launch.data.sampling import StreamSampler, WindowSampler, eval_batches
from sigma_moe.launch.data.shards import ShardedTokens, ShardWriter
from sigma_moe.launch.data.splits import DataConfig, load_token_splits

TEXT = SLICE.read_text(encoding="utf-8")
SMALL_SHARDS = 0.012  # MB: pieces of 12,000 characters, one per shard: ~17 shards of the slice


def cfg_for(tmp_path: Path, cache: str = "cache", **kw) -> DataConfig:
    kw.setdefault("tokenizer", "bytes")
    kw.setdefault("vocab_size", 256 if kw["tokenizer"] == "bytes" else 1000)
    kw.setdefault("path", str(SLICE))
    return DataConfig(dataset="text", cache_dir=str(tmp_path / cache), **kw)


def as_array(tokens) -> np.ndarray:
    return np.asarray(tokens)


def test_sharded_tokens_index_like_one_array():
    parts = [np.arange(0, 5), np.arange(5, 6), np.arange(6, 13)]
    whole = np.arange(13)
    sharded = ShardedTokens([p.astype(np.uint16) for p in parts], np.uint16)
    assert len(sharded) == 13 and sharded.shape == (13,) and sharded.dtype == np.uint16
    idx = np.array([[0, 4, 5, 6, 12], [12, 11, 5, 0, 3]])
    np.testing.assert_array_equal(sharded[idx], whole[idx])
    assert sharded[7] == 7 and sharded[-1] == 12
    np.testing.assert_array_equal(sharded[3:11], whole[3:11])
    np.testing.assert_array_equal(np.asarray(sharded), whole)
    np.testing.assert_array_equal(sharded.token_counts(20), np.bincount(whole, minlength=20))
    with pytest.raises(IndexError):
        sharded[np.array([13])]


def test_one_shard_and_many_give_the_same_batches_and_resume_exactly(tmp_path):
    one = load_token_splits(cfg_for(tmp_path, "one"))
    many = load_token_splits(cfg_for(tmp_path, "many", shard_mb=SMALL_SHARDS))
    assert len(one.train.shards) == 1 and len(many.train.shards) > 10
    for name in token_splits.SPLITS:
        np.testing.assert_array_equal(as_array(many.split(name)), as_array(one.split(name)))
    kw = dict(batch_size=4, seq_len=64, seed=3, world_size=2, rank=1)
    for make in (
        lambda t: WindowSampler(t, **kw),
        lambda t: StreamSampler(t, accumulation=2, **kw),
    ):
        a, b = make(one.train), make(many.train)
        for _ in range(6):
            for x, y in zip(a.next_batch(), b.next_batch()):
                assert torch.equal(x, y)
        # Resume from the many-shard sampler's state: the next batches are the uninterrupted ones.
        resumed = make(many.train)
        resumed.load_state_dict(b.state_dict())
        for _ in range(4):
            for x, y in zip(a.next_batch(), resumed.next_batch()):
                assert torch.equal(x, y)
    for x, y in zip(
        eval_batches(one.valid, batch_size=3, seq_len=50), eval_batches(many.valid, batch_size=3, seq_len=50)
    ):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])


def test_bpe_ids_are_those_of_the_whole_text_cut_at_the_split_characters(tmp_path):
    """Pieces, workers and shards leave the ids of the earlier whole-text preparation unchanged."""
    cfg = cfg_for(tmp_path, tokenizer="bpe", vocab_size=1000, valid_fraction=0.1, test_fraction=0.03)
    pooled = load_token_splits(dataclasses.replace(cfg, **{"workers": 2, "shard_mb": SMALL_SHARDS}))
    n = len(TEXT)
    a, b = n - round(n * 0.1) - round(n * 0.03), n - round(n * 0.03)
    whole = {"train": TEXT[:a], "valid": TEXT[a:b], "test": TEXT[b:]}
    for name, text in whole.items():
        np.testing.assert_array_equal(as_array(pooled.split(name)), pooled.tokenizer.encode_array(text))
        assert pooled.bytes_per_token[name] == pytest.approx(len(text.encode()) / len(pooled.split(name)))
    assert len(pooled.train.shards) > 4
    inline = load_token_splits(dataclasses.replace(cfg, **{"workers": 1, "cache_dir": str(tmp_path / "c2")}))
    np.testing.assert_array_equal(as_array(inline.train), as_array(pooled.train))


def test_interrupted_preparation_resumes_at_the_first_missing_shard(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path, shard_mb=SMALL_SHARDS, workers=1)
    encoded = []
    real_call = prepare.PieceEncoder.__call__

    def counting(self, piece):
        encoded.append((piece.split, piece.index))
        return real_call(self, piece)

    real_add = ShardWriter.add

    def crash_at_piece_8(self, ids, chars, n_bytes):
        if self.split == "train" and sum(r.pieces for r in self.done) + self._current.pieces == 8:
            raise KeyboardInterrupt
        real_add(self, ids, chars, n_bytes)

    monkeypatch.setattr(prepare.PieceEncoder, "__call__", counting)
    monkeypatch.setattr(ShardWriter, "add", crash_at_piece_8)
    with pytest.raises(KeyboardInterrupt):
        load_token_splits(cfg)
    partial = next((tmp_path / "cache" / "tokens").glob(".*.partial"))
    assert sorted(p.name for p in partial.glob("train-*.json")) == [f"train-{k:05d}.json" for k in range(8)]
    monkeypatch.setattr(ShardWriter, "add", real_add)
    encoded.clear()
    resumed = load_token_splits(cfg)
    assert min(i for s, i in encoded if s == "train") == 8  # the finished shards were not encoded again
    assert not partial.exists() and (resumed.cache_path / "manifest.json").is_file()
    fresh = load_token_splits(cfg_for(tmp_path, "fresh", shard_mb=SMALL_SHARDS))
    for name in token_splits.SPLITS:
        np.testing.assert_array_equal(as_array(resumed.split(name)), as_array(fresh.split(name)))


def write_jsonl(path: Path, docs: list[str]) -> None:
    path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")


def test_json_lines_documents_end_of_document_and_whole_document_splits(tmp_path):
    docs = [f"Document {i}: " + "word " * (i % 7 + 3) + "é" for i in range(60)]
    write_jsonl(tmp_path / "a.jsonl", docs[:30])
    write_jsonl(tmp_path / "b.jsonl", docs[30:])
    cfg = cfg_for(
        tmp_path, path=str(tmp_path / "*.jsonl"), valid_fraction=0.1, test_fraction=0.1, shard_mb=0.0005, workers=1
    )
    s = load_token_splits(cfg)
    got = []
    for name in token_splits.SPLITS:
        ids = as_array(s.split(name))
        assert ids[-1] == 0  # every document ends with the end-of-document token (bytes: NUL)
        got.append(bytes(ids.astype(np.uint8)).decode().split("\0")[:-1])
    assert sum(got, []) == docs  # whole documents, in order, none lost or cut
    starts = np.cumsum([0] + [len(d) for d in docs])[:-1]
    n = starts[-1] + len(docs[-1])
    a, b = n - round(n * 0.1) - round(n * 0.1), n - round(n * 0.1)
    assert [len(g) for g in got] == [(starts < a).sum(), ((starts >= a) & (starts < b)).sum(), (starts >= b).sum()]
    newline = load_token_splits(dataclasses.replace(cfg, **{"end_of_document": "newline"}))
    assert newline.tokenizer.decode(as_array(newline.train).tolist()) == "".join(d + "\n" for d in got[0])
    bpe = load_token_splits(dataclasses.replace(cfg, **{"tokenizer": "bpe", "vocab_size": 400}))
    eos = bpe.tokenizer.eos_id
    assert (as_array(bpe.test) == eos).sum() == len(got[2]) and as_array(bpe.test)[-1] == eos
    with pytest.raises(ValueError, match="data.text_field"):
        load_token_splits(dataclasses.replace(cfg, **{"text_field": "body"}))


def test_token_budget_keeps_a_prefix_of_the_train_split(tmp_path):
    full = load_token_splits(cfg_for(tmp_path, "full"))
    budget = load_token_splits(cfg_for(tmp_path, "budget", max_tokens=30_001, shard_mb=SMALL_SHARDS))
    assert len(budget.train) == 30_001
    np.testing.assert_array_equal(as_array(budget.train), as_array(full.train)[:30_001])
    np.testing.assert_array_equal(as_array(budget.test), as_array(full.test))


def test_old_format_and_damaged_caches_are_prepared_again(tmp_path):
    cfg = cfg_for(tmp_path)
    folder = tmp_path / "cache" / "tokens" / token_splits.token_cache_key(cfg)
    folder.mkdir(parents=True)
    np.save(folder / "train.npy", np.zeros(10, np.uint16))  # the single-array format 1
    (folder / "meta.json").write_text(json.dumps({"format": 1, "splits": {}}))
    s = load_token_splits(cfg)
    assert len(s.train) + len(s.valid) + len(s.test) == len(TEXT) and not (folder / "train.npy").exists()
    shard = folder / "train-00000.bin"
    with open(shard, "r+b") as f:  # a bit flip: found by prepare's checksums
        f.seek(100)
        f.write(b"\xff")
    with pytest.raises(ValueError, match="train-00000.bin is corrupted"):
        token_splits.describe_token_splits(load_token_splits(cfg))
    with open(shard, "ab") as f:  # a changed size: found when opened, prepared again
        f.write(b"\0\0")
    again = load_token_splits(cfg)
    assert len(again.train) == len(s.train) and "train: " in token_splits.describe_token_splits(again)


def test_prepare_command_builds_then_reuses(tmp_path, capsys):
    args = ["prepare", "configs/tiny.yaml", "--set", f"data.cache_dir={tmp_path}", "--set", "data.shard_mb=0.05"]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert "token shards:" in first and "train:" in first and "shard(s)" in first
    assert cli.main(args) == 0
    assert capsys.readouterr().out == first  # the same config reuses the same shards
    assert cli.main(["prepare", "configs/tiny.yaml", "--set", "data.path=/nonexistent.txt"]) == 2


def test_bpe_sample_is_bounded_and_evenly_spread():
    big = "".join(f"line {i} " + "x" * (i % 50) + "\n" for i in range(20_000))
    plan = sources.SplitPlan([(sources._in_memory(big, "big"), [("train", len(big))])])
    sample = sources.bpe_sample(plan, 40_000)
    assert len(sample) <= 40_000 and set(sample.split("\n")) <= set(big.split("\n"))
    assert sample.startswith("line 0 ") and big.rfind(sample[-60:]) > 0.95 * len(big)
    assert sources.bpe_sample(plan, 10**7) == big  # fits: the whole split, as before
