"""What training and evaluation both start with: the process world, the data, the model in its engine.

Order matters and is the same on every rank: processes join (and the launch is checked against the
config) before any data is read; the model is built under the config's seed on every rank, so
replicated weights start equal; the engine is built last.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sigma_moe.distributed import ExpertCheckpoint
from sigma_moe.launch.config import ConfigError, RunConfig, config_to_dict, save_config
from sigma_moe.launch.data import TokenSplits, load_token_splits
from sigma_moe.launch.engine import World, build_engine, check_world_or_raise, init_world, micro_batch_size
from sigma_moe.layers.transformer import TransformerLM


@dataclass
class Session:
    cfg: RunConfig
    world: World
    splits: TokenSplits
    engine: Any  # deepspeed.DeepSpeedEngine

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


def checkpoint_hooks() -> list:
    """What a checkpoint holds beyond DeepSpeed's files: one file per (routed layer, global expert),
    written by its owner, since DeepSpeed saves the module from data-parallel rank 0 only."""
    return [ExpertCheckpoint()]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def start_session(cfg: RunConfig, *, save_resolved_config: bool = True) -> Session:
    world = init_world(cfg.distributed)
    check_world_or_raise(cfg, world)
    if save_resolved_config and world.rank == 0:
        save_config(cfg, Path(cfg.logging.run_dir) / "config.yaml")
    splits = load_token_splits(cfg.data)  # the cache makes concurrent ranks build it once
    if splits.vocab_size > cfg.model.vocab_size:  # fewer is fine: a small corpus gives fewer BPE pieces
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size}, but the {cfg.data.tokenizer!r} tokenizer of the data "
            f"has {splits.vocab_size} tokens; set model.vocab_size={splits.vocab_size} or leave it out"
        )
    seed_everything(cfg.training.seed)
    model = TransformerLM(cfg.model).to(world.device)
    model.activation_checkpointing = cfg.training.activation_checkpointing  # a run setting, not the model's
    engine = build_engine(cfg, model, world)
    return Session(cfg, world, splits, engine)
