"""Expert-sharded checkpoints: one file per (routed layer, global expert), written by the rank that owns
it, in the tag folder of DeepSpeed's checkpoint. Loading takes each expert by its global id, so the
weights load at any expert-parallel size, and in one process.

Why: DeepSpeed writes the module state from data-parallel rank 0 only, so the experts of every other
EP rank would be lost; its own per-expert files exist only for its MoE class and its parameter names.

File: DeepSpeed's own name for a per-expert file (``layer_{l}_expert_{g}_…``:
:func:`~.deepspeed_compat.expert_checkpoint_file`, because its ``load_checkpoint`` opens exactly these
files for every layer it sees as MoE), holding ``{"<layer>.<param>.<g>": tensor}`` for the layer's
expert parameters (``w1.<g>`` is ``[d, G]``). ``l`` counts the routed layers in ``named_modules()``
order, as DeepSpeed counts its MoE layers. Every routed layer is written at every size (P = 1 too),
by EDP rank 0 of the owner (P > 1) or by rank 0. Written atomically (:mod:`sigma_moe.atomic_io`).

DeepSpeed merges the files of this rank's experts into the module state it loads, beside rank 0's
shard from the model file, so ``engine.load_checkpoint`` needs ``custom_load_fn=
module_loader(tag_dir)``: it drops the shard, stacks this rank's experts by global
id (from the merged entries, or from the files), and loads everything else strictly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from sigma_moe.atomic_io import atomic_write
from sigma_moe.layers.consolidated import expert_param_key, expert_tensor_name, routed_layers
from sigma_moe.layers.routed import RoutedExperts

from .deepspeed_compat import DEEPSPEED_STATE_CLASSES, MODEL_FILE, expert_checkpoint_file, expert_data_parallel_rank
from .expert_shard import expert_shard, local_experts
from .safe_load import CheckpointError, safe_load

__all__ = ["CheckpointError", "CheckpointMismatch", "load_weights", "module_loader", "save_experts"]


class CheckpointMismatch(CheckpointError):
    """The checkpoint does not fit this model; the message says what differs."""


def expert_file(tag_dir: Path, layer_index: int, expert: int) -> Path:
    return expert_checkpoint_file(tag_dir, layer_index, expert)


def _writes_experts(layer: RoutedExperts) -> bool:
    shard = expert_shard(layer)
    if shard is not None:
        return expert_data_parallel_rank(shard.group_name) == 0
    return not dist.is_initialized() or dist.get_rank() == 0


def save_experts(module: nn.Module, tag_dir: Path) -> None:
    """Write this rank's expert files into ``tag_dir`` (call on every rank; the owners write)."""
    for index, (name, layer) in enumerate(routed_layers(module)):
        if not _writes_experts(layer):
            continue
        for local, g in enumerate(local_experts(layer)):
            state = {
                expert_tensor_name(name, p, g): getattr(layer, p)[local].detach().cpu().clone()
                for p in layer.expert_param_names
            }
            atomic_write(expert_file(tag_dir, index, g), functools.partial(torch.save, state))


def load_module(src: dict[str, torch.Tensor], dst: nn.Module, tag_dir: Path) -> None:
    """Load a module state saved with expert files into ``dst`` (any expert-parallel size): experts by
    global id, everything else strictly from ``src`` (DeepSpeed's module state)."""
    src = dict(src)
    expert_keys = set()
    with torch.no_grad():
        for index, (name, layer) in enumerate(routed_layers(dst)):
            for p in layer.expert_param_names:
                src.pop(expert_param_key(name, p), None)  # rank 0's shard, or all experts of a one-rank save
                expert_keys.add(expert_param_key(name, p))
            for local, g in enumerate(local_experts(layer)):
                wanted = {p: expert_tensor_name(name, p, g) for p in layer.expert_param_names}
                if not all(k in src for k in wanted.values()):
                    src.update(_read_expert_file(tag_dir, index, g, name))
                for p, k in wanted.items():
                    _copy_expert(getattr(layer, p), local, src.pop(k), k)
    leftover = sorted(k for k in src if _is_expert_entry(k, dst))
    for k in leftover:  # other experts' entries (files DeepSpeed merged for another layout)
        src.pop(k)
    result = dst.load_state_dict(src, strict=False)
    missing = sorted(set(result.missing_keys) - expert_keys)
    if missing or result.unexpected_keys:
        raise CheckpointMismatch(
            f"checkpoint {tag_dir} does not fit the model: missing {missing[:8]}, "
            f"unexpected {sorted(result.unexpected_keys)[:8]}"
        )


def load_weights(module: nn.Module, tag_dir: Path) -> None:
    """Weights only, at any size (one process included): DeepSpeed's model file and the expert files."""
    path = Path(tag_dir) / MODEL_FILE
    if not path.is_file():
        raise CheckpointMismatch(f"{tag_dir} has no {MODEL_FILE}; is it a DeepSpeed checkpoint tag folder?")
    state = safe_load(path, safe_globals=DEEPSPEED_STATE_CLASSES)["module"]  # never runs pickled code
    load_module(state, module, Path(tag_dir))


def module_loader(tag_dir: Path) -> Callable[..., None]:
    """The ``custom_load_fn`` that ``engine.load_checkpoint`` needs for a model with expert files."""
    tag_dir = Path(tag_dir)

    def custom_load_fn(src: dict[str, torch.Tensor], dst: nn.Module) -> None:
        load_module(src, dst, tag_dir)

    return custom_load_fn


def _read_expert_file(tag_dir: Path, index: int, expert: int, layer_name: str) -> dict[str, torch.Tensor]:
    path = expert_file(tag_dir, index, expert)
    if not path.is_file():
        raise CheckpointMismatch(
            f"expert {expert} of routed layer {index} ({layer_name}) is missing from {tag_dir} ({path.name}): "
            "the checkpoint was saved without expert files (sigma_moe.distributed.save_experts) or "
            "with fewer experts"
        )
    return safe_load(path)


def _copy_expert(param: torch.Tensor, local: int, value: torch.Tensor, key: str) -> None:
    if value.shape != param.shape[1:]:
        raise CheckpointMismatch(f"{key}: checkpoint shape {list(value.shape)}, model {list(param.shape[1:])}")
    param[local].copy_(value)


def _is_expert_entry(key: str, module: nn.Module) -> bool:
    stem, _, g = key.rpartition(".")
    if not g.isdigit():
        return False
    layer_name, _, p = stem.rpartition(".")
    try:
        layer = module.get_submodule(layer_name) if layer_name else module
    except AttributeError:
        return False
    return isinstance(layer, RoutedExperts) and p in layer.expert_param_names
