"""A comparison spec: YAML -> typed dataclasses -> the grid of runs (size × variant × seed), each
with its resolved :class:`RunConfig`, sized to the same parameter count as the spec's ``match`` variant.

    config: ../tiny.yaml          # the run config every run starts from (relative to this file)
    out: runs/compare/tiny        # output folder (``--out`` overrides; relative to the working dir)
    match: sigma_moe              # the variant whose parameter count the others' ``auto`` fields match
    baseline: dense               # optional: the report's gap table gives every variant's test perplexity
                                  # relative to this variant's, per size and seed
    seeds: [0]                    # default seeds of every variant
    launcher: null                # e.g. "torchrun --nproc_per_node 8 -m" (default: this Python, -m)
    set: {training.steps: 200}    # overrides of every run (dotted keys, as ``--set``)
    sizes:                        # optional (default: one size named "default")
      d128: {set: {model.d_model: 128}, ff: {sigma_moe: {n_experts: 32}}}
      big: {variants: [sigma_moe, dense], seeds: [0, 1]}  # only these variants here, these seeds
    variants:
      sigma_moe: {ff: {kind: sigma_moe, n_experts: 16, expert_size: 64, k: 4}, seeds: [0, 1]}
      dense: {ff: {kind: dense, d_ff: auto}}
      pkm: {ff: {kind: pkm, n_keys: auto}, set: {optimizer.lr: 1.0e-3}}

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
import dataclasses
import hashlib
import json
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sigma_moe.launch.config import (
    ConfigError,
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
class VariantSpec:
    ff: dict  # a feedforward config mapping; at most one field "auto"
    seeds: list[int] | None = None  # None: the spec's seeds
    set: dict = field(default_factory=dict)  # overrides of this variant's runs


@dataclass
class SizeSpec:
    set: dict = field(default_factory=dict)  # overrides of this size's runs
    ff: dict = field(default_factory=dict)  # variant name -> feedforward fields for this size
    variants: list[str] | None = None  # the variants run at this size (None: all)
    seeds: list[int] | None = None  # the seeds of every variant at this size (None: the variant's)


@dataclass
class CompareSpec:
    path: Path  # the spec file (relative paths in it are relative to its folder)
    config: Path
    variants: dict[str, VariantSpec]
    match: str
    out: str = "runs/compare"
    seeds: list[int] = field(default_factory=lambda: [0])
    sizes: dict[str, SizeSpec] = field(default_factory=lambda: {DEFAULT_SIZE: SizeSpec()})
    set: dict = field(default_factory=dict)
    launcher: str | None = None
    baseline: str | None = None  # the variant the report's gap table is relative to


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid, resolved."""

    size: str
    variant: str
    seed: int
    run_dir: Path
    cfg: RunConfig
    params: int  # whole model
    ff_params: int  # one feedforward layer
    mlp_flops: int  # per token, summed over layers
    dense_mlp_flops: int  # per token, of the parameter-equal dense model (for the FLOPs fraction)
    target_params: int  # the match variant's whole-model count at this size

    @property
    def key(self) -> str:
        return f"{self.size}/{self.variant}/seed{self.seed}"

    def fingerprint(self) -> str:
        """Hash of what the run computes (paths and console settings excluded): a finished run of
        another config in the same folder is an error, not a silent reuse."""
        return hashlib.sha256(json.dumps(self.computed_config(), sort_keys=True).encode()).hexdigest()[:16]

    def computed_config(self) -> dict:
        """The config minus what does not change the numbers (logging, the checkpoint folder)."""
        d = config_to_dict(self.cfg)
        d.pop("logging", None)
        d["checkpoint"].pop("dir", None)
        return d

    def same_as_saved(self, saved: dict) -> bool:
        """True if ``saved`` (the run.yaml of a run finished by an older sigma-moe, whose fingerprint
        covered the fields of its time) computes the same: every key it has equals this config's, and
        the keys added since hold the value the older code implied (their default)."""
        new, old = _flat(self.computed_config()), _flat({k: v for k, v in saved.items() if k != "logging"})
        old.pop("checkpoint.dir", None)
        defaults = _field_defaults(self.cfg)
        return all(k in new and new[k] == v for k, v in old.items()) and all(
            k in old or (k in defaults and defaults[k] == v) for k, v in new.items()
        )


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "ff":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _field_defaults(obj: Any, prefix: str = "") -> dict:
    """Dotted key -> the default of every dataclass field of ``obj`` that has one (nested configs
    recursed into, as ``obj`` holds them)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and f.name != "ff":
            out.update(_field_defaults(value, f"{prefix}{f.name}."))
        elif f.default is not dataclasses.MISSING:
            out[f"{prefix}{f.name}"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f"{prefix}{f.name}"] = f.default_factory()
    return out


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
    where = f"{path}"
    _mapping(raw, where, "the spec")
    _keys(raw, CompareSpec, where, "", exclude={"path"})
    for key in ("config", "variants", "match"):
        if key not in raw:
            raise ConfigError(f"{where}: missing key {key!r}; see configs/compare/README.md for the format")
    config = path.parent / _typed(raw["config"], str, where, "config")
    if not config.is_file():
        raise ConfigError(f"{where}: config: {config} does not exist (paths are relative to the spec's folder)")
    variants_raw = _mapping(raw["variants"], where, "variants")
    if not variants_raw:
        raise ConfigError(f"{where}: variants: name at least one variant")
    variants = {}
    for name, v in variants_raw.items():
        key = f"variants.{name}"
        _name(name, where, key)
        _mapping(v, where, key)
        _keys(v, VariantSpec, where, key)
        if "ff" not in v:
            raise ConfigError(
                f"{where}: {key}: missing 'ff' (the feedforward config, e.g. {{kind: dense, d_ff: auto}})"
            )
        ff = dict(_mapping(v["ff"], where, f"{key}.ff"))
        if "kind" not in ff:
            raise ConfigError(f"{where}: {key}.ff: missing 'kind'")
        seeds = _seeds(v["seeds"], where, f"{key}.seeds") if "seeds" in v else None
        variants[name] = VariantSpec(ff=ff, seeds=seeds, set=_overrides(v.get("set", {}), where, f"{key}.set"))
    match = _typed(raw["match"], str, where, "match")
    if match not in variants:
        raise ConfigError(f"{where}: match: {match!r} is not a variant; choose one of {sorted(variants)}")
    sizes = {DEFAULT_SIZE: SizeSpec()}
    if "sizes" in raw:
        sizes = {}
        for name, s in _mapping(raw["sizes"], where, "sizes").items():
            key = f"sizes.{name}"
            _name(name, where, key)
            s = _mapping(s if s is not None else {}, where, key)
            _keys(s, SizeSpec, where, key)
            ff = _mapping(s.get("ff", {}), where, f"{key}.ff")
            for vname, fields in ff.items():
                if vname not in variants:
                    raise ConfigError(f"{where}: {key}.ff.{vname}: not a variant; choose one of {sorted(variants)}")
                _mapping(fields, where, f"{key}.ff.{vname}")
            only = s.get("variants")
            if only is not None:
                if not isinstance(only, list) or not only or any(v not in variants for v in only):
                    raise ConfigError(
                        f"{where}: {key}.variants: expected a non-empty list of variant names "
                        f"from {sorted(variants)}, got {only!r}"
                    )
                only = list(dict.fromkeys(only))
            seeds = _seeds(s["seeds"], where, f"{key}.seeds") if "seeds" in s else None
            sizes[name] = SizeSpec(
                set=_overrides(s.get("set", {}), where, f"{key}.set"), ff=dict(ff), variants=only, seeds=seeds
            )
        if not sizes:
            raise ConfigError(f"{where}: sizes: name at least one size, or leave 'sizes' out")
    if variants[match].ff and any(v == AUTO for v in variants[match].ff.values()):
        raise ConfigError(
            f"{where}: variants.{match}: the match variant sets the parameter budget; it cannot have an 'auto' field"
        )
    baseline = raw.get("baseline")
    if baseline is not None and baseline not in variants:
        raise ConfigError(f"{where}: baseline: {baseline!r} is not a variant; choose one of {sorted(variants)}")
    launcher = raw.get("launcher")
    if launcher is not None:
        _typed(launcher, str, where, "launcher")
    return CompareSpec(
        path=path,
        config=config,
        variants=variants,
        match=match,
        out=_typed(raw.get("out", "runs/compare"), str, where, "out"),
        seeds=_seeds(raw.get("seeds", [0]), where, "seeds"),
        sizes=sizes,
        set=_overrides(raw.get("set", {}), where, "set"),
        launcher=launcher,
        baseline=baseline,
    )


def _mapping(v: Any, where: str, key: str) -> dict:
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: {key}: expected a mapping, got {v!r}")
    return v


def _keys(d: dict, cls: type, where: str, key: str, exclude: set[str] = frozenset()) -> None:
    valid = sorted(f.name for f in dataclasses.fields(cls) if f.name not in exclude)
    unknown = sorted(str(k) for k in d if k not in valid)
    if unknown:
        at = f"{key}: " if key else ""
        raise ConfigError(f"{where}: {at}unknown key(s) {unknown}; valid keys: {valid}")


def _typed(v: Any, tp: type, where: str, key: str) -> Any:
    if not isinstance(v, tp) or isinstance(v, bool):
        raise ConfigError(f"{where}: {key}: expected a {tp.__name__}, got {v!r}")
    return v


def _name(name: Any, where: str, key: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ConfigError(f"{where}: {key}: names become folder names; use letters, digits, '-' or '_'")


def _seeds(v: Any, where: str, key: str) -> list[int]:
    if not isinstance(v, list) or not v or not all(isinstance(s, int) and not isinstance(s, bool) for s in v):
        raise ConfigError(f"{where}: {key}: expected a non-empty list of integers, got {v!r}")
    if len(set(v)) != len(v):
        raise ConfigError(f"{where}: {key}: seeds repeat: {v!r}")
    return list(v)


def _overrides(v: Any, where: str, key: str) -> dict:
    """``{dotted.key: value}`` -> the same; the values stay YAML values (no string parsing)."""
    _mapping(v, where, key)
    for k in v:
        if not isinstance(k, str) or not k or any(not p for p in k.split(".")):
            raise ConfigError(f"{where}: {key}: {k!r} is not a dotted config key (e.g. training.steps)")
    return dict(v)


# ---------------------------------------------------------------------------------------------------
# The grid


def expand_grid(
    spec: CompareSpec, out: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> list[RunSpec]:
    """Every (size, variant, seed) of the spec, in that order, resolved and sized. ``overrides``
    (``KEY=VALUE`` strings, as ``--set``) apply to every run after the spec's own."""
    out_dir = Path(out if out is not None else spec.out)
    base = load_yaml_with_bases(spec.config)
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
