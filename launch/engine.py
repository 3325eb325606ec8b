"""The DeepSpeed engine of a run: the model parallelised, the optimizer and schedule, ``deepspeed.initialize``.

Every run goes through ``deepspeed.initialize``, one process too, so the optimizer step, gradient
reduction, ZeRO, mixed precision, clipping and accumulation have one code path. The optimizer is a
torch AdamW (:class:`SkippableAdamW`, so the divergence guard can drop a step; DeepSpeed's FusedAdam
needs CUDA; ZeRO accepts a torch optimizer with ``zero_allow_untested_optimizer``) and the schedule a
``LambdaLR`` handed to ``initialize``, so the engine steps it at each optimizer step and saves it with
the checkpoint.
"""

from __future__ import annotations

import deepspeed
import torch
from torch import nn

from sigma_moe.distributed import parallelize, use_exact_clipping
from sigma_moe.launch.config import RunConfig
from sigma_moe.launch.deepspeed_config import deepspeed_config
from sigma_moe.launch.optim import SkippableAdamW, config_schedule, optimizer_param_groups
from sigma_moe.launch.world import World


def build_engine(cfg: RunConfig, model: nn.Module, world: World):
    """Parallelise ``model`` (expert parallelism, global-batch sums), then ``deepspeed.initialize``
    with the YAML's DeepSpeed config and the user's JSON merged over it (:func:`deepspeed_config`).

    Returns the DeepSpeed engine; ``engine.lr_scheduler`` is our LambdaLR."""
    model = parallelize(model, cfg.distributed, launched_by_mpirun=world.launched_by_mpirun)
    o = cfg.optimizer
    optimizer = SkippableAdamW(optimizer_param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config_schedule(cfg))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world.world_size),
        dist_init_required=False,
    )
    use_exact_clipping(engine)  # DeepSpeed's non-ZeRO fp32 clip norm is wrong with expert shards
    return engine
