"""CVMM: conditional vector-matrix multiply over expert-sorted rows (the σ-MoE expert matmuls)."""

from .backends import available_backends, get_backend, register_backend, resolve_backend_name
from .cvmm import cvmm, cvmm_combine
from .reference import cvmm_combine_reference, cvmm_reference
from .selection import ExpertSelection, count_per_expert, prepare_selection

__all__ = [
    "ExpertSelection",
    "available_backends",
    "count_per_expert",
    "cvmm",
    "cvmm_combine",
    "cvmm_combine_reference",
    "cvmm_reference",
    "get_backend",
    "prepare_selection",
    "register_backend",
    "resolve_backend_name",
]
