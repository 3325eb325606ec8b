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
Setting a ``kind`` (``model.ff.kind``) to another variant drops the base's keys of that mapping (they
belong to another kind).

Overrides: ``--set training.steps=100`` (the value is parsed as YAML, so ``1e-3``, ``[0.9, 0.99]``,
``null`` and ``{kind: dense, d_ff: 512}`` work) are applied after includes, before type checking.

Validation: every section is a dataclass that checks its own values when built (types from the
annotations, then its ``check``: :mod:`sigma_moe.config_check`); :func:`~sigma_moe.config_schema.build_config`
builds the sections from the YAML (unknown and missing keys) and reports the problems of all of them
together, each under its key path; ``RunConfig.check`` adds what spans sections, and
:func:`~sigma_moe.launch.config_checks.check_machine` the files. Errors (:class:`ConfigError`) name the
key path and say how to fix it, and are raised before any work (no data loading, no model building).
Each field's documentation is the string under it; ``sigma-moe config`` prints every key.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sigma_moe.atomic_io import atomic_write_text
from sigma_moe.config_check import Checked, Checks, ConfigError
from sigma_moe.config_schema import build_config
from sigma_moe.launch.checkpoint.config import CheckpointConfig
from sigma_moe.launch.config_checks import check_machine, check_sections
from sigma_moe.launch.data.splits import DataConfig
from sigma_moe.launch.monitor.config import LoggingConfig
from sigma_moe.layers.transformer import TransformerConfig


@dataclass
class OptimizerConfig(Checked):
    """Adam(W): the paper uses Adam (0.9, 0.999), lr 2.5e-4, no weight decay."""

    lr: float = 2.5e-4
    """Peak learning rate (after the warm-up)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's β1, β2."""
    eps: float = 1e-8
    """Adam's ε."""
    weight_decay: float = 0.0
    """Decoupled (AdamW); applied to matrices only, not to biases or norms."""

    def check(self, c: Checks) -> None:
        c.positive("lr", "eps")
        for i, b in enumerate(self.betas):
            if not 0.0 <= b < 1.0:
                c.add(f"betas[{i}]", f"must be in [0, 1), got {b}")
        c.require(self.weight_decay >= 0, "weight_decay", "must be >= 0")


@dataclass
class ScheduleConfig(Checked):
    """Linear warm-up from 0, then cosine decay from ``optimizer.lr`` to ``min_lr``."""

    warmup_steps: int = 0
    """Optimizer steps of the linear warm-up."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine (at most optimizer.lr)."""
    decay_steps: int | None = None
    """Steps of the cosine (warm-up included); null: training.steps."""

    def check(self, c: Checks) -> None:
        c.require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        if self.decay_steps is not None:
            c.require(self.decay_steps > 0, "decay_steps", "must be > 0, or null to decay over training.steps")


@dataclass
class TrainingConfig(Checked):
    batch_size: int = 64
    """Sequences per optimizer step, over all ranks and accumulation steps."""
    grad_accumulation: int = 1
    """Micro-batches per optimizer step on each rank."""
    steps: int = 1000
    """Optimizer steps."""
    eval_every: int = 0
    """Steps between evaluations on the validation split; 0: only at the end."""
    eval_batches: int = 20
    """Validation batches per periodic evaluation (the final test uses all)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision (bf16 / fp16: DeepSpeed's mixed precision; fp16 needs a GPU)."""
    grad_clip: float = 0.25
    """Max global gradient norm; 0 turns clipping off."""
    seed: int = 0
    """Seed of the model's initialisation and of the data order."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0, 1 or 2."""
    log_every: int = 10
    """Steps between TensorBoard scalars (routing figures too)."""
    batching: Literal["auto", "random", "stream"] = "auto"
    """random: windows at random offsets; stream: the split as batch_size contiguous columns, each step
    the next context tokens of every column (Transformer-XL's order, which its memory needs); auto:
    stream for model.attention xl, random otherwise."""
    activation_checkpointing: bool = False
    """Keep only each Transformer block's input in the forward and recompute the block in backward:
    less activation memory for about one more forward per step. Losses, gradients and routing
    statistics are unchanged (dropout masks are replayed)."""
    compile: bool = False
    """torch.compile each Transformer block (one graph per block, the CVMM expert matmuls inside it as
    custom ops; every block shares the compiled code). The first steps, and the first evaluation, pay
    the compile time. Losses equal eager ones up to float rounding (dropout draws other masks); the
    checkpoints are the same as eager runs' and load in either. Under data or expert parallelism the
    all-to-all and the regulariser's all-reduce run eager between the compiled parts."""
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"
    """training.compile's backend: inductor (generated fused kernels; on a CPU it needs a C++ compiler),
    or aot_eager (traces forward and backward, runs them with eager kernels: quick to compile, for
    checking that the model traces)."""
    on_divergence: Literal["stop", "skip"] = "stop"
    """What a step whose loss or gradients are not finite does: stop (an error naming the step, exit 2,
    the weights as before the step) or skip (the step's update is dropped and its batch consumed;
    ZeRO stage 0 in fp32 only). Skipping stops too after ``max_skipped_steps`` such steps in a row."""
    max_skipped_steps: int = 10
    """on_divergence skip: the run stops after this many skipped steps in a row."""
    spike_loss_factor: float = 3.0
    """A step whose loss (mean over ranks) is over this × the median of the last spike_window steps'
    counts as diverged (on_divergence), though finite; 0: off."""
    spike_grad_factor: float = 10.0
    """The same for the gradient norm before clipping, once 10 steps are known; 0: off."""
    spike_window: int = 50
    """Steps of the run's own recent history (kept across resumes) that spikes are measured against."""
    peak_tflops_per_device: float | None = None
    """Peak FLOP/s of one device, in TFLOP/s, for the MFU that training logs (train/mfu = model
    TFLOP/s ÷ (this × world size)). None: the data-sheet dense peak of a known GPU (A100, H100,
    H200) at training.precision; on a CPU or another GPU no MFU is logged."""

    def check(self, c: Checks) -> None:
        c.positive(
            "batch_size", "grad_accumulation", "steps", "eval_batches", "log_every", "max_skipped_steps", "spike_window"
        )
        for key in ("spike_loss_factor", "spike_grad_factor"):
            c.require(getattr(self, key) == 0 or getattr(self, key) > 1, key, "must be > 1, or 0 (off)")
        if self.peak_tflops_per_device is not None:
            c.require(
                self.peak_tflops_per_device > 0,
                "peak_tflops_per_device",
                "must be > 0; or null for the built-in figure of a known GPU",
            )
        c.require(self.eval_every >= 0, "eval_every", "must be >= 0 (0: only at the end)")
        if self.on_divergence == "skip" and (self.zero_stage != 0 or self.precision != "fp32"):
            c.add(
                "on_divergence",
                f"skip needs training.zero_stage 0 and precision fp32 (DeepSpeed's ZeRO and "
                f"mixed-precision optimizers step by themselves), got zero_stage "
                f"{self.zero_stage}, precision {self.precision}; use stop, or those settings",
            )
        c.require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0: no clipping)")
        c.require(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32) (numpy's seeds)")
        c.require(
            self.zero_stage in (0, 1, 2),
            "zero_stage",
            "not supported; use 0, 1 or 2 (stage 3 would shard the experts DeepSpeed does not know about)",
        )
        if self.batch_size > 0 and self.grad_accumulation > 0 and self.batch_size % self.grad_accumulation:
            c.add(
                "batch_size",
                f"{self.batch_size} is not divisible by training.grad_accumulation="
                f"{self.grad_accumulation}; make batch_size a multiple of it",
            )


@dataclass
class DistributedConfig(Checked):
    expert_parallel_size: int = 1
    """Ranks that share one copy of every layer's experts; divides the world size and model.ff.n_experts."""
    transport: Literal["auto", "torch", "mpi"] = "auto"
    """What moves the expert all-to-all's rows: torch (torch.distributed: gloo / NCCL), or mpi (mpi4py,
    CPU tensors, mpirun only: shared memory between the processes of one host); auto: mpi for a CPU
    job that mpirun started, torch otherwise."""
    timeout_s: int = 1800
    """Collective timeout, in seconds."""

    def check(self, c: Checks) -> None:
        c.positive("expert_parallel_size", "timeout_s")


@dataclass
class DeepSpeedSettings(Checked):
    """The user's own DeepSpeed JSON, merged with the DeepSpeed config the YAML generates (see
    :mod:`sigma_moe.launch.deepspeed_config`: which keys the YAML decides, and what passes through)."""

    config: str | None = None
    """Path of a DeepSpeed JSON (also --deepspeed_config); relative: from the current directory, like data.path."""


@dataclass
class RunConfig(Checked):
    model: TransformerConfig
    """The model (sigma_moe.layers.TransformerConfig)."""
    data: DataConfig
    """Corpus, splits and tokenizer."""
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

    def check(self, c: Checks) -> None:
        """What spans sections (each section checked itself when built)."""
        check_sections(self, c)


# ---------------------------------------------------------------------------------------------------
# Loading


def load_config(
    path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), *, deepspeed_config: str | None = None
) -> RunConfig:
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
        raise ConfigError(
            f"--deepspeed_config {path} and the YAML's deepspeed.config {named} name different "
            "files; give one: drop --deepspeed_config, or remove deepspeed.config from the YAML"
        )
    section["config"] = path


def config_from_dict(raw: dict) -> RunConfig:
    """Build (every section's problems together, each under its key path), then check the files."""
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
    cfg = build_config(RunConfig, raw)
    problems = check_machine(cfg)
    if problems:
        raise ConfigError(
            problems[0] if len(problems) == 1 else "invalid config:\n" + "\n".join(f"  - {p}" for p in problems)
        )
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
        if (
            isinstance(v, dict)
            and isinstance(out.get(k), dict)
            and v.get("kind", out[k].get("kind")) != out[k].get("kind")
        ):
            out[k] = copy.deepcopy(v)  # another kind (variant): the base's fields would be unknown keys
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
    if parts[-1] == "kind" and len(parts) > 1 and node.get("kind") not in (None, value):
        node.clear()  # switching kind (variant): the old variant's fields do not apply
    node[parts[-1]] = value


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
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path
