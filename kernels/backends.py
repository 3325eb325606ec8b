"""CVMM backend registry and automatic choice (Triton on CUDA, the PyTorch path elsewhere). What a
backend provides is in ``primitives.py``."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from .primitives import CVMMBackend

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
