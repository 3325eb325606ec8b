"""CVMM backend registry and automatic choice (Triton on CUDA, the PyTorch path elsewhere).

A backend provides three primitives over an :class:`ExpertSelection` (R sorted rows):
- ``gather_mm(x, sel, w)``: ``out[r] = x[token(r)] @ w[expert(r)]`` -> [R, d_out]
- ``mm_scatter(h, sel, w, gates)``: ``out[token(r)] += gates[r] · h[r] @ w[expert(r)]`` -> [n_tokens, d_out]
- ``weight_grad(a, b, sel, a_is_tokens=, b_is_tokens=)``: ``grad[e] = Σ_{r of e} A[r]ᵀ B[r]`` -> [E, d_a, d_b]
The autograd Functions in ``cvmm.py`` build forward and backward from these alone.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Protocol

import torch

from .selection import ExpertSelection


class CVMMBackend(Protocol):
    name: str

    def gather_mm(self, x: torch.Tensor, sel: ExpertSelection, w: torch.Tensor) -> torch.Tensor: ...

    def mm_scatter(
        self, h: torch.Tensor, sel: ExpertSelection, w: torch.Tensor, gates: torch.Tensor | None
    ) -> torch.Tensor: ...

    def weight_grad(
        self, a: torch.Tensor, b: torch.Tensor, sel: ExpertSelection, *, a_is_tokens: bool, b_is_tokens: bool
    ) -> torch.Tensor: ...


_FACTORIES: dict[str, Callable[[], CVMMBackend]] = {}
_INSTANCES: dict[str, CVMMBackend] = {}

# "reference" is not a primitive backend: cvmm() routes it to reference.py directly.
BACKEND_NAMES = ("auto", "reference")


def register_backend(name: str, factory: Callable[[], CVMMBackend]) -> None:
    _FACTORIES[name] = factory


def available_backends() -> list[str]:
    return sorted(set(BACKEND_NAMES) | set(_FACTORIES))


def resolve_backend_name(name: str, device: torch.device) -> str:
    """Map "auto" to the best backend for ``device``; validate any other name."""
    if name == "auto":
        return "triton" if device.type == "cuda" and "triton" in _FACTORIES else "torch"
    if name not in available_backends():
        raise ValueError(f"unknown CVMM backend {name!r}; choose one of {available_backends()}")
    return name


def get_backend(name: str) -> CVMMBackend:
    if name not in _INSTANCES:
        if name not in _FACTORIES:
            raise ValueError(f"unknown CVMM backend {name!r}; choose one of {available_backends()}")
        _INSTANCES[name] = _FACTORIES[name]()
    return _INSTANCES[name]


def _triton_backend() -> CVMMBackend:
    # imported on first use: the kernels are decorated at import, and TRITON_INTERPRET must be read then
    from .triton_backend import TritonBackend

    return TritonBackend()


def _register_builtin() -> None:
    from .torch_backend import TorchBackend

    register_backend("torch", TorchBackend)
    if importlib.util.find_spec("triton") is not None:
        register_backend("triton", _triton_backend)


_register_builtin()
