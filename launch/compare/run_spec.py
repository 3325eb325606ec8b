"""One run of a comparison grid, resolved (:func:`~sigma_moe.launch.compare.spec.expand_grid` makes
them): its config and sizes, and its fingerprint, which tells a finished run of the same config (reused)
from one of another (an error)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sigma_moe.launch.config import RunConfig, config_to_dict


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
