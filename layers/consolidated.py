"""The consolidated model: every weight of a :class:`TransformerLM` in one safetensors file, each expert
of a routed layer as its own tensor by global id. Reading it needs neither DeepSpeed nor pickle.

An export folder (``sigma-moe export``)::

    model.safetensors    the tensors below
    config.json          {"format", "model": the TransformerConfig as a mapping, "param_shapes",
                          "expert_parallel_size": 1, "tokenizer": {"kind", "model"}}
    tokenizer.model      the SentencePiece BPE model (tokenizer kind "bpe"; absent for "bytes")

Tensor names are the model's ``state_dict`` keys, except the routed layers' expert stacks:
    embedding.weight [V, d], positions [context, d] (learned positions only), output.weight [V, d],
    final_norm.{weight,bias}, blocks.{l}.attn_norm.*, blocks.{l}.ff_norm.*,
    blocks.{l}.attn.*   causal: qkv.weight [3·H·D, d], out.weight [d, H·D];
                        xl: q.weight, kv.weight, pos.weight, out.weight, content_bias, position_bias [H, D]
    blocks.{l}.ff.*     the feedforward's own parameters (dense: w1.weight [d_ff, d], w1.bias, w2.*;
                        routed layers: selector [E, d]), and for the routed layers (σ-MoE, Switch,
                        S-BASE), per global expert g in 0 … E-1:
    blocks.{l}.ff.w1.{g} [d, G], blocks.{l}.ff.w2.{g} [G, d]
the same keys as the experts in a checkpoint's per-expert files (``sigma_moe.distributed.checkpoint``),
so a consolidated state loads at any expert-parallel size through the checkpoint loader too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from sigma_moe.config_schema import build_config

from .routed import RoutedExperts
from .transformer import TransformerConfig, TransformerLM

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
EXPORT_FORMAT = "sigma-moe-export-1"


def expert_param_key(layer_name: str, param: str) -> str:
    """The module-state key of a routed layer's stacked expert parameter (``layers.0.ff.w1``)."""
    return f"{layer_name}.{param}" if layer_name else param


def expert_tensor_name(layer_name: str, param: str, expert: int) -> str:
    """``blocks.0.ff.w1.5``: expert 5's slice of a routed layer's ``w1``."""
    return f"{layer_name}.{param}.{expert}" if layer_name else f"{param}.{expert}"


def routed_layers(module: nn.Module) -> list[tuple[str, RoutedExperts]]:
    """(name, layer) of every routed layer, in ``named_modules`` order (the checkpoints' layer index)."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, RoutedExperts)]


def consolidated_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under the names of the module docstring (contiguous CPU copies, no shared
    storage, as safetensors needs). ``model`` holds every expert (one process)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, layer in routed_layers(model):
        for p in layer.expert_param_names:
            stack = state.pop(expert_param_key(name, p))
            if stack.shape[0] != layer.n_experts:
                raise ValueError(
                    f"{name}.{p} holds {stack.shape[0]} of {layer.n_experts} experts (an expert-parallel "
                    "shard); consolidate a model that holds every expert"
                )
            for g in range(layer.n_experts):
                state[expert_tensor_name(name, p, g)] = stack[g].clone()
    return state


def load_consolidated_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a :func:`consolidated_state_dict` into ``model`` (every expert, strictly: a missing or
    unexpected tensor, or another shape, is an error naming it)."""
    state = dict(state)
    for name, layer in routed_layers(model):
        for p in layer.expert_param_names:
            keys = [expert_tensor_name(name, p, g) for g in range(layer.n_experts)]
            missing = [k for k in keys if k not in state]
            if missing:
                raise ValueError(f"the consolidated state lacks {missing[:4]} ({len(missing)} expert tensors)")
            state[expert_param_key(name, p)] = torch.stack([state.pop(k) for k in keys])
    model.load_state_dict(state, strict=True)


def is_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an export folder (it has model.safetensors and config.json)."""
    path = Path(path)
    return (path / EXPORT_WEIGHTS).is_file() and (path / EXPORT_CONFIG).is_file()


def read_export_config(folder: str | os.PathLike) -> dict:
    config = json.loads((Path(folder) / EXPORT_CONFIG).read_text())
    if config.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{folder}/{EXPORT_CONFIG}: format {config.get('format')!r}, expected {EXPORT_FORMAT!r}")
    return config


def load_export_state(folder: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of an export's model.safetensors (no pickle: safetensors reads raw tensors)."""
    from safetensors.torch import load_file

    return load_file(Path(folder) / EXPORT_WEIGHTS, device=str(device))


def load_export(folder: str | os.PathLike, device: str | torch.device = "cpu") -> TransformerLM:
    """The model of an export folder, built from its config.json, weights loaded, in eval mode."""
    cfg = build_config(TransformerConfig, read_export_config(folder)["model"], "model")
    with torch.device(device):
        model = TransformerLM(cfg)
    load_consolidated_state_dict(model, load_export_state(folder, device))
    return model.eval()
