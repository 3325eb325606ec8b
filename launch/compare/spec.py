"""A comparison spec: YAML -> typed dataclasses -> the grid of runs (size × variant × seed), each
with its resolved :class:`RunConfig`, sized to the same parameter count as the spec's ``match`` variant.

The keys are the fields of :class:`CompareSpec`, :class:`VariantSpec` and :class:`SizeSpec` below
(each documented under it; built and checked as the run config is: unknown keys, types and the
cross-references between variants and sizes, every problem under its key path); an annotated example
is in configs/compare/README.md.

Order of overrides for one run: the base config, the spec's ``set``, the size's ``set``, the variant's
``set``, the command line's ``--set``; then ``model.ff`` = the variant's ``ff`` with the size's ``ff``
entry for that variant merged over it; ``training.seed``, ``logging.run_dir`` (OUT/size/variant/seedN),
``logging.name`` (the TensorBoard run: [size-]variant-seedN).
A run's seeds are its size's ``seeds``, else its variant's, else the spec's.

Parameter parity: the ``match`` variant's whole model (no ``auto`` field allowed) sets the target; a
variant's one ``auto`` field is solved (:func:`sigma_moe.layers.sizing.solve_parameter_equal`) so
its whole model has the nearest count (its non-feedforward parameters are subtracted first, so a
variant with another backbone still matches in total). Counts use the meta device: nothing is allocated.
"""

from __future__ import annotations

import copy
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sigma_moe.config_check import Checked, Checks, ConfigError
from sigma_moe.config_schema import build_config
from sigma_moe.launch.compare.run_spec import RunSpec
from sigma_moe.launch.config import (
    RunConfig,
    apply_override,
    config_from_dict,
    config_to_dict,
    load_yaml_with_bases,
)
from sigma_moe.layers.sizing import AUTO, solve_parameter_equal

DEFAULT_SIZE = "default"
WORKER_MODULE = "sigma_moe.launch.compare.worker"


@dataclass
class VariantSpec(Checked):
    ff: dict
    """The variant's feedforward: a model.ff mapping (its kind and fields); one integer field may be
    auto (solved so the whole model matches the match variant's parameter count)."""
    seeds: list[int] | None = None
    """The seeds of this variant's runs; null: the spec's seeds."""
    set: dict = field(default_factory=dict)
    """Run-config overrides of this variant's runs (dotted keys, YAML values)."""

    def check(self, c: Checks) -> None:
        if "kind" not in self.ff:
            c.add("ff", "missing 'kind': name the feedforward variant, e.g. {kind: dense, d_ff: auto}")
        _check_seeds(c, "seeds", self.seeds)
        _check_overrides(c, "set", self.set)


@dataclass
class SizeSpec(Checked):
    set: dict = field(default_factory=dict)
    """Run-config overrides of this size's runs (dotted keys, YAML values)."""
    ff: dict[str, dict] = field(default_factory=dict)
    """Variant name -> feedforward fields merged over that variant's ff at this size."""
    variants: list[str] | None = None
    """The variants run at this size; null: all (the match variant sets the budget even when not run)."""
    seeds: list[int] | None = None
    """The seeds of every variant at this size; null: each variant's."""

    def check(self, c: Checks) -> None:
        for name, fields in self.ff.items():
            if not isinstance(fields, dict):
                c.add(f"ff.{name}", f"expected a mapping of feedforward fields, got {fields!r}")
        if self.variants is not None and not self.variants:
            c.add("variants", "= []: name at least one variant, or leave 'variants' out (all variants)")
        _check_seeds(c, "seeds", self.seeds)
        _check_overrides(c, "set", self.set)


@dataclass
class CompareSpec(Checked):
    config: str
    """The run config every run starts from (a path relative to the spec's folder)."""
    variants: dict[str, VariantSpec]
    """Variant name -> its ff [+ seeds] [+ set]; the name is a folder name."""
    match: str
    """The variant whose whole-model parameter count the others' auto fields match (it has no auto field)."""
    out: str = "runs/compare"
    """The output folder (relative to the working directory; --out overrides)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """The seeds of a variant that names none (nor its size)."""
    sizes: dict[str, SizeSpec] = field(default_factory=lambda: {DEFAULT_SIZE: SizeSpec()})
    """Size name -> its set, ff per variant, variants and seeds; default: one size named "default"."""
    set: dict = field(default_factory=dict)
    """Run-config overrides of every run (dotted keys, YAML values)."""
    launcher: str | None = None
    """How each run starts, e.g. "torchrun --nproc_per_node 8 -m"; null: this Python with -m."""
    baseline: str | None = None
    """The variant the report's gap table gives every variant's test perplexity relative to; null: none."""
    path: Path = field(default=Path("spec.yaml"), init=False)
    """The spec file (set by load_spec): relative paths in it are relative to its folder."""

    @property
    def config_file(self) -> Path:
        return self.path.parent / self.config

    def check(self, c: Checks) -> None:
        known = f"choose one of {sorted(self.variants)}"
        c.require(bool(self.variants), "variants", "name at least one variant")
        c.require(bool(self.sizes), "sizes", "name at least one size, or leave 'sizes' out")
        for section, names in (("variants", self.variants), ("sizes", self.sizes)):
            for name in names:
                if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
                    c.add(f"{section}.{name}", "names become folder names; use letters, digits, '-' or '_'")
        for key in ("match", "baseline"):
            name = getattr(self, key)
            if name is not None and name not in self.variants:
                c.add(key, f"{name!r} is not a variant; {known}")
        if self.match in self.variants and AUTO in self.variants[self.match].ff.values():
            c.add(
                f"variants.{self.match}", "the match variant sets the parameter budget; it cannot have an 'auto' field"
            )
        for name, size in self.sizes.items():
            for key, variants in (("ff", size.ff), ("variants", size.variants or [])):
                for variant in variants:
                    if variant not in self.variants:
                        c.add(f"sizes.{name}.{key}", f"{variant!r} is not a variant; {known}")
        _check_seeds(c, "seeds", self.seeds)
        _check_overrides(c, "set", self.set)


def _check_seeds(c: Checks, key: str, seeds: list[int] | None) -> None:
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        c.add(key, f"= {seeds!r}: give a non-empty list of distinct integers")


def _check_overrides(c: Checks, key: str, overrides: dict) -> None:
    for k in overrides:
        if not isinstance(k, str) or not k or any(not p for p in k.split(".")):
            c.add(key, f"{k!r} is not a dotted config key (e.g. training.steps)")


# ---------------------------------------------------------------------------------------------------
# Parsing


def load_spec(path: str | Path) -> CompareSpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"comparison spec {path} does not exist; pass a YAML file (see configs/compare/)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return spec_from_dict(raw, path)


def spec_from_dict(raw: Any, path: Path) -> CompareSpec:
    """The spec of the file ``path`` from its YAML mapping ``raw``: every problem under its key path."""
    try:
        if isinstance(raw, dict) and isinstance(raw.get("sizes"), dict):  # "name:" alone is a size of defaults
            raw = {**raw, "sizes": {k: {} if v is None else v for k, v in raw["sizes"].items()}}
        spec = build_config(CompareSpec, raw)
        spec.path = path
        if not spec.config_file.is_file():
            raise ConfigError(f"config: {spec.config_file} does not exist (paths are relative to the spec's folder)")
    except ConfigError as e:
        raise ConfigError([("", f"{path}: {line}") for line in e.lines()]) from None
    return spec


# ---------------------------------------------------------------------------------------------------
# The grid


def expand_grid(
    spec: CompareSpec, out: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> list[RunSpec]:
    """Every (size, variant, seed) of the spec, in that order, resolved and sized. ``overrides``
    (``KEY=VALUE`` strings, as ``--set``) apply to every run after the spec's own."""
    out_dir = Path(out if out is not None else spec.out)
    base = load_yaml_with_bases(spec.config_file)
    runs = []
    for size_name, size in spec.sizes.items():
        target = None
        raws = {}
        for name, variant in spec.variants.items():
            raw = copy.deepcopy(base)
            for layer in (spec.set, size.set, variant.set):
                for k, v in layer.items():
                    _set(raw, k, v)
            for item in overrides:
                _not_ff(item.partition("=")[0].strip())
                apply_override(raw, item)
            raw.setdefault("model", {})["ff"] = {**variant.ff, **size.ff.get(name, {})}
            raws[name] = raw
        where = f"{spec.path}: size {size_name!r}"
        ref = _config(raws[spec.match], f"{where}, variant {spec.match!r}")
        target = _model_params(ref)
        for name, variant in spec.variants.items():
            if size.variants is not None and name not in size.variants:
                continue  # sized above all the same: the match variant sets the target even when it does not run
            raw = raws[name]
            ff = raw["model"]["ff"]
            if any(v == AUTO for v in ff.values()):
                probe = _config(
                    {**raw, "model": {**raw["model"], "ff": {"kind": "dense", "d_ff": 1}}}, f"{where}, variant {name!r}"
                )
                non_ff = _model_params(probe) - probe.model.n_layers * _ff_params(probe)
                per_layer = round((target - non_ff) / probe.model.n_layers)
                try:
                    solved, _ = solve_parameter_equal(ff, probe.model.d_model, per_layer)
                except ValueError as e:
                    raise ConfigError(f"{where}, variant {name!r}: {e}") from None
                raw["model"]["ff"] = config_to_dict(solved)
            for seed in size.seeds or variant.seeds or spec.seeds:
                run_dir = out_dir / size_name / name / f"seed{seed}"
                r = copy.deepcopy(raw)
                _set(r, "training.seed", seed)
                _set(r, "logging.run_dir", str(run_dir))
                _set(r, "logging.name", run_name(size_name if len(spec.sizes) > 1 else None, name, seed))
                _set(r, "logging.progress_bar", False)  # the run's log is a file: no carriage returns
                cfg = _config(r, f"{where}, variant {name!r}")
                runs.append(_sized(size_name, name, seed, run_dir, cfg, target))
    return runs


def run_name(size: str | None, variant: str, seed: int) -> str:
    """The TensorBoard name of a grid run (its events folder): the size only when the grid has several."""
    return "-".join(p for p in (size, variant, f"seed{seed}") if p)


def worker_command(spec: CompareSpec, run_config: Path) -> list[str]:
    """The child process of one run: the spec's launcher (default: this Python with -m) + the worker."""
    prefix = shlex.split(spec.launcher) if spec.launcher else [sys.executable, "-m"]
    return [*prefix, WORKER_MODULE, str(run_config)]


def _set(raw: dict, key: str, value: Any) -> None:
    """``key: value`` of a spec (a value read from YAML) set as ``--set key=value`` sets it."""
    _not_ff(key)
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).removesuffix("...\n").strip()
    apply_override(raw, f"{key}={text}")


def _not_ff(key: str) -> None:
    if key == "model.ff" or key.startswith("model.ff."):
        raise ConfigError(
            f"{key}: the feedforward of each run is its variant's 'ff' (with the size's "
            f"'ff' entry); set feedforward fields there, not with set / --set"
        )


def _config(raw: dict, where: str) -> RunConfig:
    try:
        return config_from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _model_params(cfg: RunConfig) -> int:
    import torch

    from sigma_moe.layers.sizing import count_parameters
    from sigma_moe.layers.transformer import TransformerLM

    with torch.device("meta"):
        return count_parameters(TransformerLM(cfg.model))


def _ff_params(cfg: RunConfig) -> int:
    from sigma_moe.layers.sizing import feedforward_parameter_count

    return feedforward_parameter_count(cfg.model.ff, cfg.model.d_model)


def _sized(size: str, variant: str, seed: int, run_dir: Path, cfg: RunConfig, target: int) -> RunSpec:
    import torch

    from sigma_moe.layers.dense import DenseConfig
    from sigma_moe.layers.feedforward import build_feedforward
    from sigma_moe.layers.sizing import mlp_flops_per_token, parameter_equal_dense_d_ff

    m = cfg.model
    with torch.device("meta"):
        ff = build_feedforward(m.ff, d_model=m.d_model, n_layers=m.n_layers)
        dense = build_feedforward(
            DenseConfig(d_ff=parameter_equal_dense_d_ff(m.ff, m.d_model)), d_model=m.d_model, n_layers=m.n_layers
        )
    return RunSpec(
        size=size,
        variant=variant,
        seed=seed,
        run_dir=run_dir,
        cfg=cfg,
        params=_model_params(cfg),
        ff_params=_ff_params(cfg),
        mlp_flops=mlp_flops_per_token(ff) * m.n_layers,
        dense_mlp_flops=mlp_flops_per_token(dense) * m.n_layers,
        target_params=target,
    )
