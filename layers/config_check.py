"""Validation shared by the layer config dataclasses: types from the annotations, ranges, choices.

Every check raises with the config class and field name in the message, so a bad YAML key is found
without reading a traceback.
"""
from __future__ import annotations

import dataclasses
import types
import typing

_SCALARS = (bool, int, float, str)


def _allowed(hint) -> tuple[type, ...] | None:
    """The scalar types a field annotation allows (None: not a scalar field, not checked here)."""
    if hint in _SCALARS:
        return (hint,)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if all(a in _SCALARS or a is type(None) for a in args):
            return args
    return None


def check_types(cfg) -> None:
    """Check every scalar field against its annotation; an int given for a float is converted."""
    hints = typing.get_type_hints(type(cfg))
    name = type(cfg).__name__
    for f in dataclasses.fields(cfg):
        allowed = _allowed(hints[f.name])
        if allowed is None:
            continue
        value = getattr(cfg, f.name)
        if float in allowed and type(value) is int:
            setattr(cfg, f.name, float(value))
            continue
        # bool is an int subclass: only accept it where bool is meant.
        if any(type(value) is t for t in allowed):
            continue
        wanted = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
        hint = ""
        if float in allowed and isinstance(value, str):
            hint = " (YAML 1.1 reads 1e-3 as a string; write 1.0e-3)"
        raise TypeError(f"{name}.{f.name} must be {wanted}, got {type(value).__name__} {value!r}{hint}")


def require(cond: bool, cfg, field: str, problem: str) -> None:
    if not cond:
        raise ValueError(f"{type(cfg).__name__}.{field} = {getattr(cfg, field)!r}: {problem}")


def check_positive(cfg, *fields: str) -> None:
    for f in fields:
        require(getattr(cfg, f) > 0, cfg, f, "must be > 0")


def check_probability(cfg, *fields: str) -> None:
    """Dropout-like rates: 0 <= p < 1."""
    for f in fields:
        require(0.0 <= getattr(cfg, f) < 1.0, cfg, f, "must lie in [0, 1)")


def check_choice(cfg, field: str, choices: typing.Sequence[str]) -> None:
    require(getattr(cfg, field) in choices, cfg, field, f"choose one of {list(choices)}")


def check_kind(cfg, kind: str) -> None:
    require(cfg.kind == kind, cfg, "kind", f"{type(cfg).__name__} is the config of {kind!r}")
