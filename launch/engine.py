"""DeepSpeed setup: find the process world, build the optimizer and schedule, wrap the model.

Every run goes through ``deepspeed.initialize``, one process too, so the optimizer step, gradient
reduction, ZeRO, mixed precision, clipping and accumulation have one code path. The optimizer is a
torch AdamW (:class:`SkippableAdamW`, so the divergence guard can drop a step; DeepSpeed's FusedAdam needs CUDA; ZeRO accepts a torch optimizer with
``zero_allow_untested_optimizer``) and the schedule a ``LambdaLR`` handed to ``initialize``, so the
engine steps it at each optimizer step and saves it with the checkpoint.
"""
from __future__ import annotations

import datetime
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch import nn

from sigma_moe.distributed import moe_param_groups, parallelize, use_exact_clipping
from sigma_moe.launch.config import ConfigError, DistributedConfig, RunConfig
from sigma_moe.launch.config_checks import check_world
from sigma_moe.launch.cpu_memory import keep_freed_memory
from sigma_moe.launch.guards.divergence import SkippableAdamW
from sigma_moe.launch.deepspeed_config import deepspeed_config, micro_batch_size  # noqa: F401 (re-exported)
from sigma_moe.launch.world_env import check_one_job, detect_launch



@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_world(dist_cfg: DistributedConfig) -> World:
    """Start (or join) the process group, whatever launched this process: deepspeed, torchrun,
    mpirun, srun (with or without torchrun), or nothing (a bare single process gets rank 0 of 1 on a
    free local port). See :mod:`sigma_moe.launch.world_env`."""
    launch = detect_launch(os.environ)
    check_one_job(launch)  # N copies of a job that should be one
    os.environ.update(launch.variables)
    build_ops_in_environment()
    accel = get_accelerator()
    deepspeed.init_distributed(
        dist_backend=accel.communication_backend_name(),
        auto_mpi_discovery=True,
        # under mpirun DeepSpeed sets MASTER_PORT to this (default 29500): let the environment choose it
        distributed_port=int(os.environ.get("MASTER_PORT", "29500")),
        timeout=datetime.timedelta(seconds=dist_cfg.timeout_s),
    )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accel.device_name() != "cpu":
        # srun --gpus-per-task shows each task only its own GPU: local rank 1 then has device 0
        index = local_rank % max(1, accel.device_count())
        accel.set_device(index)
        device = torch.device(accel.device_name(index))
    else:
        device = torch.device("cpu")
        share_cpu_threads()
        keep_freed_memory()
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device)


def leave_world_after(status: int) -> int:
    """Leave the process group at the end of a process that ends with ``status``; returns it.

    Exiting with the group alive lets gloo's worker threads outlive the interpreter: a rank then aborts
    at exit now and then ("terminate called without an active exception") and the launcher reports
    the job as failed. After a failure the group is left alone: the other ranks may still be inside a
    collective, and tearing it down could hang them instead of letting them time out."""
    if status == 0 and dist.is_initialized():
        dist.destroy_process_group()
    return status


def local_world_size() -> int:
    """Ranks on this host (the launcher's variable), or the whole world when none says."""
    for var in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if var in os.environ:
            return int(os.environ[var])
    return dist.get_world_size()  # none of them set: assume one host


def share_cpu_threads() -> None:
    """Give each CPU rank its share of the cores unless OMP_NUM_THREADS says otherwise.

    Every rank otherwise starts one OpenMP thread per core; with more threads than cores the
    spinning threads of one rank steal the core another rank's collective waits on (measured: 5
    steps of the tiny config under the deepspeed launcher with 2 ranks took 92 s instead of 6 s)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world_size()))


def build_ops_in_environment() -> None:
    """DeepSpeed's JIT ops (the CPU shared-memory op) go into this environment's own folder unless
    ``TORCH_EXTENSIONS_DIR`` says otherwise. In the shared ``~/.cache/torch_extensions`` two
    environments (two clones, CI beside a checkout) rebuild each other's op at every start, since the
    build depends on the environment's paths, and a build killed midway leaves a lock that makes every
    later process wait forever."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    prefer_environment_ninja()


def prefer_environment_ninja() -> None:
    """Build DeepSpeed's JIT ops (the CPU shared-memory op) with the ninja installed beside this Python.

    torch runs whichever ``ninja`` PATH finds first. A system ninja (1.11) and the venv's (1.13) hash
    commands differently in the shared ``.ninja_log``, so processes that alternate between them (a
    launcher in ``.venv/bin`` puts it on PATH, a bare ``python`` does not) rebuild the op every time
    (30-50 s each). Putting this interpreter's bin folder first makes every process agree."""
    bin_dir = Path(sys.executable).parent
    if (bin_dir / "ninja").is_file():
        path = os.environ.get("PATH", "")
        if path.split(os.pathsep)[0] != str(bin_dir):
            os.environ["PATH"] = os.pathsep.join([str(bin_dir), path]) if path else str(bin_dir)


def check_world_or_raise(cfg: RunConfig, world: World) -> None:
    problems = check_world(cfg, world.world_size)
    if cfg.training.precision == "fp16" and world.device.type == "cpu":
        problems.append("training.precision: fp16 needs a GPU (DeepSpeed's loss scaler); use bf16 or fp32 on CPU")
    if problems:
        raise ConfigError("invalid config for this launch:\n" + "\n".join(f"  - {p}" for p in problems))


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (and expert weight stacks), not biases, norms, or 1-D vectors. Expert shards of
    an expert-parallel model get groups of their own, as DeepSpeed's MoE reduction needs."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return moe_param_groups([g for g in groups if g["params"]])


class WarmupCosine:
    """lr multiplier at optimizer step s: linear warm-up to 1, then cosine to ``min_lr / lr`` at
    ``total`` steps, constant afterwards. A callable object (not a lambda) so LambdaLR can save it."""

    def __init__(self, *, warmup_steps: int, total_steps: int, min_ratio: float):
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def config_schedule(cfg: RunConfig) -> WarmupCosine:
    s = cfg.schedule
    total = s.decay_steps if s.decay_steps is not None else cfg.training.steps
    return WarmupCosine(warmup_steps=s.warmup_steps, total_steps=total, min_ratio=s.min_lr / cfg.optimizer.lr)


def follow_config_schedule(engine, cfg: RunConfig) -> str | None:
    """After a resume: make the learning rate follow ``cfg``'s schedule if the checkpoint's differs.

    Loading a checkpoint restores the saved schedule (LambdaLR saves its callable's fields and the
    base lr), which is what an exact resume needs. A run resumed with another ``training.steps``,
    ``schedule.*`` or ``optimizer.lr`` asks for another schedule, though; without this it would, say,
    stay at ``min_lr`` for all the steps added beyond the old end. Returns what changed, or None."""
    scheduler, want, lr = engine.lr_scheduler, config_schedule(cfg), cfg.optimizer.lr
    had = scheduler.lr_lambdas[0]
    if vars(had) == vars(want) and all(base == lr for base in scheduler.base_lrs):
        return None
    old = f"lr {scheduler.base_lrs[0]:g}, {_describe(had)}"
    scheduler.lr_lambdas = [want] * len(scheduler.lr_lambdas)
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group in scheduler.optimizer.param_groups:  # the lr of the next optimizer step
        group["initial_lr"], group["lr"] = lr, lr * want(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    return f"the learning rate follows the config (lr {lr:g}, {_describe(want)}), not the checkpoint's ({old})"


def _describe(schedule: WarmupCosine) -> str:
    return (f"warm-up {schedule.warmup_steps}, cosine to {schedule.min_ratio:g}× over {schedule.total_steps} "
            f"steps")


def build_engine(cfg: RunConfig, model: nn.Module, world: World):
    """Parallelise ``model`` (expert parallelism, global-batch sums), then ``deepspeed.initialize``
    with the YAML's DeepSpeed config and the user's JSON merged over it (:func:`deepspeed_config`).

    Returns the DeepSpeed engine; ``engine.lr_scheduler`` is our LambdaLR."""
    model = parallelize(model, cfg.distributed)
    o = cfg.optimizer
    optimizer = SkippableAdamW(
        optimizer_param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps
    )
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
