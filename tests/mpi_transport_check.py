"""Run by test_mpi_transport.py under ``mpirun -np 4``: the expert all-to-all over MPI equals the same
all-to-all over torch.distributed (gloo), forward and backward, on EP groups of 2 and of 4, with
uneven splits, zero rows to and from some ranks, fp32 and bf16. Prints one OK line per rank."""

from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist

from sigma_moe.distributed import all_to_all
from sigma_moe.distributed.mpi_all_to_all import MPIAllToAll


def splits(src: int, size: int, seed: int) -> list[int]:
    """Rows EP rank ``src`` sends to each EP rank: uneven, with zeros."""
    g = torch.Generator().manual_seed(seed * 100 + src)
    out = torch.randint(0, 4, (size,), generator=g)
    out[(src + seed) % size] = 0
    return out.tolist()


def check(group: dist.ProcessGroup, transport: MPIAllToAll, seed: int, dtype: torch.dtype) -> None:
    size, me = dist.get_world_size(group), dist.get_rank(group)
    send = splits(me, size, seed)
    recv = [splits(src, size, seed)[me] for src in range(size)]
    x = torch.randn(sum(send), 3, 5, generator=torch.Generator().manual_seed(seed + 7 * dist.get_rank())).to(dtype)
    results = []
    for t in (None, transport):
        leaf = x.clone().requires_grad_()
        y = all_to_all(leaf, output_splits=recv, input_splits=send, group=group, transport=t)
        (y.float() * torch.arange(1.0, y.numel() + 1).view_as(y)).sum().backward()
        results.append((y.detach(), leaf.grad))
    (y_torch, g_torch), (y_mpi, g_mpi) = results
    assert torch.equal(y_torch, y_mpi), f"rank {dist.get_rank()}: forward differs"
    assert torch.equal(g_torch, g_mpi), f"rank {dist.get_rank()}: backward differs"


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=True, verbose=False)
    world, rank = dist.get_world_size(), dist.get_rank()
    for ep in (2, world):
        groups = [dist.new_group(list(range(s, s + ep))) for s in range(0, world, ep)]  # every rank creates all
        group = groups[rank // ep]
        transport = MPIAllToAll(group)
        assert transport.comm.Get_size() == ep and transport.comm.Get_rank() == rank % ep
        for seed, dtype in ((0, torch.float32), (1, torch.float32), (2, torch.bfloat16)):
            check(group, transport, seed, dtype)
    print(f"OK rank {rank} of {world}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
