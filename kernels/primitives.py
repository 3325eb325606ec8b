"""What a CVMM backend provides: three primitives over an :class:`ExpertSelection` (R sorted rows),
from which ``cvmm.py`` builds the autograd of both CVMM ops, and the combine's backward composed from
them (a backend may replace it with a fused pass).

- ``gather_mm(x, sel, w)``: ``out[r] = x[token(r)] @ w[expert(r)]`` -> [R, d_out]
- ``mm_scatter(h, sel, w, gates)``: ``out[token(r)] += gates[r] · h[r] @ w[expert(r)]`` -> [n_tokens, d_out]
- ``weight_grad(a, b, sel, a_is_tokens=, b_is_tokens=)``: ``grad[e] = Σ_{r of e} A[r]ᵀ B[r]`` -> [E, d_a, d_b]
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from .selection import ExpertSelection


class CVMMBackend(ABC):
    name: ClassVar[str]

    @abstractmethod
    def gather_mm(self, x: torch.Tensor, sel: ExpertSelection, w: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def mm_scatter(
        self, h: torch.Tensor, sel: ExpertSelection, w: torch.Tensor, gates: torch.Tensor | None
    ) -> torch.Tensor: ...

    @abstractmethod
    def weight_grad(
        self, a: torch.Tensor, b: torch.Tensor, sel: ExpertSelection, *, a_is_tokens: bool, b_is_tokens: bool
    ) -> torch.Tensor: ...

    def mm_scatter_backward(
        self,
        grad_out: torch.Tensor,
        h: torch.Tensor,
        w: torch.Tensor,
        gates: torch.Tensor | None,
        sel: ExpertSelection,
        *,
        need_h: bool,
        need_w: bool,
        need_gates: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(grad_h, grad_w, grad_gates) of ``mm_scatter``, None where not needed. With
        t[r] = grad_out[token(r)] @ w[e]ᵀ: grad_h = gates·t, grad_gates = <t, h>, grad_w from gates·h."""
        grad_h = grad_w = grad_gates = None
        if need_h or need_gates:  # t serves both the input and the gate gradient
            t = self.gather_mm(grad_out, sel, w.transpose(1, 2))
            if need_h:
                grad_h = t if gates is None else t * gates.unsqueeze(-1)
            if need_gates:
                grad_gates = (t * h).sum(-1)
        if need_w:
            a = h if gates is None else h * gates.unsqueeze(-1)
            grad_w = self.weight_grad(a, grad_out, sel, a_is_tokens=False, b_is_tokens=True)
        return grad_h, grad_w, grad_gates
