"""Checks of a typed run config that no single field's type can express (ranges and combinations).

The model sections check themselves when built (``TransformerConfig`` and each feedforward config's
``__post_init__``: k <= n_experts, positive sizes, ...); :mod:`sigma_moe.launch.config` prefixes their
messages with the key path. The run settings are checked here.

:func:`check_run_config` returns every problem found, each as ``"key: what is wrong; the fix"``, so a
user fixes them all in one go. Checks that need the world size (known only after the processes have
started) are in :func:`check_world`.
"""
from __future__ import annotations

import os
from typing import Any

from sigma_moe.launch.deepspeed_config import deepspeed_config_problems


def check_run_config(cfg: Any) -> list[str]:
    problems: list[str] = []
    problems += _check_data(cfg)
    problems += _check_optimizer(cfg)
    problems += _check_training(cfg.training)
    problems += _check_batching(cfg)
    problems += _check_distributed(cfg)
    problems += _check_checkpoint(cfg.checkpoint, cfg.logging)
    problems += _check_logging(cfg.logging)
    problems += deepspeed_config_problems(cfg)  # the user's DeepSpeed JSON against the YAML
    return problems


def _positive(problems: list[str], key: str, value: Any, fix: str = "") -> None:
    if isinstance(value, (int, float)) and value <= 0:
        problems.append(f"{key}: must be > 0, got {value}{'; ' + fix if fix else ''}")


def _check_data(cfg: Any) -> list[str]:
    p: list[str] = []
    try:
        cfg.data.validate()
    except (ValueError, TypeError, FileNotFoundError) as e:
        msg = str(e)
        p.append(msg if msg.startswith("data") else f"data: {msg}")
    return p


def _check_optimizer(cfg: Any) -> list[str]:
    p: list[str] = []
    o, s = cfg.optimizer, cfg.schedule
    _positive(p, "optimizer.lr", o.lr)
    _positive(p, "optimizer.eps", o.eps)
    for i, b in enumerate(o.betas):
        if not 0.0 <= b < 1.0:
            p.append(f"optimizer.betas[{i}]: must be in [0, 1), got {b}")
    if o.weight_decay < 0:
        p.append(f"optimizer.weight_decay: must be >= 0, got {o.weight_decay}")
    if s.warmup_steps < 0:
        p.append(f"schedule.warmup_steps: must be >= 0, got {s.warmup_steps}")
    if not 0.0 <= s.min_lr <= o.lr:
        p.append(f"schedule.min_lr: must be in [0, optimizer.lr={o.lr}], got {s.min_lr}")
    if s.decay_steps is not None:
        _positive(p, "schedule.decay_steps", s.decay_steps, "or null to decay over training.steps")
    return p


def _check_training(t: Any) -> list[str]:
    p: list[str] = []
    for name in ("batch_size", "grad_accumulation", "steps", "eval_batches", "log_every", "max_skipped_steps"):
        _positive(p, f"training.{name}", getattr(t, name))
    _positive(p, "training.peak_tflops_per_device", t.peak_tflops_per_device,
              "or null for the built-in figure of a known GPU")
    if t.eval_every < 0:
        p.append(f"training.eval_every: must be >= 0 (0: only at the end), got {t.eval_every}")
    if t.on_divergence == "skip" and (t.zero_stage != 0 or t.precision != "fp32"):
        p.append(f"training.on_divergence: skip needs training.zero_stage 0 and precision fp32 (DeepSpeed's "
                 f"ZeRO and mixed-precision optimizers step by themselves), got zero_stage {t.zero_stage}, "
                 f"precision {t.precision}; use stop, or those settings")
    if t.grad_clip < 0:
        p.append(f"training.grad_clip: must be >= 0 (0: no clipping), got {t.grad_clip}")
    if not 0 <= t.seed < 2**32:
        p.append(f"training.seed: must be in [0, 2**32) (numpy's seeds), got {t.seed}")
    if t.zero_stage not in (0, 1, 2):
        p.append(f"training.zero_stage: {t.zero_stage} is not supported; use 0, 1 or 2 "
                 "(stage 3 would shard the experts DeepSpeed does not know about)")
    if t.batch_size > 0 and t.grad_accumulation > 0 and t.batch_size % t.grad_accumulation:
        p.append(f"training.batch_size: {t.batch_size} is not divisible by training.grad_accumulation="
                 f"{t.grad_accumulation}; make batch_size a multiple of it")
    return p


def _check_batching(cfg: Any) -> list[str]:
    m, t = cfg.model, cfg.training
    if m.attention == "xl" and m.memory_segments > 0 and t.batching == "random":
        return [f"training.batching: random draws unrelated windows, so the memory of model.attention xl "
                f"(model.memory_segments={m.memory_segments}) would hold another text's tokens; use stream "
                f"(or auto), or set model.memory_segments=0"]
    return []


def _check_distributed(cfg: Any) -> list[str]:
    p: list[str] = []
    d = cfg.distributed
    _positive(p, "distributed.expert_parallel_size", d.expert_parallel_size)
    _positive(p, "distributed.timeout_s", d.timeout_s)
    n_e = getattr(cfg.model.ff, "n_experts", None)
    ep = d.expert_parallel_size
    if ep > 1 and n_e is None:
        p.append(f"distributed.expert_parallel_size: {ep} but model.ff.kind={cfg.model.ff.kind!r} has no "
                 "experts; set it to 1")
    elif ep > 1 and isinstance(n_e, int) and n_e % ep:
        p.append(f"distributed.expert_parallel_size: {ep} does not divide model.ff.n_experts={n_e}; "
                 "pick a divisor of n_experts")
    return p


def _check_logging(logging: Any) -> list[str]:
    p: list[str] = []
    name = logging.name
    if name is not None and (not name.strip() or name in (".", "..") or "/" in name or os.sep in name):
        p.append(f"logging.name: {name!r} must be one folder name (no '/'), e.g. my-run; it names the run's "
                 "TensorBoard folder")
    if logging.images_every < 0:
        p.append(f"logging.images_every: must be >= 0 (0: images only at the last step), got {logging.images_every}")
    if not 0 < logging.starved_below <= 1:
        p.append(f"logging.starved_below: must lie in (0, 1] (a fraction of the mean expert load), got "
                 f"{logging.starved_below}")
    return p


def _check_checkpoint(c: Any, logging: Any) -> list[str]:
    p: list[str] = []
    if c.every < 0:
        p.append(f"checkpoint.every: must be >= 0 (0: only the final checkpoint), got {c.every}")
    _positive(p, "checkpoint.keep_last", c.keep_last)
    if not logging.run_dir:
        p.append("logging.run_dir: must not be empty; set a folder such as runs/my-run")
    for key, folder in (("logging.run_dir", logging.run_dir), ("checkpoint.dir", c.dir)):
        if folder and os.path.exists(folder) and not os.path.isdir(folder):
            p.append(f"{key}: {folder} is a file, not a folder; choose a folder (it is created if missing)")
    if c.resume not in ("auto", "none") and not os.path.exists(c.resume):
        p.append(f"checkpoint.resume: {c.resume!r} does not exist; use auto, none, or the path of a "
                 "checkpoint folder")
    return p


def check_world(cfg: Any, world_size: int) -> list[str]:
    """Combinations with the number of processes, checked right after the processes have started."""
    p: list[str] = []
    t, ep = cfg.training, cfg.distributed.expert_parallel_size
    per_step = world_size * t.grad_accumulation
    if t.batch_size % per_step:
        p.append(f"training.batch_size: {t.batch_size} sequences cannot be split over {world_size} ranks × "
                 f"{t.grad_accumulation} accumulation steps; make it a multiple of {per_step}")
    if world_size % ep:
        p.append(f"distributed.expert_parallel_size: {ep} does not divide the world size {world_size}; "
                 "start a multiple of it processes or lower it")
    if not p:  # the user's DeepSpeed JSON against the micro-batch this world size gives
        p += deepspeed_config_problems(cfg, world_size)
    return p


def check_world_or_raise(cfg: Any, world_size: int, device_type: str) -> None:
    """:func:`check_world`, and what the device allows, as one :class:`ConfigError` listing every problem."""
    from sigma_moe.launch.config import ConfigError

    problems = check_world(cfg, world_size)
    if cfg.training.precision == "fp16" and device_type == "cpu":
        problems.append("training.precision: fp16 needs a GPU (DeepSpeed's loss scaler); use bf16 or fp32 on CPU")
    if problems:
        raise ConfigError("invalid config for this launch:\n" + "\n".join(f"  - {p}" for p in problems))

