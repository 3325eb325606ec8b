"""Shared by the launch tests: the tiny config with test-local paths, and in-process runs that leave the
environment as they found it (DeepSpeed's single-process set-up writes RANK, MASTER_PORT, ...)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SLICE = ROOT / "tests" / "data" / "shakespeare_slice.txt"
# A 6-step run with checkpoints at 2, 4 and 6 (the source the checkpoint-recovery tests damage copies of).
SIX_STEPS = (
    "training.steps=6",
    "checkpoint.every=2",
    "checkpoint.keep_last=3",
    "training.eval_every=0",
    "training.log_every=2",
)


def tiny_overrides(run_dir: Path, *extra: str) -> list[str]:
    return [
        f"logging.run_dir={run_dir}",
        f"data.path={SLICE}",
        f"data.cache_dir={run_dir.parent / 'data-cache'}",
        "logging.progress_bar=false",
        *extra,
    ]


def tiny_config(run_dir: Path, *extra: str):
    from sigma_moe.launch.config import load_config

    return load_config(TINY, tiny_overrides(run_dir, *extra))


@contextlib.contextmanager
def restored_environ():
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def one_thread():
    """Tiny models run fastest on one thread (and the test machine is shared). OMP_NUM_THREADS=1 keeps
    ``init_world`` (``share_cpu_threads``) from raising torch to a share of the cores again: on a loaded
    machine every parallel op then waits for a descheduled thread (the tiny run's final evaluation took
    35 s instead of 4)."""
    import torch

    saved, saved_env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        torch.set_num_threads(saved)
        if saved_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_env


def train_in_process(cfg):
    from sigma_moe.launch.train import train

    with restored_environ(), one_thread():
        return train(cfg)


def copy_run(source: Path, tmp_path: Path) -> Path:
    """A copy of the run directory ``source`` at ``tmp_path / "run"`` (without its run lock), free to damage."""
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns(".run.lock*"))
    return run_dir
