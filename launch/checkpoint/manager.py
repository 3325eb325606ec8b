"""Checkpoints: DeepSpeed's model/optimizer/scheduler files plus our per-rank state, written atomically.

Layout of ``checkpoint dir``::

    latest                 the tag of the newest complete checkpoint (replaced atomically)
    step_00000100/         one tag folder per checkpoint
        mp_rank_00_model_states.pt, ...   DeepSpeed's files (names: distributed.deepspeed_compat)
        layer_0_expert_0_..., ...         one file per (routed layer, global expert), by its owner
        rank_00000.pt, ...                our state of each rank: step, data sampler, python/numpy/torch RNG
        meta.json                         step, world size, model config, parameter shapes
        manifest.json                     every file's size and SHA-256 (written last: the folder is complete)

A save goes into ``.tmp-<tag>/``, which is renamed to ``<tag>/`` only when every rank has written
its files and the manifest is in; then ``latest`` is replaced and tags older than the saved step
beyond ``keep_last`` are deleted (never the saved one, never a newer one). A crash at any point leaves
the previous checkpoints intact; a leftover ``.tmp-*`` is never loaded and is removed by the next save.

``latest`` is a hint: resuming takes the checkpoint it names if that one is intact (its files match
its manifest), else the newest intact one, and says which it skipped and why. A checkpoint folder
that holds checkpoints but no intact one is an error, never a silent start from step 0.

DeepSpeed writes the module state from data-parallel rank 0 only, so the manager writes the expert
files itself (their owners do, at every expert-parallel size) and reads them back, both through
:mod:`sigma_moe.distributed.checkpoint` (inside DeepSpeed's load, or in its place for weights only and
across expert-parallel sizes). :class:`CheckpointHook` objects may add files of their own; they run
inside the temporary folder before it is renamed.

Every failure is a :class:`CheckpointError` (``sigma_moe.distributed.checkpoint``'s, the base of
:class:`CheckpointMismatch`, :class:`CheckpointCorrupt` and :class:`ElasticResumeError`) with a
one-line message; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from sigma_moe.atomic_io import atomic_write, atomic_write_text
from sigma_moe.distributed.checkpoint import CheckpointError, load_weights, module_loader, save_experts
from sigma_moe.distributed.collectives import is_multiprocess, world_all_reduce_, world_barrier
from sigma_moe.launch.checkpoint.config import CheckpointConfig
from sigma_moe.launch.checkpoint.elastic_resume import load_resharded_optimizer, optimizer_param_names
from sigma_moe.launch.checkpoint.finding import (
    LATEST,
    MOVED_ASIDE,
    checkpoint_tags,
    fall_back_to_known_good,
    known_good,
    mark_known_good,
    newest_intact,
    resolve_checkpoint,
    restore_moved_aside,
    step_of,
    tag_for_step,
)
from sigma_moe.launch.checkpoint.manifest import FORMAT, META, is_complete, write_manifest
from sigma_moe.launch.checkpoint.safe_unpickle import (
    load_deepspeed_files_safely,
    load_rank_state,
    refuse_unsafe_pickles,
)

logger = logging.getLogger(__name__)
__all__ = ["CheckpointManager", "newest_intact", "resolve_checkpoint", "tag_for_step"]
# Model fields that do not change a parameter's shape: a checkpoint loads across them.
_SHAPE_FREE_KEYS = {
    "dropout",
    "attention_dropout",
    "expert_dropout",
    "backend",
    "entropy_reg",
    "aux_loss_coef",
    "sinkhorn_iters",
    "memory_segments",
    "eval_memory_segments",
}


class CheckpointHook(Protocol):
    """Extra files of a checkpoint (beyond DeepSpeed's, the expert files and the ranks' state), written
    on every rank into the temporary tag folder before it is renamed."""

    def save(self, engine: Any, tag_dir: Path) -> None: ...


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
    """Save / find / load the checkpoints of one run directory (``directory``), as rank ``rank`` of
    ``world_size`` (the defaults: one process)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep_last: int,
        model_config: dict,
        expert_parallel_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
        hooks: Sequence[CheckpointHook] = (),
    ):
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.model_config = model_config
        self.expert_parallel_size = expert_parallel_size
        if world_size == 1 and is_multiprocess():  # every rank would write meta.json and prune as rank 0
            raise ValueError("CheckpointManager in a multi-process job: pass its rank and world_size")
        self.rank, self.world_size = rank, world_size
        self.hooks = list(hooks)
        self._saved: set[str] = set()  # tags this manager wrote
        self.run_id = uuid.uuid4().hex[:12]  # in each meta.json: which checkpoints one run wrote
        self._known_good: int | None = None

    @classmethod
    def from_config(
        cls,
        cfg: CheckpointConfig,
        *,
        directory: str | os.PathLike,
        model_config: dict,
        expert_parallel_size: int,
        rank: int,
        world_size: int,
    ) -> CheckpointManager:
        """A run's manager: ``cfg``, its ``checkpoint`` section; ``directory``, ``RunConfig.checkpoint_dir``."""
        return cls(
            directory,
            keep_last=cfg.keep_last,
            model_config=model_config,
            expert_parallel_size=expert_parallel_size,
            rank=rank,
            world_size=world_size,
        )

    # -- saving -------------------------------------------------------------------------------------

    def save(self, engine: Any, *, step: int, rank_state: dict) -> Path:
        """Collective: every rank calls it. ``rank_state`` is this rank's own state (sampler, ...).
        A write that fails (disk full, quota, permissions) raises :class:`CheckpointError` saying
        where and why; the checkpoints saved before stay intact."""
        try:
            return self._save(engine, step=step, rank_state=rank_state)
        except (OSError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and not _is_write_failure(e):
                raise
            free = shutil.disk_usage(self.dir).free if self.dir.is_dir() else None
            where = f"{self.dir} ({free / 2**20:,.1f} MiB free there)" if free is not None else str(self.dir)
            reason = (
                f"{e.strerror} ({e.filename})"
                if isinstance(e, OSError) and e.strerror
                else f"a write failed: the disk is full or a file-size limit was hit ({str(e).strip()[:120]})"
            )
            raise CheckpointError(
                f"could not write the checkpoint of step {step} to {where}: {reason}. The checkpoints saved "
                f"before are intact; free space or set checkpoint.dir elsewhere, then resume"
            ) from None

    def _save(self, engine: Any, *, step: int, rank_state: dict) -> Path:
        tag = tag_for_step(step)
        final = self.dir / tag
        if tag in self._saved and is_complete(final):  # e.g. the final save right after a periodic one
            return final
        tmp_tag = f".tmp-{tag}"
        tmp_dir = self.dir / tmp_tag
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".tmp-*"):  # a crashed save, or a retry of this one
                shutil.rmtree(stale, ignore_errors=True)
        world_barrier()
        engine.save_checkpoint(str(self.dir), tag=tmp_tag, client_state={"step": step}, save_latest=False)
        tmp_dir.mkdir(parents=True, exist_ok=True)
        state = {"step": step, "rng": rng_state(), **rank_state}
        atomic_write(tmp_dir / f"rank_{self.rank:05d}.pt", lambda tmp: torch.save(state, tmp))
        save_experts(engine.module, tmp_dir)  # DeepSpeed saves the module of data-parallel rank 0 only
        for hook in self.hooks:
            hook.save(engine, tmp_dir)
        world_barrier()
        if self.rank == 0:
            meta = {
                "format": FORMAT,  # a checkpoint of this format without its manifest is incomplete
                "run": self.run_id,
                "step": step,
                "tag": tag,
                "world_size": self.world_size,
                "expert_parallel_size": self.expert_parallel_size,
                "model": self.model_config,
                "param_shapes": param_shapes(engine.module),
                "zero_stage": engine.zero_optimization_stage(),
                "optimizer_params": optimizer_param_names(engine),
            }
            atomic_write_text(tmp_dir / META, json.dumps(meta, indent=1))
            write_manifest(tmp_dir)
            replaced = None
            if final.exists():  # this step saved before (another run): move it aside, never delete first
                replaced = self.dir / f"{MOVED_ASIDE}{tag}"
                shutil.rmtree(replaced, ignore_errors=True)
                os.replace(final, replaced)
            os.replace(tmp_dir, final)
            atomic_write_text(self.dir / LATEST, tag)
            if replaced is not None:
                shutil.rmtree(replaced, ignore_errors=True)
            self._prune(step)
        world_barrier()
        self._saved.add(tag)
        return final

    def _prune(self, step: int) -> None:
        """Keep ``keep_last`` checkpoints up to ``step`` (the one just saved among them); checkpoints of
        later steps (a run started over in this folder) are not this run's to delete."""
        older = sorted((s, p) for s, p in checkpoint_tags(self.dir) if s < step)
        good = known_good(self.dir)  # kept beyond keep_last: what a missed divergence cannot take
        for _, path in older[: max(0, len(older) - (self.keep_last - 1))]:
            if path != good:
                shutil.rmtree(path, ignore_errors=True)

    # -- known good ---------------------------------------------------------------------------------

    def continue_run(self, tag_dir: Path) -> None:
        """Resuming ``tag_dir``: this run's checkpoints carry on its run id."""
        self.run_id = read_meta(tag_dir).get("run") or self.run_id

    def weights_passed(self, step: int | None) -> None:
        """The weights after ``step`` passed a divergence check: if they were saved, that checkpoint is
        now the known good one (rank 0 writes it down; other ranks return)."""
        if step is None or step == self._known_good or self.rank != 0:
            return
        if mark_known_good(self.dir, step):
            self._known_good = step

    def after_divergence(self) -> str:
        """Collective, when a run stops as diverged: ``latest`` goes back to the known good checkpoint
        (rank 0); returns the clause naming it, for the error message (every rank)."""
        world_barrier()
        hint = fall_back_to_known_good(self.dir) if self.rank == 0 else _peek_known_good(self.dir)
        world_barrier()
        return hint

    # -- finding ------------------------------------------------------------------------------------

    def latest(self) -> Path | None:
        """The checkpoint to resume from: the newest intact one of this directory (see the module
        docstring), or None when it holds none at all. Collective in a multi-process job: rank 0
        checks the files, every rank gets its answer."""
        if self.world_size == 1:
            restore_moved_aside(self.dir)
            return newest_intact(self.dir)
        code = torch.zeros(1, dtype=torch.int64)  # rank 0's answer: step + 1, 0 for none, -1 for an error
        error = None
        if self.rank == 0:
            try:
                restore_moved_aside(self.dir)
                found = newest_intact(self.dir)
                code[0] = 0 if found is None else step_of(found) + 1
            except CheckpointError as e:
                error, code[0] = e, -1
        world_all_reduce_(code)
        if error is not None:
            raise error
        if code[0] < 0:
            raise CheckpointError(f"rank 0 found no intact checkpoint in {self.dir} (its message says why)")
        return None if code[0] == 0 else self.dir / tag_for_step(int(code[0]) - 1)

    # -- loading ------------------------------------------------------------------------------------

    def load(self, engine: Any, tag_dir: Path) -> dict:
        """Load ``tag_dir`` into ``engine`` (all ranks) and return this rank's saved state (``step``,
        ``rng``, ``sampler``...). Saved by another number of ranks: rank 0's state comes back with
        ``other_world`` set (its RNG is not this rank's; the caller reseeds). The experts come from their
        own files, by global expert id (any expert-parallel size). Weights only: ``weights.py``."""
        meta = checked_meta(tag_dir, self.model_config, engine.module, self.expert_parallel_size)
        saved_ep, world = meta.get("expert_parallel_size", 1), self.world_size
        partitioned = "optimizer_params" in meta and meta["optimizer_params"] is None  # ZeRO 1/2, bf16/fp16
        if partitioned and meta["world_size"] != world:
            raise CheckpointError(
                f"{tag_dir} was saved by {meta['world_size']} ranks with an optimizer state partitioned over "
                f"them (training.zero_stage={meta.get('zero_stage', '?')}, or bf16/fp16); this run has {world}. "
                f"Resume with {meta['world_size']} ranks; only ZeRO stage 0 in fp32 resumes at another world size"
            )
        if saved_ep != self.expert_parallel_size:  # elastic: re-shard the optimizer state
            load_weights(engine.module, tag_dir)
            load_resharded_optimizer(engine, tag_dir, meta)
            logger.warning(
                "%s: saved at expert_parallel_size=%d, resumed at %d: weights and AdamW state re-sharded "
                "by global expert id",
                tag_dir,
                saved_ep,
                self.expert_parallel_size,
            )
            return _rank_state(tag_dir, meta, self.rank, world)
        load_deepspeed_files_safely(engine)
        load_path, _ = engine.load_checkpoint(
            str(tag_dir.parent),
            tag=tag_dir.name,
            load_module_strict=True,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            custom_load_fn=module_loader(tag_dir),
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint files in {tag_dir}")
        return _rank_state(tag_dir, meta, self.rank, world)


def _peek_known_good(directory: Path) -> str:
    good = known_good(directory)
    return f"; the newest checkpoint known good is {good}" if good is not None else ""


def read_meta(tag_dir: Path) -> dict:
    return json.loads((tag_dir / META).read_text())


def check_compatible(
    meta: dict, model_config: dict, module: torch.nn.Module, *, where: Path, expert_parallel_size: int = 1
) -> None:
    """Fail with the differing config keys and parameter shapes if the checkpoint cannot load here.
    Parameter shapes are compared only at the same expert-parallel size (expert shards differ)."""
    diffs = [
        f"model.{k}: checkpoint {a!r}, this run {b!r}"
        for k, a, b in _dict_diff(meta.get("model", {}), model_config)
        if k.split(".")[-1] not in _SHAPE_FREE_KEYS
    ]
    same_layout = meta.get("expert_parallel_size", 1) == expert_parallel_size
    saved = meta.get("param_shapes", {}) if same_layout else {}
    here = param_shapes(module) if same_layout else {}
    shape_diffs = [
        f"{n}: checkpoint {saved[n]}, this model {here[n]}"
        for n in sorted(saved.keys() & here.keys())
        if saved[n] != here[n]
    ]
    missing = sorted(here.keys() - saved.keys())
    unexpected = sorted(saved.keys() - here.keys())
    if diffs or shape_diffs or missing or unexpected:
        lines = diffs + [f"parameter {s}" for s in shape_diffs[:8]]
        if missing:
            lines.append(f"parameters not in the checkpoint: {missing[:8]}")
        if unexpected:
            lines.append(f"checkpoint parameters this model lacks: {unexpected[:8]}")
        raise CheckpointError(
            f"checkpoint {where} was saved from a model of another shape: {'; '.join(lines)}. Load it with "
            "the config it was trained with (its run folder holds config.yaml)."
        )


def checked_meta(tag_dir: Path, model_config: dict, module: torch.nn.Module, expert_parallel_size: int) -> dict:
    """The checkpoint's meta, once its pickles are known safe and its model fits ``model_config``."""
    refuse_unsafe_pickles(tag_dir)
    meta = read_meta(tag_dir)
    check_compatible(meta, model_config, module, where=tag_dir, expert_parallel_size=expert_parallel_size)
    return meta


def _rank_state(tag_dir: Path, meta: dict, rank: int, world: int) -> dict:
    """This rank's saved state; saved by another number of ranks: rank 0's, with ``other_world`` set."""
    if meta.get("world_size") == world:
        return load_rank_state(tag_dir / f"rank_{rank:05d}.pt")
    return {**load_rank_state(tag_dir / "rank_00000.pt"), "other_world": True}


def _dict_diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(a.keys() | b.keys()):
            out += _dict_diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [(prefix, a, b)]


def _is_write_failure(e: RuntimeError) -> bool:
    """torch.save reports a failed write (ENOSPC, EFBIG) as a RuntimeError from its C++ stream."""
    text = str(e)
    return any(m in text for m in ("PytorchStreamWriter", "inline_container", "iostream error", "file write failed"))
