"""Checkpoints: DeepSpeed's model/optimizer/scheduler files plus our per-rank state, written atomically.

Layout of ``checkpoint dir``::

    latest                 the tag of the newest complete checkpoint (replaced atomically)
    step_00000100/         one tag folder per checkpoint
        mp_rank_00_model_states.pt, ...   DeepSpeed's files (module, optimizer, scheduler, client state)
        rank_00000.pt, ...                our state of each rank: step, data sampler, python/numpy/torch RNG
        meta.json                         step, world size, model config, parameter shapes (written last)

A save goes into ``.tmp-<tag>/``, which is renamed to ``<tag>/`` only when every rank has written
its files; then ``latest`` is replaced and old tags beyond ``keep_last`` are deleted. A crash at any
point leaves the previous checkpoint and ``latest`` intact; a leftover ``.tmp-*`` is never loaded and
is removed by the next save.

DeepSpeed writes the module state from data-parallel rank 0 only. Files it does not know about (the
expert shards of an expert-parallel model, written by their owners) are added by
:class:`CheckpointHook` objects, which run inside the temporary folder before it is renamed, and again
after DeepSpeed's load.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist

from sigma_moe.distributed.collectives import world_barrier

LATEST = "latest"
META = "meta.json"
_TAG = re.compile(r"^step_(\d+)$")
# Model fields that do not change a parameter's shape: a checkpoint loads across them.
_SHAPE_FREE_KEYS = {"dropout", "attention_dropout", "expert_dropout", "backend", "entropy_reg",
                    "aux_loss_coef", "sinkhorn_iters", "memory_segments", "eval_memory_segments"}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used here; the message says which and why."""


class CheckpointHook(Protocol):
    """Extra files in a checkpoint tag folder (e.g. expert shards). Called on every rank.

    A hook may also have ``module_loader(tag_dir) -> custom_load_fn(src_state, module)``, which
    ``engine.load_checkpoint`` then uses to load the module state (at most one hook may have it), and
    ``load_weights(engine, tag_dir)``, which replaces DeepSpeed's load for weights-only loads."""

    def save(self, engine: Any, tag_dir: Path) -> None: ...

    def load(self, engine: Any, tag_dir: Path) -> None: ...


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def param_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {name: list(p.shape) for name, p in module.named_parameters()}


class CheckpointManager:
    """Save / find / load the checkpoints of one run directory (``directory``)."""

    def __init__(self, directory: str | os.PathLike, *, keep_last: int, model_config: dict,
                 expert_parallel_size: int = 1, hooks: Sequence[CheckpointHook] = ()):
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.model_config = model_config
        self.expert_parallel_size = expert_parallel_size
        self.hooks = list(hooks)

    # -- saving -------------------------------------------------------------------------------------

    def save(self, engine: Any, *, step: int, rank_state: dict) -> Path:
        """Collective: every rank calls it. ``rank_state`` is this rank's own state (sampler, ...)."""
        rank, world = _rank_world()
        tag = tag_for_step(step)
        tmp_tag = f".tmp-{tag}"
        tmp_dir = self.dir / tmp_tag
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".tmp-*"):  # a crashed save, or a retry of this one
                shutil.rmtree(stale, ignore_errors=True)
        world_barrier()
        engine.save_checkpoint(str(self.dir), tag=tmp_tag, client_state={"step": step}, save_latest=False)
        tmp_dir.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save({"step": step, "rng": rng_state(), **rank_state}, tmp_dir / f"rank_{rank:05d}.pt")
        for hook in self.hooks:
            hook.save(engine, tmp_dir)
        world_barrier()
        final = self.dir / tag
        if rank == 0:
            meta = {"step": step, "tag": tag, "world_size": world,
                    "expert_parallel_size": self.expert_parallel_size, "model": self.model_config,
                    "param_shapes": param_shapes(engine.module)}
            _atomic_write_text(tmp_dir / META, json.dumps(meta, indent=1))
            if final.exists():  # the same step saved again (e.g. final save right after a periodic one)
                shutil.rmtree(final)
            os.replace(tmp_dir, final)
            _atomic_write_text(self.dir / LATEST, tag)
            self._prune()
        world_barrier()
        return final

    def _prune(self) -> None:
        tags = sorted((int(m.group(1)), p) for p in self.dir.iterdir()
                      if p.is_dir() and (m := _TAG.match(p.name)))
        for _, path in tags[: max(0, len(tags) - self.keep_last)]:
            shutil.rmtree(path, ignore_errors=True)

    # -- finding ------------------------------------------------------------------------------------

    def latest(self) -> Path | None:
        """The newest complete checkpoint of this directory, or None."""
        marker = self.dir / LATEST
        if not marker.is_file():
            return None
        tag_dir = self.dir / marker.read_text().strip()
        return tag_dir if (tag_dir / META).is_file() else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A tag folder, or a checkpoint folder (its ``latest``) -> the tag folder to load."""
    path = Path(path)
    if (path / META).is_file():
        return path
    if (path / LATEST).is_file():
        tag_dir = path / (path / LATEST).read_text().strip()
        if (tag_dir / META).is_file():
            return tag_dir
        raise CheckpointError(f"{path}/{LATEST} names {tag_dir.name}, which is missing or incomplete")
    raise CheckpointError(
        f"{path} is not a checkpoint: it has neither {META} (a tag folder such as step_00000100/) nor "
        f"a '{LATEST}' file (a checkpoint folder); pass one of those"
    )


def read_meta(tag_dir: Path) -> dict:
    return json.loads((tag_dir / META).read_text())


def check_compatible(meta: dict, model_config: dict, module: torch.nn.Module, *, where: Path,
                     expert_parallel_size: int = 1) -> None:
    """Fail with the differing config keys and parameter shapes if the checkpoint cannot load here.
    Parameter shapes are compared only at the same expert-parallel size (expert shards differ)."""
    diffs = [f"model.{k}: checkpoint {a!r}, this run {b!r}"
             for k, a, b in _dict_diff(meta.get("model", {}), model_config)
             if k.split(".")[-1] not in _SHAPE_FREE_KEYS]
    same_layout = meta.get("expert_parallel_size", 1) == expert_parallel_size
    saved = meta.get("param_shapes", {}) if same_layout else {}
    here = param_shapes(module) if same_layout else {}
    shape_diffs = [f"{n}: checkpoint {saved[n]}, this model {here[n]}"
                   for n in sorted(saved.keys() & here.keys()) if saved[n] != here[n]]
    missing = sorted(here.keys() - saved.keys())
    unexpected = sorted(saved.keys() - here.keys())
    if diffs or shape_diffs or missing or unexpected:
        lines = diffs + [f"parameter {s}" for s in shape_diffs[:8]]
        if missing:
            lines.append(f"parameters not in the checkpoint: {missing[:8]}")
        if unexpected:
            lines.append(f"checkpoint parameters this model lacks: {unexpected[:8]}")
        raise CheckpointError(
            f"checkpoint {where} was saved from a model of another shape:\n"
            + "\n".join(f"  - {line}" for line in lines)
            + "\nLoad it with the config it was trained with (its run folder holds config.yaml)."
        )


def load_checkpoint(engine: Any, tag_dir: Path, *, model_config: dict, expert_parallel_size: int = 1,
                    hooks: Sequence[CheckpointHook] = (), weights_only: bool = False) -> dict | None:
    """Load ``tag_dir`` into ``engine`` (all ranks) and return this rank's saved state (``step``,
    ``rng``, ``sampler``...). With ``weights_only`` the optimizer and scheduler are not loaded and None
    is returned. Saved by another number of ranks: rank 0's state comes back with ``other_world`` set
    (its RNG is not this rank's; the caller reseeds)."""
    meta = read_meta(tag_dir)
    check_compatible(meta, model_config, engine.module, where=tag_dir, expert_parallel_size=expert_parallel_size)
    saved_ep = meta.get("expert_parallel_size", 1)
    if not weights_only and saved_ep != expert_parallel_size:
        raise CheckpointError(
            f"{tag_dir} was saved with distributed.expert_parallel_size={saved_ep}, this run has "
            f"{expert_parallel_size}: the optimizer state is per expert shard, so a run resumes at the size it "
            f"was saved with; set distributed.expert_parallel_size={saved_ep} (evaluation loads at any size)"
        )
    weight_loaders = [h for h in hooks if hasattr(h, "load_weights")]
    if weights_only and weight_loaders:  # DeepSpeed's own loader cannot cross expert-parallel layouts
        weight_loaders[0].load_weights(engine, tag_dir)
        return None
    loaders = [h.module_loader(tag_dir) for h in hooks if hasattr(h, "module_loader")]
    if len(loaders) > 1:
        raise ValueError("at most one checkpoint hook may load the module state (module_loader)")
    load_path, _ = engine.load_checkpoint(
        str(tag_dir.parent), tag=tag_dir.name, load_module_strict=True, load_module_only=weights_only,
        load_optimizer_states=not weights_only, load_lr_scheduler_states=not weights_only,
        custom_load_fn=loaders[0] if loaders else None,
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint files in {tag_dir}")
    for hook in hooks:
        hook.load(engine, tag_dir)
    if weights_only:
        return None
    rank, world = _rank_world()
    if meta.get("world_size") == world:
        return torch.load(tag_dir / f"rank_{rank:05d}.pt", weights_only=False)
    return {**torch.load(tag_dir / "rank_00000.pt", weights_only=False), "other_world": True}


def _dict_diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(a.keys() | b.keys()):
            out += _dict_diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [(prefix, a, b)]


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
