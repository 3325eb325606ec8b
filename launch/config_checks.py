"""The checks of a run config that no single section can make.

Each section checks its own values when built (its ``check``, :mod:`sigma_moe.config_check`); here:

- :func:`check_sections`: combinations across sections (``RunConfig.check``);
- :func:`check_machine`: the config against this machine's files (data.path, the run and checkpoint
  folders, the resume path, the user's DeepSpeed JSON), run by the loader after the values;
- :func:`check_world`: the config against the launch (the number of processes, the device), checked
  right after the processes have started, the one place that does.

Every problem reads ``"key: what is wrong; the fix"``, and all of them are reported together.
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

from sigma_moe.config_check import Checks, ConfigError
from sigma_moe.launch.deepspeed_config import deepspeed_config_problems
from sigma_moe.layers.routed import RoutedConfig

if TYPE_CHECKING:
    from sigma_moe.launch.config import RunConfig


def check_sections(cfg: RunConfig, c: Checks) -> None:
    o, s, m, t, d = cfg.optimizer, cfg.schedule, cfg.model, cfg.training, cfg.distributed
    if not 0.0 <= s.min_lr <= o.lr:
        c.add("schedule.min_lr", f"must be in [0, optimizer.lr={o.lr}], got {s.min_lr}")
    if m.attention == "xl" and m.memory_segments > 0 and t.batching == "random":
        c.add(
            "training.batching",
            f"random draws unrelated windows, so the memory of model.attention xl "
            f"(model.memory_segments={m.memory_segments}) would hold another text's "
            f"tokens; use stream (or auto), or set model.memory_segments=0",
        )
    ep = d.expert_parallel_size
    if ep > 1 and not isinstance(m.ff, RoutedConfig):
        c.add("distributed.expert_parallel_size", f"{ep} but model.ff.kind={m.ff.kind!r} has no experts; set it to 1")
    elif ep > 1 and m.ff.n_experts % ep:
        c.add(
            "distributed.expert_parallel_size",
            f"{ep} does not divide model.ff.n_experts={m.ff.n_experts}; pick a divisor of n_experts",
        )


def check_machine(cfg: RunConfig) -> list[str]:
    p = cfg.data.missing_files()
    for key, folder in (("logging.run_dir", cfg.logging.run_dir), ("checkpoint.dir", cfg.checkpoint.dir)):
        if folder and os.path.exists(folder) and not os.path.isdir(folder):
            p.append(f"{key}: {folder} is a file, not a folder; choose a folder (it is created if missing)")
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and not os.path.exists(resume):
        p.append(f"checkpoint.resume: {resume!r} does not exist; use auto, none, or the path of a checkpoint folder")
    p += deepspeed_config_problems(cfg)  # the user's DeepSpeed JSON against the YAML
    return p


def check_world(cfg: RunConfig, world_size: int, device_type: str | None = None) -> list[str]:
    """Combinations with the number of processes and the device type (None: not checked)."""
    from sigma_moe.distributed import ExpertParallelLayout  # after the processes started: deepspeed is loaded

    p: list[str] = []
    t = cfg.training
    per_step = world_size * t.grad_accumulation
    if t.batch_size % per_step:
        p.append(
            f"training.batch_size: {t.batch_size} sequences cannot be split over {world_size} ranks × "
            f"{t.grad_accumulation} accumulation steps; make it a multiple of {per_step}"
        )
    try:
        ExpertParallelLayout(world_size, cfg.distributed.expert_parallel_size)
    except ValueError as e:
        p.append(str(e))
    if t.precision == "fp16" and device_type == "cpu":
        p.append("training.precision: fp16 needs a GPU (DeepSpeed's loss scaler); use bf16 or fp32 on CPU")
    if t.compile and t.compile_backend == "inductor" and device_type == "cpu" and not _cxx_compiler():
        p.append(
            "training.compile: inductor needs a C++ compiler on the CPU, and none is on PATH (c++, g++, "
            "clang++, or $CXX); install one (e.g. g++), or set training.compile_backend=aot_eager or "
            "training.compile=false"
        )
    if not p:  # the user's DeepSpeed JSON against the micro-batch this world size gives
        p += deepspeed_config_problems(cfg, world_size)
    return p


def _cxx_compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "")) or next(
        (path for name in ("c++", "g++", "clang++") if (path := shutil.which(name))), None
    )


def check_world_or_raise(cfg: RunConfig, world_size: int, device_type: str) -> None:
    """:func:`check_world` as one :class:`ConfigError` listing every problem."""
    problems = check_world(cfg, world_size, device_type)
    if problems:
        raise ConfigError("invalid config for this launch:\n" + "\n".join(f"  - {p}" for p in problems))
