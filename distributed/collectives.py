"""Every torch.distributed collective of the package, on the device its process group serves.

NCCL moves CUDA tensors only ("No backend type associated with device type cpu" for a CPU one); gloo,
MPI and oneCCL move CPU tensors. Monitoring and evaluation sums are small CPU tensors, model tensors
live on the model's device: each call here moves its tensor to a device the group's backend serves
(only when it is not on one already), runs the collective there and copies the result back in place.
A test checks that no other module of the package calls a ``torch.distributed`` collective itself.

    all_reduce_(t, op=, group=)                       in place, like dist.all_reduce
    all_to_all_single_(out, x, out_splits, in_splits, group=)   fills out, like dist.all_to_all_single
    barrier(group=)
    world_all_reduce_(t, op=)                         over the default group; a no-op in one process
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# device type each backend moves (DeepSpeed's accelerators: CUDA/ROCm nccl, Intel XPU xccl, Gaudi hccl)
_BACKEND_DEVICE = {"nccl": "cuda", "xccl": "xpu", "hccl": "hpu", "gloo": "cpu", "mpi": "cpu", "ccl": "cpu"}


def backend_device_types(backend: str) -> tuple[str, ...]:
    """Device types a process group of ``backend`` serves, preferred first. ``backend`` is what
    ``dist.get_backend`` returns: one name (``"nccl"``), or a device map (``"cpu:gloo,cuda:nccl"``)."""
    backend = str(backend).lower()
    if ":" in backend:
        return tuple(part.split(":", 1)[0].strip() for part in backend.split(","))
    if backend not in _BACKEND_DEVICE:
        raise ValueError(
            f"process-group backend {backend!r}: unknown device for its collectives; known: {sorted(_BACKEND_DEVICE)}"
        )
    return (_BACKEND_DEVICE[backend],)


def collective_device(tensor_device: torch.device, backend: str) -> torch.device:
    """Where a tensor on ``tensor_device`` must be for a collective of ``backend``: where it is when the
    backend serves that device type, else the backend's device (an accelerator: its current device,
    which ``init_world`` set to the local rank's)."""
    served = backend_device_types(backend)
    if tensor_device.type in served:
        return tensor_device
    return torch.device(served[0])


def _on_group_device(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return t.to(collective_device(t.device, dist.get_backend(group)))


def all_reduce_(t: torch.Tensor, *, op=dist.ReduceOp.SUM, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``dist.all_reduce`` of ``t`` in place, wherever ``t`` lives; returns ``t``."""
    work = _on_group_device(t, group)
    dist.all_reduce(work, op=op, group=group)
    if work is not t:
        t.copy_(work)
    return t


def all_to_all_single_(
    out: torch.Tensor,
    x: torch.Tensor,
    output_splits: list[int] | None = None,
    input_splits: list[int] | None = None,
    *,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """``dist.all_to_all_single(out, x, ...)`` wherever ``out`` and ``x`` live; returns ``out``."""
    x_work, out_work = _on_group_device(x, group), _on_group_device(out, group)
    dist.all_to_all_single(out_work, x_work, output_splits, input_splits, group=group)
    if out_work is not out:
        out.copy_(out_work)
    return out


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """``dist.barrier``; on NCCL with the current device named, so it never guesses one (which can hang)."""
    device = torch.device(backend_device_types(dist.get_backend(group))[0])
    if device.type == "cuda":
        dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier(group=group)


def is_multiprocess() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_all_reduce_(t: torch.Tensor, *, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce over every rank of the job in place (nothing to do in a single process); returns ``t``."""
    return all_reduce_(t, op=op) if is_multiprocess() else t


def world_barrier() -> None:
    if is_multiprocess():
        barrier()
