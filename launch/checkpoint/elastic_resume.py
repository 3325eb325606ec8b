"""Resume training at another expert-parallel size: the optimizer state follows its expert shard.

At the size it was saved with, a checkpoint resumes through DeepSpeed's own loader. At another
expert-parallel size P (2 -> 1, 1 -> 2, 2 -> 4 ranks, ...) the expert weights already load by global
expert id (:mod:`sigma_moe.distributed.checkpoint`); this module does the same for AdamW's state:

1. read the optimizer state of every saved expert-parallel rank (DeepSpeed's per-rank optimizer
   files, or the optimizer inside its model file when P was 1: the names are in
   :mod:`sigma_moe.distributed.deepspeed_compat`) and name each entry with the parameter names the
   checkpoint's ``meta.json`` lists per optimizer group (``optimizer_params``, written at save);
2. stack each expert parameter's moments over the saved ranks in rank order (rank r held experts
   ``[r·n, (r+1)·n)``), so every routed layer has its ``[N_E, ...]`` moments;
3. give this rank's optimizer the slice of its own experts and the replicated entries as saved, in
   this run's group layout (the expert groups differ with P), and restore the schedule and DeepSpeed's
   step counters from the model file.

Nothing is recomputed: the moments and weights that land on a rank are the saved values, bit for bit.
This needs DeepSpeed's basic optimizer path (ZeRO stage 0, fp32), where the engine's optimizer is our
torch AdamW and its state is per parameter; ZeRO 1/2 and bf16/fp16 keep flat per-rank partitions and
resume at the size they were saved with (the error says so).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sigma_moe.distributed.checkpoint import CheckpointError, expert_param_key, routed_layers
from sigma_moe.distributed.deepspeed_compat import (
    EXPERT_OPTIMIZER_FILE,
    MODEL_FILE,
    SCHEDULER_PER_GROUP_KEYS,
    restore_engine_counters,
    saved_scheduler_state,
)
from sigma_moe.distributed.expert_shard import local_experts
from sigma_moe.distributed.safe_load import safe_load


class ElasticResumeError(CheckpointError):
    """The checkpoint cannot be re-sharded onto this run's layout; the message says why and what to do."""


def optimizer_param_names(engine: Any) -> list[list[str]] | None:
    """The parameter names of each optimizer group, in the optimizer's order (saved in meta.json), or
    None when the engine's optimizer is not a plain per-parameter torch optimizer (ZeRO 1/2, bf16/fp16)."""
    if not _is_basic(engine):
        return None
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in engine.optimizer.param_groups]


def _is_basic(engine: Any) -> bool:
    return isinstance(engine.optimizer, torch.optim.Optimizer) and engine.zero_optimization_stage() == 0


def load_resharded_optimizer(engine: Any, tag_dir: Path, meta: dict) -> None:
    """Load the optimizer, schedule and step counters of ``tag_dir`` (saved at another expert-parallel
    size) into ``engine``, each expert's moments onto the rank that now holds it. Weights are loaded
    separately (weights-only, by global expert id). Call on every rank; reads files only."""
    saved_groups = meta.get("optimizer_params")
    saved_ep = int(meta.get("expert_parallel_size", 1))
    if saved_groups is None or not _is_basic(engine):
        why = (
            "it was saved without per-parameter optimizer names (an older sigma-moe, or ZeRO 1/2, bf16/fp16)"
            if saved_groups is None
            else "this run's optimizer keeps flat partitions (ZeRO 1/2, bf16/fp16)"
        )
        raise ElasticResumeError(
            f"{tag_dir} was saved with distributed.expert_parallel_size={saved_ep}; resuming at another size "
            f"re-shards AdamW's state, which needs training.zero_stage=0 and fp32 both when saving and now, and "
            f"{why}. Resume with distributed.expert_parallel_size={saved_ep} (evaluation loads at any size)"
        )
    experts = _expert_slices(engine.module)
    model_state = safe_load(tag_dir / MODEL_FILE)  # schedule, counters
    saved = [_optimizer_of(tag_dir, rank, saved_ep, model_state) for rank in range(saved_ep)]  # each file read once
    full = _saved_state_by_name(tag_dir, saved, saved_groups, experts)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    state, groups, index = {}, [], 0
    saved_hyper = _saved_group_hyper(tag_dir, saved[0]["param_groups"])
    for group in engine.optimizer.param_groups:
        ids = []
        for p in group["params"]:
            name = names[id(p)]
            if name not in full:
                raise ElasticResumeError(f"{tag_dir}: no optimizer state for parameter {name}")
            entry = full[name]
            if name in experts:
                entry = {k: v[experts[name]] if _is_moment(v) else v for k, v in entry.items()}
            for k, v in entry.items():
                if _is_moment(v) and v.shape != p.shape:
                    raise ElasticResumeError(
                        f"{tag_dir}: optimizer {k} of {name} has shape {list(v.shape)}, "
                        f"the parameter here {list(p.shape)}"
                    )
            state[index] = entry
            ids.append(index)
            index += 1
        groups.append({**{k: v for k, v in group.items() if k != "params"}, **saved_hyper, "params": ids})
    engine.optimizer.load_state_dict({"state": state, "param_groups": groups})
    _load_schedule_and_counters(engine, tag_dir, model_state)


def _saved_state_by_name(
    tag_dir: Path, saved: list[dict], saved_groups: list[list[str]], experts: dict[str, slice]
) -> dict[str, dict]:
    """name -> that parameter's saved optimizer state, expert moments stacked over the saved ranks
    (``saved[r]``: rank r's optimizer state dict; rank r held the r-th block of experts).
    ``experts``: the expert parameters' names."""
    per_rank = []
    for rank, sd in enumerate(saved):
        if len(sd["param_groups"]) != len(saved_groups):
            raise ElasticResumeError(
                f"{tag_dir}: expert-parallel rank {rank}'s optimizer has "
                f"{len(sd['param_groups'])} groups, meta.json lists {len(saved_groups)}"
            )
        by_name = {}
        for group, group_names in zip(sd["param_groups"], saved_groups):
            for idx, name in zip(group["params"], group_names, strict=True):
                by_name[name] = sd["state"].get(idx, {})
        per_rank.append(by_name)
    full = dict(per_rank[0])
    for name in experts:
        if name in full:
            full[name] = {
                k: torch.cat([r[name][k] for r in per_rank]) if _is_moment(v) else v for k, v in full[name].items()
            }
    return full


def _optimizer_of(tag_dir: Path, rank: int, saved_ep: int, model_state: dict) -> dict:
    """Saved rank ``rank``'s optimizer state dict: in the model file when P was 1 (DeepSpeed then sees no
    expert layers), else in that rank's own file."""
    path = tag_dir / (MODEL_FILE if saved_ep == 1 else EXPERT_OPTIMIZER_FILE.format(rank=rank))
    if saved_ep > 1 and not path.is_file():
        raise ElasticResumeError(
            f"{tag_dir}: {path.name} is missing; the optimizer state of expert-parallel "
            f"rank {rank} is needed to resume at another size"
        )
    loaded = model_state if saved_ep == 1 else safe_load(path)
    sd = loaded.get("optimizer")
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ElasticResumeError(
            f"{path}: holds no per-parameter optimizer state (saved with ZeRO 1/2 or "
            f"bf16/fp16?); resume at expert_parallel_size={saved_ep}"
        )
    return sd


def _saved_group_hyper(tag_dir: Path, groups: list[dict]) -> dict:
    """The schedule-driven fields of the saved groups (lr, initial_lr), equal in every group."""
    out = {}
    for key in ("lr", "initial_lr"):
        values = {g[key] for g in groups if key in g}
        if len(values) > 1:
            raise ElasticResumeError(
                f"{tag_dir}: the optimizer groups have different {key}s {sorted(values)}; "
                f"re-sharding assumes one schedule for every group"
            )
        if values:
            out[key] = values.pop()
    return out


def _expert_slices(module: torch.nn.Module) -> dict[str, slice]:
    """Parameter name -> the rows of its ``[N_E, ...]`` stack this rank holds."""
    out = {}
    for name, layer in routed_layers(module):
        held = local_experts(layer)
        for p in layer.expert_param_names:
            out[expert_param_key(name, p)] = slice(held.start, held.stop)
    return out


def _is_moment(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() > 0


def _load_schedule_and_counters(engine: Any, tag_dir: Path, saved: dict) -> None:
    scheduler = engine.lr_scheduler
    n_groups = len(engine.optimizer.param_groups)
    sched = saved_scheduler_state(saved)
    for key in SCHEDULER_PER_GROUP_KEYS:  # one entry per group: the group count changes with P
        values = sched.get(key)
        if not values:
            continue
        if any(v != values[0] for v in values):
            raise ElasticResumeError(
                f"{tag_dir}: the schedule's {key} differ per optimizer group; re-sharding "
                f"assumes one schedule for every group"
            )
        sched[key] = [values[0]] * n_groups
    scheduler.load_state_dict(sched)
    restore_engine_counters(engine, saved)
