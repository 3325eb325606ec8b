"""Model sizes for comparisons at equal parameter count: parameters, MLP FLOPs, parity d_ff.

MLP FLOPs follow the paper: multiply-adds × 2 of one token's forward pass through the feedforward
block (biases, activations and sorting not counted), e.g. dense 2·2·d·d_ff and σ-MoE
K·G·d·2·2 + N_E·d·2 (the selector). For a whole model they are summed over its feedforward layers.
"""

from __future__ import annotations

import torch
from torch import nn

from .feedforward import FeedForward, build_feedforward


def count_parameters(module: nn.Module) -> int:
    """Number of distinct parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())


def mlp_flops_per_token(model_or_ff: nn.Module) -> int:
    """One feedforward layer's MLP FLOPs per token, or the sum over a model's feedforward layers."""
    if isinstance(model_or_ff, FeedForward):
        return model_or_ff.mlp_flops_per_token()
    layers = [m for m in model_or_ff.modules() if isinstance(m, FeedForward)]
    if not layers:
        raise ValueError(f"{type(model_or_ff).__name__} contains no FeedForward layer")
    return sum(ff.mlp_flops_per_token() for ff in layers)


def feedforward_parameter_count(ff_cfg, d_model: int) -> int:
    """Parameters of one feedforward layer built from ``ff_cfg`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        ff = build_feedforward(ff_cfg, d_model=d_model, n_layers=1)
    return count_parameters(ff)


def parameter_equal_dense_d_ff(ff_cfg, d_model: int) -> int:
    """The dense d_ff (with biases) whose layer has as many parameters as ``ff_cfg``'s, rounded to the
    nearest: a dense layer has d_ff·(2d + 1) + d. σ-MoE 16 × 128 at d = 412 gives the paper's 2053."""
    n = feedforward_parameter_count(ff_cfg, d_model)
    return round((n - d_model) / (2 * d_model + 1))


AUTO = "auto"
_MAX_SIZE = 2**31


def solve_parameter_equal(ff: dict, d_model: int, target: int) -> tuple[object, int]:
    """Fill the one field of ``ff`` (a feedforward config mapping) whose value is ``"auto"`` with the
    positive integer that brings one layer's parameter count nearest to ``target``; returns (the config
    dataclass, its parameter count).

    Works for any field the count grows with (dense / Top-K ``d_ff``, PKM ``n_keys``, ``n_experts``,
    ``expert_size``): the smallest value reaching ``target`` is found by doubling then bisection (each
    count is a model built on the meta device), then it or the value below, whichever is nearer. Values
    a variant rejects (``k > d_ff``, ``knn > n_keys``) count as too small. Granularity: dense d_ff moves
    the count by 2d + 1, PKM n_keys by about 2·n_keys·d (so PKM lands within half a step, not 0.1%).
    """
    from .feedforward import feedforward_config_from_dict

    auto = [k for k, v in ff.items() if v == AUTO]
    if len(auto) != 1:
        raise ValueError(
            f"feedforward {ff.get('kind')!r}: exactly one field may be {AUTO!r} "
            f"(the one solved for equal parameters), got {auto or 'none'}"
        )
    name = auto[0]
    if target <= 0:
        raise ValueError(f"target parameter count must be positive, got {target}")
    errors: list[str] = []

    def count(v: int) -> int | None:
        try:
            cfg = feedforward_config_from_dict({**ff, name: v})
            return feedforward_parameter_count(cfg, d_model)
        except (ValueError, TypeError) as e:
            errors.append(str(e))
            return None

    hi = 1
    while (c := count(hi)) is None or c < target:
        hi *= 2
        if hi > _MAX_SIZE:
            why = f"; last error: {errors[-1]}" if errors else ""
            raise ValueError(
                f"feedforward {ff.get('kind')!r}: no {name} up to {_MAX_SIZE} reaches {target:,} parameters{why}"
            )
    lo = hi // 2  # count(lo) < target or invalid (or lo == 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        c = count(mid)
        if c is not None and c >= target:
            hi = mid
        else:
            lo = mid
    best = hi
    below = count(hi - 1) if hi > 1 else None
    if below is not None and target - below < count(hi) - target:
        best = hi - 1
    cfg = feedforward_config_from_dict({**ff, name: best})
    return cfg, feedforward_parameter_count(cfg, d_model)
