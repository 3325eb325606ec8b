"""What one real training step costs a rank, measured on the CPU, for comparing with ``sigma-moe plan``
(tests/launch/test_plan.py). ``measure_step(rank, world_size, run_dir, *overrides)`` runs under
``ranks.run_ranks``: the tiny config through the run's own session (world, data, memory check, model,
expert parallelism, DeepSpeed engine) and two of its training steps (FLOPs counted in the first,
which also creates the optimizer state; the rest measured in the second):

    a2a_bytes         the exchange meters of this rank's expert-parallel layers (what TensorBoard logs)
    flops             torch.utils.flop_counter.FlopCounterMode over the forward and backward
    weights, gradients, optimizer state   the bytes of the tensors the engine holds
    saved_activations the tensors autograd keeps for backward (unique storages, parameters excluded)
    rss_peak_delta    the growth of the process's peak resident memory during the step

What a CPU measurement cannot see: a GPU allocator's fragmentation and caching, the CUDA context and
NCCL's buffers, SDPA's fused GPU kernels; RSS also moves with glibc's heap and the Python objects.
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from launch_helpers import tiny_config


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _step(s, sampler, out: dict, *, count_flops: bool) -> None:
    engine = s.engine
    x, y = sampler.next_batch()
    params = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    # FLOPs through SDPA's math kernel: FlopCounterMode has no formula for the CPU's fused one (the
    # same FLOPs), whose O(T) memory the other step measures
    counting = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
    kernel = sdpa_kernel(SDPBackend.MATH) if count_flops else contextlib.nullcontext()
    with counting, kernel:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            output = engine(x)
            logits, aux = output.logits, output.aux_loss
            ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        engine.backward(ce + aux)
    if count_flops:
        out["flops"] = counting.get_total_flops()
    else:
        out["saved_activations"] = sum(saved.values())
        out["gradients"] = _tensor_bytes(p.grad for p in engine.module.parameters())
    engine.step()


def measure_step(rank: int, world_size: int, run_dir: str, *overrides: str) -> dict:
    from sigma_moe.distributed.exchange_stats import exchange_meters
    from sigma_moe.launch.session import start_session
    from sigma_moe.launch.train import _sampler

    cfg = tiny_config(Path(run_dir) / f"rank{rank}", *overrides)
    s = start_session(cfg)
    sampler = _sampler(cfg, s)
    meters = exchange_meters(s.engine.module.feedforward_layers())
    out: dict = {}
    _step(s, sampler, out, count_flops=True)  # also creates AdamW's moments
    before = sum(m.totals().bytes_sent for m in meters)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _step(s, sampler, out, count_flops=False)
    out["rss_peak_delta"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) * 1024
    out["a2a_bytes"] = sum(m.totals().bytes_sent for m in meters) - before
    out["weights"] = _tensor_bytes(s.engine.module.parameters())
    optimizer = getattr(s.engine.optimizer, "optimizer", s.engine.optimizer)
    out["optimizer state"] = sum(_tensor_bytes(state.values()) for state in optimizer.state.values())
    s.close()
    return out
