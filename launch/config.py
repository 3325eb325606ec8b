"""The run configuration: YAML -> nested typed dataclasses, ``--set`` overrides, validation, saving.

A config file has the sections of :class:`RunConfig` (``model``, ``data``, ``optimizer``, ``schedule``,
``training``, ``distributed``, ``logging``, ``checkpoint``, ``deepspeed``); every section but ``model``
and ``data`` may be left out (its defaults apply). ``model.ff`` picks the feedforward variant by
``kind`` (the registry in :mod:`sigma_moe.layers.feedforward`); its other keys are that variant's
config fields.
``model.vocab_size`` may be left out: it is then taken from ``data.vocab_size``.

Includes: a top-level ``base: other.yaml`` (path relative to the including file, or a list of paths,
applied in order) loads that file first and deep-merges this file's keys over it; bases may have bases.
A mapping replaces the base's mapping key by key; any other value (including a list) replaces it whole.
Setting ``model.ff.kind`` to another variant drops the base's ``ff`` keys (they belong to another kind).

Overrides: ``--set training.steps=100`` (the value is parsed as YAML, so ``1e-3``, ``[0.9, 0.99]``,
``null`` and ``{kind: dense, d_ff: 512}`` work) are applied after includes, before type checking.

Errors (:class:`ConfigError`) name the key path and say how to fix it, and are raised before any work
(no data loading, no model building).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sigma_moe.launch.config_checks import check_run_config
from sigma_moe.launch.data.splits import DataConfig
from sigma_moe.layers.feedforward import feedforward_config_class, feedforward_kinds
from sigma_moe.layers.transformer import TransformerConfig


class ConfigError(ValueError):
    """A config problem; the message names the key (``a.b.c``) and the fix."""


@dataclass
class OptimizerConfig:
    """Adam(W): the paper uses Adam (0.9, 0.999), lr 2.5e-4, no weight decay."""

    lr: float = 2.5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled (AdamW); applied to matrices only, not to biases/norms


@dataclass
class ScheduleConfig:
    """Linear warm-up from 0, then cosine decay from ``optimizer.lr`` to ``min_lr``."""

    warmup_steps: int = 0
    min_lr: float = 0.0
    decay_steps: int | None = None  # steps of the cosine (warm-up included); None: training.steps


@dataclass
class TrainingConfig:
    batch_size: int = 64  # sequences per optimizer step, over all ranks and accumulation steps
    grad_accumulation: int = 1
    steps: int = 1000  # optimizer steps
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 20  # validation batches per periodic evaluation (the final test uses all)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: float = 0.25  # max global gradient norm; 0 turns clipping off
    seed: int = 0
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0, 1 or 2
    log_every: int = 10  # steps between TensorBoard scalars (routing figures too)
    batching: Literal["auto", "random", "stream"] = "auto"
    """random: windows at random offsets; stream: the split as batch_size contiguous columns, each step
    the next context tokens of every column (Transformer-XL's order, which its memory needs); auto:
    stream for model.attention xl, random otherwise."""
    activation_checkpointing: bool = False
    """Keep only each Transformer block's input in the forward and recompute the block in backward:
    less activation memory for about one more forward per step. Losses, gradients and routing
    statistics are unchanged (dropout masks are replayed)."""
    on_divergence: Literal["stop", "skip"] = "stop"
    """What a step whose loss or gradients are not finite does: stop (an error naming the step, exit 2,
    the weights as before the step) or skip (the step's update is dropped and its batch consumed;
    ZeRO stage 0 in fp32 only). Skipping stops too after ``max_skipped_steps`` such steps in a row."""
    max_skipped_steps: int = 10
    peak_tflops_per_device: float | None = None
    """Peak FLOP/s of one device, in TFLOP/s, for the MFU that training logs (train/mfu = model
    TFLOP/s ÷ (this × world size)). None: the data-sheet dense peak of a known GPU (A100, H100,
    H200) at training.precision; on a CPU or another GPU no MFU is logged."""


@dataclass
class DistributedConfig:
    expert_parallel_size: int = 1  # ranks that share one copy of the experts; divides the world size
    # what moves the expert all-to-all's rows: torch.distributed (gloo / NCCL), or MPI (mpi4py, CPU
    # tensors, mpirun only: shared memory between the processes of one host); auto: MPI for a CPU job
    # that mpirun started, torch.distributed otherwise
    transport: Literal["auto", "torch", "mpi"] = "auto"
    timeout_s: int = 1800  # collective timeout


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"  # resolved config, TensorBoard events and (by default) checkpoints
    tensorboard: bool = True
    progress_bar: bool = True  # tqdm on rank 0
    name: str | None = None  # TensorBoard run name, its events folder RUN_DIR/<name>; None: run_dir's last part
    starved_below: float = 0.25  # an expert is "starved" over a logging interval below this fraction of the mean load
    images_every: int = 100  # steps between the load-balance images (and at the last step); 0: only at the end

    def tensorboard_dir(self) -> Path:
        """Where this run's TensorBoard events go: named after the run, so TensorBoard's run names differ."""
        return Path(self.run_dir) / tensorboard_run_name(self)


def tensorboard_run_name(logging: "LoggingConfig") -> str:
    return logging.name or Path(os.path.normpath(os.path.abspath(logging.run_dir))).name or "run"


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0: only the final one
    keep_last: int = 2
    dir: str | None = None  # None: <logging.run_dir>/checkpoints
    resume: str = "auto"  # auto: latest in dir if any | none | path to a checkpoint dir or tag dir
    save_final: bool = True


@dataclass
class DeepSpeedSettings:
    """The user's own DeepSpeed JSON, merged with the DeepSpeed config the YAML generates (see
    :mod:`sigma_moe.launch.deepspeed_config`: which keys the YAML decides, and what passes through)."""

    config: str | None = None  # path of a DeepSpeed JSON; relative: from the current directory, like data.path


@dataclass
class RunConfig:
    model: TransformerConfig
    data: DataConfig
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.logging.run_dir) / "checkpoints"


# ---------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), *,
                deepspeed_config: str | None = None) -> RunConfig:
    """Read ``path`` (with its ``base:`` includes), apply ``--set`` overrides, type-check, validate.
    ``deepspeed_config``: the command line's ``--deepspeed_config``, i.e. ``deepspeed.config``."""
    raw = load_yaml_with_bases(Path(path))
    for item in overrides:
        apply_override(raw, item)
    if deepspeed_config is not None:
        set_deepspeed_config(raw, deepspeed_config)
    return config_from_dict(raw)


def set_deepspeed_config(raw: dict, path: str) -> None:
    """``--deepspeed_config PATH``: the YAML's ``deepspeed.config`` unless the YAML names another file."""
    section = raw.setdefault("deepspeed", {})
    if not isinstance(section, dict):
        return  # typed construction reports the malformed section
    named = section.get("config")
    if isinstance(named, str) and Path(named).resolve() != Path(path).resolve():
        raise ConfigError(f"--deepspeed_config {path} and the YAML's deepspeed.config {named} name different "
                          "files; give one: drop --deepspeed_config, or remove deepspeed.config from the YAML")
    section["config"] = path


def config_from_dict(raw: dict) -> RunConfig:
    raw = copy.deepcopy(raw)
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(raw).__name__}")
    for section in ("model", "data"):
        if section not in raw:
            raise ConfigError(f"missing section {section!r}; add a '{section}:' mapping to the config")
    model = raw["model"]
    if isinstance(model, dict) and "vocab_size" not in model and isinstance(raw["data"], dict):
        data_defaults = DataConfig()
        model["vocab_size"] = raw["data"].get("vocab_size", data_defaults.vocab_size)
    cfg = _build(RunConfig, raw, "")
    problems = check_run_config(cfg)
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))
    return cfg


def load_yaml_with_bases(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' includes form a cycle: {' -> '.join(map(str, _seen + (path,)))}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass the path of a YAML file (see configs/)")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    bases = raw.pop("base", None)
    if bases is None:
        return raw
    merged: dict = {}
    for b in [bases] if isinstance(bases, str) else bases:
        if not isinstance(b, str):
            raise ConfigError(f"{path}: 'base' must be a path or a list of paths, got {b!r}")
        merged = deep_merge(merged, load_yaml_with_bases(path.parent / b, _seen + (path,)))
    return deep_merge(merged, raw)


def deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if k == "ff" and isinstance(v, dict) and isinstance(out.get(k), dict) and v.get("kind", out[k].get("kind")) != out[k].get("kind"):
            out[k] = copy.deepcopy(v)  # another variant: the base's fields would be unknown keys
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_override(raw: dict, item: str) -> None:
    """``a.b.c=value`` -> ``raw["a"]["b"]["c"] = yaml(value)``; intermediate mappings are created."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. --set training.steps=100")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML: {e}") from None
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is {child!r}, not a section")
        node = child
    if parts[-1] == "kind" and parts[-2:-1] == ["ff"] and node.get("kind") not in (None, value):
        node.clear()  # switching variant: the old variant's fields do not apply
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------------------------
# Typed construction


def _build(cls: type, data: Any, path: str) -> Any:
    where = path or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        msgs = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), fields, n=1)
            hint = f" (did you mean {_join(path, close[0])!r}?)" if close else ""
            msgs.append(f"unknown key {_join(path, k)!r}{hint}")
        raise ConfigError("; ".join(msgs) + f". Valid keys of {where}: {sorted(fields)}")
    missing = [
        n for n, f in fields.items()
        if n not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {[_join(path, m) for m in missing]}; add them to the config")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = _join(path, name)
        if name == "ff" and cls is TransformerConfig:
            kwargs[name] = _build_ff(value, key)
        else:
            kwargs[name] = _convert(hints[name], value, key)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # the dataclass's own __post_init__ checks
        raise ConfigError(f"{where}: {e}") from None


def _build_ff(value: Any, key: str) -> Any:
    if not isinstance(value, dict) or "kind" not in value:
        raise ConfigError(f"{key}: expected a mapping with a 'kind' (one of {feedforward_kinds()}), got {value!r}")
    try:
        cls = feedforward_config_class(value["kind"])
    except ValueError as e:
        raise ConfigError(f"{key}.kind: {e}") from None
    return _build(cls, value, key)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list ({_type_name(tp)}), got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values ({_type_name(tp)}), got {len(value)}: {value!r}")
            return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            hint = " (write it without a decimal point)" if isinstance(value, float) and value.is_integer() else ""
            raise ConfigError(f"{key}: expected an integer, got {value!r}{hint}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text; accept what float() reads
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # .inf and .nan are YAML numbers, and no setting means them
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r} (quote it in YAML)")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp!r}")  # a programming error in a config class


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else str(name)


# ---------------------------------------------------------------------------------------------------
# Saving


def config_to_dict(cfg: Any) -> dict:
    """Plain dict (tuples as lists) that :func:`config_from_dict` reads back to an equal config."""

    def plain(v):
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically: a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
    return path
