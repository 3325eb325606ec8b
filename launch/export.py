"""``sigma-moe export``: a checkpoint as one consolidated safetensors file, with the model's config and
the tokenizer beside it (the folder layout and tensor names: ``sigma_moe.layers.consolidated``).

The export is read back without DeepSpeed and without pickle (``sigma_moe.layers.load_export``), and
``sigma-moe generate`` and ``sigma-moe eval`` take it wherever they take a checkpoint. Also here: the
model and tokenizer that ``generate`` and ``export`` start from (:func:`load_for_inference`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from sigma_moe.atomic_io import atomic_write, atomic_write_bytes, atomic_write_text
from sigma_moe.config_check import ConfigError
from sigma_moe.launch.checkpoint.manager import param_shapes
from sigma_moe.launch.checkpoint.weights import export_config, load_model_weights, resolve_weights
from sigma_moe.launch.config import RunConfig, config_to_dict
from sigma_moe.launch.data.tokenizers import Tokenizer, load_tokenizer
from sigma_moe.layers.consolidated import (
    EXPORT_CONFIG,
    EXPORT_FORMAT,
    EXPORT_WEIGHTS,
    consolidated_state_dict,
    is_export,
    load_export,
)
from sigma_moe.layers.transformer import TransformerLM

logger = logging.getLogger(__name__)
TOKENIZER_FILE = "tokenizer.model"


def load_for_inference(
    cfg: RunConfig | None, path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[TransformerLM, Tokenizer]:
    """The model with the weights of ``path`` in one process, in eval mode, and its tokenizer: an export
    brings both (its config.json; ``cfg`` is not needed), a checkpoint (saved at any expert-parallel
    size) is read into the model ``cfg`` describes, with the tokenizer of ``cfg``'s data."""
    source = resolve_weights(path)  # fails before any work if it is neither
    if is_export(source):
        recorded = export_config(source)["tokenizer"]
        tokenizer = load_tokenizer(recorded["kind"], recorded["model"] and str(source / recorded["model"]))
        return load_export(source, device), tokenizer
    if cfg is None:
        raise ConfigError(f"{path} is a checkpoint, not an export: give the CONFIG of its run before --checkpoint")
    with torch.device(device):
        model = TransformerLM(cfg.model)
    load_model_weights(model, source, model_config=config_to_dict(cfg.model))
    from sigma_moe.launch.session import load_data  # the data's tokenizer (cached after training)

    return model.eval(), load_data(cfg).tokenizer


def export_model(cfg: RunConfig, checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write ``out``/model.safetensors, tokenizer.model (BPE) and config.json (last: an export is complete
    once it is there). Every file is written atomically; an earlier export in ``out`` is replaced."""
    from safetensors.torch import save_file

    model, tokenizer = load_for_inference(cfg, checkpoint)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = consolidated_state_dict(model)

    def write_weights(tmp: Path) -> None:
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.chmod(0o644)  # safetensors creates its file 0600; an export is meant to be handed on

    atomic_write(out / EXPORT_WEIGHTS, write_weights)
    if tokenizer.kind == "bpe":
        atomic_write_bytes(out / TOKENIZER_FILE, Path(tokenizer.model_path).read_bytes())
    config = {
        "format": EXPORT_FORMAT,
        "model": config_to_dict(cfg.model),
        "param_shapes": param_shapes(model),
        "expert_parallel_size": 1,  # param_shapes are those of the model in one process
        "tokenizer": {"kind": tokenizer.kind, "model": TOKENIZER_FILE if tokenizer.kind == "bpe" else None},
        "tensors": len(state),
    }
    atomic_write_text(out / EXPORT_CONFIG, json.dumps(config, indent=1))
    return out


def export_main(cfg: RunConfig, checkpoint: str, out: str) -> None:
    folder = export_model(cfg, checkpoint, out)
    size = (folder / EXPORT_WEIGHTS).stat().st_size
    print(f"exported {checkpoint} to {folder}: {EXPORT_WEIGHTS} ({size / 2**20:,.1f} MiB), {EXPORT_CONFIG}", flush=True)
