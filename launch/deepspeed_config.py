"""The DeepSpeed config of a run: what the YAML generates, merged with the user's own DeepSpeed JSON.

:func:`deepspeed_config` builds the dict every run hands to ``deepspeed.initialize``. The YAML decides
the keys listed by :func:`owned_keys` (batch sizes, clipping, ZeRO stage, precision, and what our own
optimizer and expert parallelism need); the ``optimizer`` and ``scheduler`` blocks are refused, since
the YAML's ``optimizer`` and ``schedule`` sections build them. A JSON file named by ``deepspeed.config``
(or ``--deepspeed_config``) adds everything else: offload, bucket sizes, loss-scale settings, the flops
profiler, DeepSpeed's monitors, activation checkpointing, ... Those reach DeepSpeed unchanged: nested
objects merge key by key, and the JSON wins over a default of ours (``steps_per_print``). An owned key
in the JSON must agree with the YAML, or be ``"auto"`` (Hugging Face's convention: take the YAML's).

Problems come back as one line each, naming the JSON key, both values and the fix; the JSON is also
run through DeepSpeed's own config reader, so a typo inside ``zero_optimization`` fails at load, not
in ``deepspeed.initialize``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sigma_moe.config_check import ConfigError

if TYPE_CHECKING:
    from sigma_moe.launch.config import RunConfig

AUTO = "auto"

# Blocks the YAML builds itself: the JSON may not carry them at all.
REFUSED = {
    "optimizer": "the YAML's optimizer section builds the optimizer (AdamW: lr, betas, eps, weight_decay)",
    "scheduler": "the YAML's schedule section builds the learning-rate schedule (warm-up, cosine to min_lr)",
    "expert_parallel": "the YAML's distributed.expert_parallel_size decides expert parallelism",
}

# Names DeepSpeed reads as the same dtype (data_types.buffer_dtype).
_DTYPE_NAMES = {
    "fp32": ("fp32", "float32", "float", "torch.float32"),
    "bf16": ("bf16", "bfloat16", "torch.bfloat16"),
    "fp16": ("fp16", "float16", "half", "torch.float16"),
}


@dataclass(frozen=True)
class Owned:
    """A DeepSpeed key the YAML decides: its value, where it comes from, and what else means the same."""

    key: str  # dotted path in the DeepSpeed config
    value: Any
    source: str  # the YAML key that decides it, or why the value is fixed
    same: tuple = ()  # other JSON values that agree with ``value``
    fixed: bool = False  # no YAML key changes it
    deferred: bool = False  # the world size decides it: checked once the processes exist

    def agrees(self, v: Any) -> bool:
        if self.deferred:
            return True
        if isinstance(v, bool) != isinstance(self.value, bool):
            return False  # 1 is not true
        return v == self.value or v in self.same

    def conflict(self, v: Any) -> str:
        fix = f'remove {self.key} from the JSON (or write "auto")'
        fix = fix if self.fixed else f"make them agree: {fix}, or change the YAML"
        return f"{self.key}: the DeepSpeed JSON says {_show(v)}, but {self.source} makes it {_show(self.value)}; {fix}"


def micro_batch_size(cfg: RunConfig, world_size: int) -> int:
    """Sequences per rank per forward: the global batch split over ranks and accumulation steps."""
    return cfg.training.batch_size // (world_size * cfg.training.grad_accumulation)


def owned_keys(cfg: RunConfig, world_size: int | None) -> list[Owned]:
    """The keys the YAML decides; ``world_size`` None defers the check of the one the world size decides."""
    t = cfg.training
    precision = f"the YAML's training.precision ({t.precision})"
    keys = [
        Owned("train_batch_size", t.batch_size, "the YAML's training.batch_size"),
        Owned("gradient_accumulation_steps", t.grad_accumulation, "the YAML's training.grad_accumulation"),
        Owned("gradient_clipping", t.grad_clip, "the YAML's training.grad_clip"),
        Owned("zero_optimization.stage", t.zero_stage, "the YAML's training.zero_stage"),
        Owned("bf16.enabled", t.precision == "bf16", precision),
        Owned("fp16.enabled", t.precision == "fp16", precision),
        Owned("torch_autocast.enabled", False, precision),
        Owned("data_types.buffer_dtype", t.precision, precision, same=_DTYPE_NAMES[t.precision]),
        Owned(
            "zero_allow_untested_optimizer",
            True,
            "the YAML's optimizer (a torch AdamW, which ZeRO takes only with this set)",
            fixed=True,
        ),
        Owned(
            "gradient_allreduce_op",
            "mean",
            "expert parallelism (its expert-gradient reduction matches DeepSpeed's data-parallel mean)",
            fixed=True,
        ),
        Owned(
            "tensor_parallel.autotp_size",
            1,
            "the model (no tensor parallelism; experts are sharded by distributed.expert_parallel_size)",
            fixed=True,
        ),
    ]
    keys.insert(
        1,
        Owned(
            "train_micro_batch_size_per_gpu",
            micro_batch_size(cfg, world_size or 1),
            f"the YAML's training.batch_size ({t.batch_size}) / (world size {world_size} × "
            f"training.grad_accumulation ({t.grad_accumulation}))",
            deferred=world_size is None,
        ),
    )
    return keys


def generated_config(cfg: RunConfig, world_size: int) -> dict:
    """The DeepSpeed config the YAML alone generates."""
    t = cfg.training
    ds = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(cfg, world_size),
        "gradient_accumulation_steps": t.grad_accumulation,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,  # our torch AdamW under ZeRO 1/2
        "steps_per_print": 2**62,  # our monitor logs; keep DeepSpeed's console quiet
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    if t.precision != "fp32":
        # DeepSpeed casts parameters only; the model adds its fp32 position table to bf16/fp16
        # embeddings, and LayerNorm then refuses the mixed dtypes. Buffers follow the precision.
        ds["data_types"] = {"buffer_dtype": t.precision}
    return ds


def read_user_config(path: str) -> dict:
    """The JSON object in ``path`` (relative paths from the current directory, like ``data.path``).
    Raises ``ValueError`` with a message naming the file and the fix."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(
            f"{path}: no such file (a relative path is taken from the current directory "
            f"{Path.cwd()}); give the path of a DeepSpeed JSON config"
        )
    try:
        user = json.loads(p.read_text(), object_pairs_hook=_no_duplicate_keys)
    except ValueError as e:  # JSONDecodeError, or a key given twice
        raise ValueError(f"{path}: not valid JSON: {e}; fix the file (DeepSpeed configs are JSON objects)") from None
    if not isinstance(user, dict):
        raise ValueError(f'{path}: expected a JSON object ({{"key": value, ...}}), got {type(user).__name__}')
    return user


def merge_user_config(cfg: RunConfig, user: dict, world_size: int | None) -> tuple[dict, list[str]]:
    """The generated config with ``user`` merged over it, and the problems found (empty: use the dict).

    ``world_size`` None (at load, before the processes exist) merges as for one rank and does not check
    ``train_micro_batch_size_per_gpu``."""
    user = copy.deepcopy(user)
    if "bfloat16" in user and "bf16" not in user:
        user["bf16"] = user.pop("bfloat16")  # DeepSpeed's old name; under it our "bf16" block would win
    problems = [
        f"{key}: not allowed in the DeepSpeed JSON: {why}; remove the block"
        for key, why in REFUSED.items()
        if key in user
    ]
    merged = _deep_merge(generated_config(cfg, world_size or 1), user, "", problems)
    for owned in owned_keys(cfg, world_size):
        found, value = _lookup(user, owned.key)
        if not found:
            continue
        if value == AUTO or owned.agrees(value):
            _assign(merged, owned.key, owned.value)
        else:
            problems.append(owned.conflict(value))
    problems += [
        f'{key}: "auto" is only understood for the keys the YAML decides; give a value or remove it'
        for key in _auto_keys(merged, "")
    ]
    found, device = _lookup(merged, "zero_optimization.offload_optimizer.device")
    if found and device in ("cpu", "nvme") and merged.get("zero_force_ds_cpu_optimizer", True) is not False:
        problems.append(  # DeepSpeed would refuse it in deepspeed.initialize, pointing at an optimizer block
            "zero_optimization.offload_optimizer: ZeRO-Offload expects DeepSpeed's CPU Adam, but the optimizer is "
            'the torch AdamW the YAML\'s optimizer section builds; add "zero_force_ds_cpu_optimizer": false to '
            "the JSON to step it on the CPU"
        )
    return merged, problems


def deepspeed_config_problems(cfg: RunConfig, world_size: int | None = None) -> list[str]:
    """Problems of the YAML's ``deepspeed.config`` JSON (none without one), each as one line that
    names the YAML key and the file; DeepSpeed's own reader checks the merged config too."""
    return _checked_merge(cfg, world_size)[1]


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    """The config handed to ``deepspeed.initialize``: generated from the YAML, with the user's JSON
    (``deepspeed.config``) merged over it. Raises ``ConfigError`` on a conflict."""
    merged, problems = _checked_merge(cfg, world_size)
    if problems:
        raise ConfigError("invalid DeepSpeed config:\n" + "\n".join(f"  - {p}" for p in problems))
    return merged


def _checked_merge(cfg: RunConfig, world_size: int | None) -> tuple[dict, list[str]]:
    path = cfg.deepspeed.config
    if path is None:
        return generated_config(cfg, world_size or 1), []
    try:
        user = read_user_config(path)
    except ValueError as e:
        return {}, [f"deepspeed.config: {e}"]
    merged, problems = merge_user_config(cfg, user, world_size)
    if not problems:
        rejected = _deepspeed_rejects(merged)
        problems = [f"DeepSpeed rejects it: {rejected}; fix the JSON"] if rejected else []
    return merged, [f"deepspeed.config ({path}): {p}" for p in problems]


# ---------------------------------------------------------------------------------------------------


def _deep_merge(ours: dict, user: dict, path: str, problems: list[str]) -> dict:
    out = copy.deepcopy(ours)
    for k, v in user.items():
        key = f"{path}{k}"
        if isinstance(out.get(k), dict) and not isinstance(v, dict):
            problems.append(f"{key}: expected a JSON object (e.g. {_show(out[k])}), got {_show(v)}")
        elif isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v, f"{key}.", problems)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _lookup(d: dict, dotted: str) -> tuple[bool, Any]:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _assign(d: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        d = d[part]  # the user's JSON had them, so the merge has them
    d[leaf] = value


def _auto_keys(d: dict, path: str) -> list[str]:
    keys = []
    for k, v in d.items():
        if isinstance(v, dict):
            keys += _auto_keys(v, f"{path}{k}.")
        elif v == AUTO:
            keys.append(f"{path}{k}")
    return keys


def _show(v: Any) -> str:
    return json.dumps(v)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    d: dict = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"key {k!r} appears twice in one object")
        d[k] = v
    return d


def _deepspeed_rejects(merged: dict) -> str | None:
    """DeepSpeed's own reading of ``merged``: None, or its complaint on one line.

    The batch keys are ours and already checked; they are replaced by a micro-batch of 1, which fits
    any world size, so the reading does not depend on whether or how large a process group exists."""
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = {
        k: v
        for k, v in merged.items()
        if k not in ("train_batch_size", "gradient_accumulation_steps", "train_micro_batch_size_per_gpu")
    }
    probe["train_micro_batch_size_per_gpu"] = 1
    try:
        DeepSpeedConfig(probe)
    except Exception as e:  # noqa: BLE001 - any failure of DeepSpeed's reader is a problem of this JSON
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "errors.pydantic.dev" not in ln]
        return f"{type(e).__name__}: {' '.join(lines)}"
    return None
