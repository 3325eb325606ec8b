"""The one validation style of every config dataclass (model, feedforward variants and run sections).

A config dataclass derives from :class:`Checked`, whose ``__post_init__`` runs ``c = Checks.of(self)``
(field types from the annotations; an int where a float is meant becomes a float, a list where a
tuple is meant a tuple; a ``kind`` field must keep its default), then the class's ``check(c)`` (its
range and combination checks), then ``c.done()``, which raises one :class:`ConfigError` holding every
problem found. A problem names its key and the fix.
Built directly, a key reads ``SigmaMoEConfig.k``; the YAML loader re-roots it at the section's path
(``model.ff.k``, :meth:`ConfigError.under`) and reports the problems of every section together.

Type problems stop the checks at once (the range checks assume the types), the others are collected.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal


class ConfigError(ValueError, TypeError):
    """A config problem; the message names the key (``a.b.c``) and the fix.

    ``problems``: ``(key, text)`` pairs, the key relative to ``root`` ("" for the config as a whole),
    rendered ``root.key: text`` (or ``root.key = value: text``). A ValueError and a TypeError, so the
    callers of a config class that catch either (a wrong value, a wrong type) catch it."""

    def __init__(self, problems: str | Sequence[tuple[str, str]], root: str = "") -> None:
        self.problems = [("", problems)] if isinstance(problems, str) else list(problems)
        self.root = root
        super().__init__(self._message())

    def lines(self) -> list[str]:
        return [_render(_join(self.root, key), text) for key, text in self.problems]

    def under(self, path: str) -> ConfigError:
        """The same problems with their keys under the key path ``path`` instead of the class name."""
        return ConfigError([(_join(path, key), text) for key, text in self.problems])

    def _message(self) -> str:
        lines = self.lines()
        return lines[0] if len(lines) == 1 else "invalid config:\n" + "\n".join(f"  - {p}" for p in lines)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else path or str(name)


def _render(key: str, text: str) -> str:
    if not key:
        return text
    return f"{key} {text}" if text.startswith("= ") else f"{key}: {text}"


class Checks:
    """The problems of one config object, collected by its ``__post_init__``."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.problems: list[tuple[str, str]] = []

    @classmethod
    def of(cls, cfg: Any) -> Checks:
        """Check (and normalise) every field's type; raise at once if one is wrong, else return the
        collector for the range checks."""
        c = cls(cfg)
        hints = typing.get_type_hints(type(cfg))
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            try:
                converted = convert(hints[f.name], value)
            except _WrongType as e:
                c.add(f.name, str(e))
                continue
            if converted is not value:
                object.__setattr__(cfg, f.name, converted)  # frozen configs too
            if f.name == "kind" and f.default is not dataclasses.MISSING and value != f.default:
                c.add("kind", f"{type(cfg).__name__} is the config of {f.default!r}, got {value!r}")
        c.done()
        return c

    def add(self, field: str, text: str) -> None:
        """A problem of ``field`` (dotted below this config; "" for the config itself): what and the fix."""
        self.problems.append((field, text))

    def require(self, ok: bool, field: str, problem: str) -> None:
        """``field = value: problem`` unless ``ok``."""
        if not ok:
            self.problems.append((field, f"= {getattr(self.cfg, field)!r}: {problem}"))

    def positive(self, *fields: str) -> None:
        for f in fields:
            self.require(getattr(self.cfg, f) > 0, f, "must be > 0")

    def probability(self, *fields: str) -> None:
        """Dropout-like rates: 0 <= p < 1."""
        for f in fields:
            self.require(0.0 <= getattr(self.cfg, f) < 1.0, f, "must lie in [0, 1)")

    def choice(self, field: str, choices: Sequence[str]) -> None:
        self.require(getattr(self.cfg, field) in choices, field, f"choose one of {list(choices)}")

    def done(self) -> None:
        if self.problems:
            raise ConfigError(self.problems, root=type(self.cfg).__name__)


class Checked:
    """Base of the config dataclasses: checked when built (types, then ``check``), every problem at once."""

    def __post_init__(self) -> None:
        c = Checks.of(self)
        self.check(c)
        c.done()

    def check(self, c: Checks) -> None:
        """Add the range and combination problems of the fields to ``c`` (the types are right)."""


class _WrongType(Exception):
    pass


def convert(tp: Any, value: Any) -> Any:
    """``value`` checked against the annotation ``tp`` (int -> float, list -> tuple where meant);
    raises :class:`_WrongType` saying what was expected."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return convert(arg, value)
                except _WrongType:
                    continue
        raise _WrongType(f"expected {type_name(tp)}, got {_got(value)}")
    if origin is Literal:
        if value not in args:
            raise _WrongType(f"{value!r} is not allowed; choose one of {list(args)}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, tp):
            raise _WrongType(f"expected a {tp.__name__} (a mapping in YAML), got {_got(value)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _WrongType(f"expected a list ({type_name(tp)}), got {_got(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _WrongType(f"expected {len(args)} values ({type_name(tp)}), got {len(value)}: {value!r}")
            items = [convert(a, v) for a, v in zip(args, value)]
        else:
            items = [convert(args[0] if args else Any, v) for v in value]
        out = tuple(items) if origin is tuple else items
        return value if type(value) is type(out) and all(a is b for a, b in zip(items, value)) else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _WrongType(f"expected a mapping, got {_got(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _WrongType(f"expected true or false, got {_got(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            hint = " (write it without a decimal point)" if isinstance(value, float) and value.is_integer() else ""
            raise _WrongType(f"expected an integer, got {_got(value)}{hint}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = (
                " (YAML 1.1 reads 1e-3 as a string; write 1.0e-3)"
                if isinstance(value, str) and _reads_as_float(value)
                else ""
            )
            raise _WrongType(f"expected a number, got {_got(value)}{hint}")
        if not math.isfinite(value):  # .inf and .nan are YAML numbers, and no setting means them
            raise _WrongType(f"must be a finite number, got {value!r}")
        return float(value) if type(value) is not float else value
    if tp is str:
        if not isinstance(value, str):
            raise _WrongType(f"expected a string, got {_got(value)} (quote it in YAML)")
        return value
    if isinstance(tp, type):  # a config base class (the feedforward configs' FeedForwardConfig)
        if not isinstance(value, tp):
            raise _WrongType(f"expected a {tp.__name__}, got {_got(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r}")  # a programming error in a config class


def type_name(tp: Any) -> str:
    """``int``, ``float or None``, ``tuple[float, float]``, ``one of ['a', 'b']``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin is Literal:
        return f"one of {list(args)}"
    return getattr(tp, "__name__", None) if origin is None else str(tp).replace("typing.", "")


def _reads_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _got(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"
