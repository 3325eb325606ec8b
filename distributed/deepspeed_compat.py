"""Every use of DeepSpeed's private internals (and the one torch scheduler field that goes with them),
in one module, behind a check of the DeepSpeed versions they were audited against.

Supported: :data:`DEEPSPEED_RANGE` (the same range as pyproject.toml). Audited across it, release by
release from 0.18.9 to 0.19.8, for every touch below:
- expert groups (``deepspeed/utils/groups.py``): the same private functions and dicts; 0.19 adds
  keyword arguments (tensor / sequence parallel folding) to ``_create_expert_and_data_parallel``, whose
  default (no model parallelism) is 0.18's code path, the only one we call;
- the MoE layer class, ``set_deepspeed_parallelism(use_data_before_expert_parallel_)``,
  ``clip_fp32_gradients`` and ``_global_grad_norm`` in ``_take_model_step``: unchanged;
- ``_get_expert_ckpt_name``: 0.19 adds an optional ``checkpoint_mp_rank``; the file names are the same;
- the checkpoint files (the model file and the per-EP-rank optimizer files: :data:`MODEL_FILE`, ...), what
  the model file holds (``module``, ``optimizer``, ``lr_scheduler`` and :data:`ENGINE_COUNTERS`, which
  its load restores) and ``optimizer.overflow``, read after ``step()`` in ``_take_model_step``: the
  same at 0.18.9 and 0.19.8;
- not an internal, but a difference a run would see: 0.18 casts the whole module to bf16/fp16
  (buffers too), 0.19 casts parameters only unless ``data_types.buffer_dtype`` is set; the generated
  config sets it to the precision (``launch/deepspeed_config.py``), which 0.18 ignores: the same
  result on both. ``gradient_allreduce_op: mean`` (0.19) is 0.18's only behaviour.
Runs on 0.18.9 and 0.19.8 give bit-identical losses and gradient norms (README, the version matrix).

A DeepSpeed outside the range is refused before a run starts (:func:`check_deepspeed_version`, called
by ``parallelize`` and the launcher's world set-up: :class:`UnsupportedDeepSpeed`, one line and exit 2
from the CLI, not a traceback at import): four of these touches fail silently when they go stale, and
a run would print no message: an engine method we replace that a new release may stop calling, and a
private field the engine reports the gradient norm from (a wrong clip factor); the optimizer's
``overflow`` (:func:`report_skipped_step`: a dropped step would move the schedule on); the counters
(:func:`restore_engine_counters`: wrong step counts after an elastic resume).
``SIGMA_MOE_ALLOW_ANY_DEEPSPEED=1`` runs it anyway with a warning. Widening the range means auditing
this file against the new release (the code paths each function names), then :data:`DEEPSPEED_RANGE`
and pyproject.toml.
Why each touch exists is said where it is used: ``deepspeed_moe.py`` (the engine sees our routed
layers as its MoE layers), ``groups.py`` (its expert process groups), ``grad_norm.py`` (the clip
norm of its non-ZeRO fp32 path), ``checkpoint.py`` (its per-expert file names),
``launch/checkpoint/elastic_resume.py`` (its files, schedule and counters, loaded around its loader),
``launch/optim.py`` (``SkippableAdamW``: a step the divergence guard drops). No other module names a
DeepSpeed file or engine field.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils import groups as ds_groups
from deepspeed.utils.tensor_fragment import fragment_address
from packaging.version import Version
from torch import nn

from sigma_moe.config_check import ConfigError

DEEPSPEED_RANGE = ("0.18.9", "0.19.8")  # oldest, newest audited release; = pyproject.toml's deepspeed range
ALLOW_ANY_DEEPSPEED = "SIGMA_MOE_ALLOW_ANY_DEEPSPEED"  # =1: another version only warns


class UnsupportedDeepSpeed(ConfigError):
    """The installed DeepSpeed is outside :data:`DEEPSPEED_RANGE` (the CLI prints it in one line, exit 2)."""


def check_deepspeed_version(version: str = deepspeed.__version__) -> None:
    """Raise :class:`UnsupportedDeepSpeed` unless ``version`` (a local suffix such as ``+cpu`` ignored) lies
    in :data:`DEEPSPEED_RANGE`; with ``SIGMA_MOE_ALLOW_ANY_DEEPSPEED=1`` warn instead."""
    low, high = DEEPSPEED_RANGE
    if Version(low) <= Version(Version(version).base_version) <= Version(high):
        return
    problem = f"DeepSpeed {version} is outside the range sigma-moe supports ({low} to {high})"
    if os.environ.get(ALLOW_ANY_DEEPSPEED) == "1":
        warnings.warn(f"{problem}; running it anyway ({ALLOW_ANY_DEEPSPEED}=1)", stacklevel=2)
        return
    raise UnsupportedDeepSpeed(
        f"{problem}: pip install 'deepspeed>={low},<={high}', or set {ALLOW_ANY_DEEPSPEED}=1 to run it anyway "
        "(unaudited: sigma_moe/distributed/deepspeed_compat.py says what to check)"
    )


# --- expert process groups (deepspeed.utils.groups): named "ep_size_{P}", created once per P ---------


def has_expert_groups(name: str) -> bool:
    return name in ds_groups._get_expert_parallel_group_dict()


def create_expert_groups(expert_parallel_size: int) -> None:
    """Collective: DeepSpeed's EP and EDP groups for ``expert_parallel_size`` (what its engine reduces over)."""
    ds_groups._create_expert_and_data_parallel(expert_parallel_size)


def expert_group_ranks(name: str) -> tuple[list[int], list[int]]:
    """(ranks of this rank's EP group, ranks of its EDP group), as DeepSpeed laid them out."""
    return (
        list(ds_groups._get_expert_parallel_group_ranks(name)),
        list(ds_groups._get_expert_data_parallel_group_ranks(name)),
    )


def expert_parallel_group(name: str) -> dist.ProcessGroup:
    return ds_groups._get_expert_parallel_group(name)


def expert_data_parallel_group(name: str) -> dist.ProcessGroup:
    return ds_groups._get_expert_data_parallel_group(name)


def expert_data_parallel_rank(name: str) -> int:
    return ds_groups._get_expert_data_parallel_rank(name)


def data_parallel_group() -> dist.ProcessGroup:
    return ds_groups._get_data_parallel_group()


# --- the engine's MoE layers (runtime/engine.py ``_configure_distributed_model``) --------------------


class DeepSpeedMoEAdapter(MoE):
    """Mixin that makes an expert-parallel layer count as a DeepSpeed MoE layer. Never built directly:
    :func:`become_moe_layer` swaps a live layer's class to ``(LayerCls, DeepSpeedMoEAdapter)``.
    ``MoE.__init__`` never runs: the engine reads only the four attributes below and calls
    ``set_deepspeed_parallelism``."""

    num_experts: int
    num_local_experts: int
    ep_size: int
    expert_group_name: str

    def __init__(self, *args, **kwargs) -> None:
        raise TypeError("DeepSpeedMoEAdapter is a mixin; use sigma_moe.distributed.parallelize(model, cfg)")

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine. The groups were created by ``parallelize``; check they are the ones we use."""
        if use_data_before_expert_parallel_:
            raise ValueError(
                "use_data_before_expert_parallel lays expert groups out differently from "
                "sigma_moe.distributed (EP groups of consecutive ranks); remove it from the DeepSpeed config"
            )
        if not has_expert_groups(self.expert_group_name):
            raise RuntimeError(
                f"DeepSpeed has no expert groups {self.expert_group_name!r}; parallelize(model, cfg) creates "
                "them and must run on every rank before deepspeed.initialize"
            )


def is_moe_layer(layer: nn.Module) -> bool:
    return isinstance(layer, MoE)


def become_moe_layer(
    layer: nn.Module, *, n_experts: int, n_local: int, group_name: str, expert_params: list[torch.Tensor]
) -> None:
    """Class swap (as ``torch.distributed.fsdp.fully_shard`` does): ``layer`` stays a ``Cls`` (its
    forward, parameter names, ``isinstance`` checks) and becomes a DeepSpeed ``MoE``; its expert
    parameters are tagged for the reduction over the EDP group ``group_name`` instead of all ranks."""
    cls = type(layer)
    layer.__class__ = type(f"ExpertParallel{cls.__name__}", (cls, DeepSpeedMoEAdapter), {"__module__": cls.__module__})
    layer.num_experts = n_experts
    layer.num_local_experts = n_local
    layer.ep_size = n_experts // n_local
    layer.expert_group_name = group_name
    for param in expert_params:
        param.allreduce = False  # DeepSpeed (moe/utils.py is_moe_param): reduce over the EDP group, not all ranks
        param.group_name = group_name


# --- the engine's gradient clipping (runtime/engine.py, non-ZeRO fp32 path) --------------------------


def replace_fp32_clipping(engine: Any, clip: Callable[[], torch.Tensor]) -> None:
    """Make ``engine`` clip its fp32 gradients with ``clip()`` (which returns the norm before clipping,
    then reported by ``engine.get_global_grad_norm()``) instead of ``DeepSpeedEngine.clip_fp32_gradients``."""
    if not callable(getattr(type(engine), "clip_fp32_gradients", None)) or not hasattr(engine, "_global_grad_norm"):
        raise RuntimeError(
            "this DeepSpeed engine has no clip_fp32_gradients / _global_grad_norm to replace; "
            "see sigma_moe/distributed/deepspeed_compat.py"
        )

    def clip_fp32_gradients() -> None:
        engine._global_grad_norm = clip()

    engine.clip_fp32_gradients = clip_fp32_gradients


# --- checkpoint file names (runtime/engine.py ``load_checkpoint`` opens exactly these) ---------------

MODEL_FILE = "mp_rank_00_model_states.pt"  # the module state (data-parallel rank 0), ZeRO 0-2
EXPERT_OPTIMIZER_FILE = "expp_rank_{rank}_mp_rank_00_optim_states.pt"  # ``_get_optimizer_ckpt_name``, per EP rank
_ZERO_OPTIMIZER_FILE = "{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"  # ``_get_rank_zero_ckpt_name``


# --- what the model file holds beside the module (runtime/engine.py ``_save_checkpoint``, ``_load_checkpoint``)

ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")  # engine fields its load restores
SCHEDULER_PER_GROUP_KEYS = ("base_lrs", "_last_lr", "lr_lambdas")  # LambdaLR's state: one entry per param group


def saved_scheduler_state(model_state: dict) -> dict:
    """A copy of the schedule's state dict (``lr_scheduler``) in a loaded model file."""
    return dict(model_state["lr_scheduler"])


def restore_engine_counters(engine: Any, model_state: dict) -> None:
    """Set ``engine``'s step counters from a loaded model file, as ``engine.load_checkpoint`` does (for a
    load that goes around it: resuming at another expert-parallel size)."""
    for name in ENGINE_COUNTERS:
        if name in model_state:
            setattr(engine, name, model_state[name])


# Plain state classes DeepSpeed pickles into its files (ZeRO, bf16/fp16): rebuilding them sets fields
# and calls nothing else, so torch's weights-only unpickler may build them.
DEEPSPEED_STATE_CLASSES = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_files_with(engine: Any, load: Callable[[str, Any], Any]) -> None:
    """Make every file ``engine.load_checkpoint`` opens (module, optimizer, ZeRO partitions, experts:
    all through ``engine.checkpoint_engine.load``, which calls ``torch.load(weights_only=False)``)
    load through ``load(path, map_location)`` instead."""
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if not callable(getattr(checkpoint_engine, "load", None)):
        raise RuntimeError(
            "this DeepSpeed engine has no checkpoint_engine.load; see sigma_moe/distributed/deepspeed_compat.py"
        )
    checkpoint_engine.load = lambda path, map_location=None: load(path, map_location)


def earlier_format_files(tag_dir: Path, world_size: int, expert_parallel_size: int) -> list[Path]:
    """The files DeepSpeed's load opens in a tag folder saved by ``world_size`` ranks (a checkpoint
    without a manifest to list them): the module state, each expert-parallel rank's optimizer state
    when expert-parallel, each rank's ZeRO partition when ZeRO wrote any, and our per-rank state."""
    tag_dir = Path(tag_dir)
    names = [MODEL_FILE, *(f"rank_{r:05d}.pt" for r in range(world_size))]
    if expert_parallel_size > 1:
        names += [EXPERT_OPTIMIZER_FILE.format(rank=r) for r in range(expert_parallel_size)]
    for prefix in ("", "bf16_"):
        if (tag_dir / _ZERO_OPTIMIZER_FILE.format(prefix=prefix, rank=0)).exists() or list(
            tag_dir.glob(_ZERO_OPTIMIZER_FILE.format(prefix=prefix, rank="*"))
        ):
            names += [_ZERO_OPTIMIZER_FILE.format(prefix=prefix, rank=r) for r in range(world_size)]
    return [tag_dir / n for n in names]


def expert_checkpoint_file(tag_dir: Path, layer_index: int, expert: int) -> Path:
    """DeepSpeed's file of global expert ``expert`` of MoE layer ``layer_index`` in the tag folder ``tag_dir``."""
    tag_dir = Path(tag_dir)
    return Path(DeepSpeedEngine._get_expert_ckpt_name(str(tag_dir.parent), layer_index, expert, tag_dir.name))


# --- the engine's optimizer step (runtime/engine.py ``_take_model_step``) -----------------------------


def report_skipped_step(optimizer: torch.optim.Optimizer, skipped: bool) -> None:
    """Tell the engine whether ``optimizer.step()`` just dropped its update. After ``step()`` the engine
    reads the optimizer's ``overflow`` (the flag of an fp16 overflow): True keeps the schedule where it is
    and counts the step in ``engine.skipped_steps``, False steps the schedule. Nothing checks a stale name:
    a release that stopped reading it would advance the schedule on skipped steps, silently."""
    optimizer.overflow = skipped


# --- torch's LambdaLR (what get_last_lr() and DeepSpeed's lr logging read) ---------------------------


def set_last_lr(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """After the groups' ``lr`` were set by hand: make the scheduler's last lr say the same (torch keeps
    it in a private field that only ``step()`` writes; stepping would move the schedule on)."""
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


# --- DeepSpeed's JIT-built CPU op (comm/torch.py ``build_shm_op``, run by ``init_distributed``) -----------


def op_to_build_on_cpu() -> tuple[str, Path] | None:
    """(name, build folder) of the CPU communication op DeepSpeed will compile when the process group
    starts, if it is not built yet in this environment (``TORCH_EXTENSIONS_DIR``); None when there is
    nothing to build."""
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    folder = Path(_get_build_directory(builder.NAME, verbose=False))
    return None if (folder / f"{builder.NAME}.so").is_file() else (builder.absolute_name(), folder)
