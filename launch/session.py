"""What training and evaluation both start with: the process world, the data, the model in its engine.

Order matters and is the same on every rank: processes join (and the launch is checked against the
config) before any data is read; a training run locks its run directory before anything is written;
the model is built under the config's seed on every rank, so replicated weights start equal; the
engine is built last.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sigma_moe.config_check import ConfigError
from sigma_moe.launch.config import RunConfig, config_to_dict, save_config
from sigma_moe.launch.config_checks import check_world_or_raise
from sigma_moe.launch.data.corpora import CorpusUnavailableError
from sigma_moe.launch.data.splits import TokenSplits, load_token_splits
from sigma_moe.launch.deepspeed_config import micro_batch_size
from sigma_moe.launch.engine import build_engine
from sigma_moe.launch.guards.memory_estimate import check_step_fits
from sigma_moe.launch.guards.run_lock import RunLock, take_run_locks
from sigma_moe.launch.world import World, init_world, local_world_size
from sigma_moe.layers.transformer import TransformerLM


@dataclass
class Session:
    cfg: RunConfig
    world: World
    splits: TokenSplits
    engine: Any  # deepspeed.DeepSpeedEngine
    run_locks: list[RunLock] = field(default_factory=list)  # held by a training run (rank 0) until ``close``

    def close(self) -> None:
        for lock in self.run_locks:
            lock.release()

    @property
    def micro_batch(self) -> int:
        return micro_batch_size(self.cfg, self.world.world_size)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.logging.run_dir)

    @property
    def model_config(self) -> dict:
        return config_to_dict(self.cfg.model)

    @property
    def expert_parallel_size(self) -> int:
        return self.cfg.distributed.expert_parallel_size


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_data(cfg: RunConfig, *, progress: bool | None = None) -> TokenSplits:
    """The token splits, or a :class:`ConfigError` that names the data problem (an empty, binary or
    mis-encoded file, a split too short to train or evaluate on, a corpus that cannot be fetched)."""
    try:
        splits = load_token_splits(cfg.data, progress=progress)  # the cache makes concurrent ranks build it once
    except (ValueError, OSError, CorpusUnavailableError) as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith("data") else f"data: {msg}") from None
    need = {"train": cfg.model.context + 1, "valid": 2, "test": 2}
    short = [
        f"{name} has {len(splits.split(name))} tokens (needs {n})"
        for name, n in need.items()
        if len(splits.split(name)) < n
    ]
    if short:
        raise ConfigError(
            f"data: too little text: {', '.join(short)}; use more text, or a shorter model.context "
            f"(the train split needs model.context + 1 tokens)"
        )
    return splits


def save_resolved_config(s: Session) -> None:
    """The run's config as resolved (includes and overrides applied) into its run directory (rank 0)."""
    if s.world.rank == 0:
        save_config(s.cfg, s.run_dir / "config.yaml")


def start_session(cfg: RunConfig, *, lock_run_dir: bool = False) -> Session:
    """With ``lock_run_dir`` (training), rank 0 holds the locks of the run directory and the checkpoint
    folder until ``Session.close``."""
    world = init_world(cfg.distributed)
    check_world_or_raise(cfg, world.world_size, world.device.type)
    folders = {"logging.run_dir": cfg.logging.run_dir, "checkpoint.dir": cfg.checkpoint_dir}
    run_locks = take_run_locks(folders, rank=world.rank) if lock_run_dir else []
    splits = load_data(cfg)
    if splits.vocab_size > cfg.model.vocab_size:  # fewer is fine: a small corpus gives fewer BPE pieces
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size}, but the {cfg.data.tokenizer!r} tokenizer of the data "
            f"has {splits.vocab_size} tokens; set model.vocab_size={splits.vocab_size} or leave it out"
        )
    check_step_fits(cfg, world.world_size, world.device, local_world_size())  # before allocating anything
    seed_everything(cfg.training.seed)
    model = TransformerLM(cfg.model, activation_checkpointing=cfg.training.activation_checkpointing).to(world.device)
    if cfg.training.compile:  # lazily, at the first forward: after parallelize has swapped in its parts
        model.compile_blocks(backend=cfg.training.compile_backend)
    engine = build_engine(cfg, model, world)
    return Session(cfg, world, splits, engine, run_locks)
