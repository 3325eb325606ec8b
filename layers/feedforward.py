"""The one interface every feedforward variant implements, and the registry that builds them by name.

``forward(x[..., d_model]) -> y[..., d_model]``. Routed layers also leave, for the last forward only
(overwritten each call, never appended to), ``aux_loss`` (a scalar added to the LM loss) and
``routing`` (:class:`RoutingStats`, read by the monitor).

Each variant registers a config dataclass (a :class:`FeedForwardConfig`: its hyper-parameters, with a
``kind`` name) and the module class built from it: ``@register_feedforward("sigma_moe", SigmaMoEConfig)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn

from sigma_moe.config_check import Checked
from sigma_moe.config_schema import build_config


@dataclass(kw_only=True)
class FeedForwardConfig(Checked):
    """Base of every feedforward variant's config. In YAML, ``kind`` picks the variant (the registry's
    name) and the other keys are that variant's fields."""

    kind: str
    """The variant: a registered kind (``feedforward_kinds()``; ``sigma-moe config`` lists each one's keys)."""

    @classmethod
    def for_kind(cls, kind: str) -> type:
        return feedforward_config_class(kind)

    @classmethod
    def kinds(cls) -> list[str]:
        return feedforward_kinds()

    def describe(self) -> str:
        """The layer's size in a few words, for tables (the compare report); variants override it.
        This default lists every field but ``kind``."""
        return ", ".join(f"{f.name} {getattr(self, f.name)}" for f in fields(self) if f.name != "kind")


@dataclass
class RoutingStats:
    """Routing of the last forward of one routed layer (detached; local to this process)."""

    tokens_per_expert: torch.Tensor  # [n_experts] long: (token, slot) assignments per expert
    mean_probs: torch.Tensor  # [n_experts] this process's batch-mean selection distribution (softmax)
    n_tokens: int
    units_fired: torch.Tensor | None = None  # [E_loc, G] bool: hidden unit > 0 for some row here (if tracked)


class FeedForward(nn.Module):
    """Base class: subclasses implement ``forward`` and set ``aux_loss`` / ``routing`` when routed."""

    def __init__(self) -> None:
        super().__init__()
        self.aux_loss: torch.Tensor | None = None
        self.routing: RoutingStats | None = None

    def mlp_flops_per_token(self) -> int:
        """Multiply-adds × 2 of the feedforward per token, forward only (what the paper compares)."""
        raise NotImplementedError


@dataclass(frozen=True)
class _Entry:
    config_cls: type
    module_cls: Callable[..., FeedForward]


_REGISTRY: dict[str, _Entry] = {}


def register_feedforward(kind: str, config_cls: type):
    """Class decorator: register ``module_cls(cfg, *, d_model, n_layers)`` under ``kind``."""

    def wrap(module_cls):
        if kind in _REGISTRY:
            raise ValueError(f"feedforward kind {kind!r} registered twice")
        _REGISTRY[kind] = _Entry(config_cls, module_cls)
        return module_cls

    return wrap


def feedforward_kinds() -> list[str]:
    return sorted(_REGISTRY)


def feedforward_config_class(kind: str) -> type:
    if kind not in _REGISTRY:
        raise ValueError(_unknown(kind))
    return _REGISTRY[kind].config_cls


def _unknown(kind: str) -> str:
    return (
        f"unknown feedforward kind {kind!r}; choose one of {feedforward_kinds()} "
        "(a new variant registers when its module is imported in layers/__init__.py)"
    )


def build_feedforward(cfg, *, d_model: int, n_layers: int) -> FeedForward:
    """Build the variant named by ``cfg.kind`` from its config dataclass."""
    entry = _REGISTRY.get(cfg.kind)
    if entry is None:
        raise ValueError(_unknown(cfg.kind))
    if not isinstance(cfg, entry.config_cls):
        raise TypeError(f"feedforward {cfg.kind!r} needs a {entry.config_cls.__name__}, got {type(cfg).__name__}")
    return entry.module_cls(cfg, d_model=d_model, n_layers=n_layers)


def feedforward_config_from_dict(d: dict, path: str = "ff") -> FeedForwardConfig:
    """``{"kind": ..., **fields}`` -> that kind's config dataclass (``build_config``: unknown keys name
    the valid ones)."""
    if not isinstance(d, dict) or "kind" not in d:
        raise ValueError(f"{path}: expected a mapping with a 'kind' (one of {feedforward_kinds()}), got {d!r}")
    return build_config(feedforward_config_class(d["kind"]), d, path)
