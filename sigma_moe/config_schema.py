"""Config dataclasses read as a schema: built from a mapping (a YAML section), and listed key by key with
type, default and documentation (``sigma-moe config``).

:func:`build_config` turns ``{"k": 2, ...}`` into ``cls(k=2, ...)``: unknown keys (with the nearest valid
one), missing required keys and every nested dataclass (built the same way) are reported together, each
under its key path; the values themselves are checked by each class's ``__post_init__``
(``config_check.py``). A field typed with a config base class that has ``for_kind`` (the feedforward
configs' ``FeedForwardConfig``) takes the class its mapping's ``kind`` names.

Field documentation is the string literal under a field (a field docstring, as torchtitan writes its
config): :func:`field_docs` reads them from the class source.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import typing
from collections.abc import Iterator
from typing import Any

from sigma_moe.config_check import ConfigError, type_name


def build_config(cls: type, data: Any, path: str = "") -> Any:
    """``cls`` built from the mapping ``data`` (the key path ``path`` names it in errors)."""
    where = path or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    problems = []
    for k in data:
        if k not in fields:
            close = difflib.get_close_matches(str(k), fields, n=1)
            hint = f" (did you mean {_join(path, close[0])!r}?)" if close else ""
            problems.append(("", f"unknown key {_join(path, k)!r}{hint}; valid keys of {where}: {sorted(fields)}"))
    missing = [n for n, f in fields.items() if n not in data and _required(f)]
    if missing:
        problems.append(("", f"{where}: missing required key(s) {[_join(path, m) for m in missing]}; add them"))
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            continue
        try:
            kwargs[name] = _field_value(hints[name], value, _join(path, name))
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.under(path) from None


def _field_value(tp: Any, value: Any, key: str) -> Any:
    """Nested configs are built; text YAML 1.1 reads for a number (``1e-3``) becomes that number."""
    for arg in _union(tp):
        if hasattr(arg, "for_kind"):  # the class is the one the mapping's kind names
            if not isinstance(value, dict) or "kind" not in value:
                raise ConfigError(f"{key}: expected a mapping with a 'kind' (one of {arg.kinds()}), got {value!r}")
            try:
                cls = arg.for_kind(value["kind"])
            except ValueError as e:
                raise ConfigError(f"{key}.kind: {e}") from None
            return build_config(cls, value, key)
        if isinstance(arg, type) and dataclasses.is_dataclass(arg) and isinstance(value, dict):
            return build_config(arg, value, key)
        if _named_configs(arg) and isinstance(value, dict):
            return _build_named(_named_configs(arg), value, key)
    if isinstance(value, str) and float in _union(tp):
        try:
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as text
        except ValueError:
            pass
    return value


def _named_configs(tp: Any) -> type | None:
    """The config class of a ``dict[str, SomeConfig]`` field (named entries, e.g. a spec's variants)."""
    args = typing.get_args(tp) if typing.get_origin(tp) is dict else ()
    return args[1] if len(args) == 2 and dataclasses.is_dataclass(args[1]) else None


def _build_named(cls: type, data: dict, key: str) -> dict:
    """``{name: mapping}`` -> ``{name: cls(...)}``, every entry's problems together under ``key.name``."""
    out, problems = {}, []
    for name, value in data.items():
        try:
            out[name] = build_config(cls, value, _join(key, name))
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    return out


def _union(tp: Any) -> tuple:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, type(int | None)) else (tp,)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else str(name)


# ---------------------------------------------------------------------------------------------------
# Documentation


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    key: str  # dotted path, e.g. model.ff.k
    type: str
    default: str  # "(required)" when there is none
    doc: str
    when: str = ""  # e.g. "kind: sigma_moe": the key belongs to that variant


def config_keys(cls: type, path: str = "", when: str = "") -> Iterator[ConfigKey]:
    """Every key of ``cls`` and its nested configs, in field order; a field whose class is chosen by
    ``kind`` lists the keys of each registered kind (``when``: ``kind: name``)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init or (when and f.name == "kind"):
            continue
        key, tp = _join(path, f.name), hints[f.name]
        if hasattr(tp, "for_kind"):
            yield ConfigKey(f"{key}.kind", f"one of {tp.kinds()}", _default(f), docs.get(f.name, ""))
            for kind in tp.kinds():
                yield from config_keys(tp.for_kind(kind), key, f"kind: {kind}")
        elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
            yield from config_keys(tp, key, when)
        else:
            yield ConfigKey(key, type_name(tp), _default(f), docs.get(f.name, ""), when)


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return "null" if f.default is None else repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return "" if dataclasses.is_dataclass(value) else repr(value)
    return "(required)"


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal written under it in the class body (its base classes' too)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


@functools.cache
def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):  # no source (a frozen build): no documentation
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs
