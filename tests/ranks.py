"""Run a function on W real processes (gloo, CPU) from inside a test, and collect what each rank returns.

``run_ranks(fn, world_size, *args, timeout=)`` spawns W processes; each calls
``deepspeed.init_distributed`` (gloo, a free local port), runs ``fn(rank, world_size, *args) -> dict``
and saves the dict; the parent returns the list of dicts in rank order. A worker's exception fails
the test with its traceback; a hang (a rank stuck in a collective) fails it after ``timeout`` seconds.
``fn`` must be a module-level function (the spawned processes import it by name).
"""

from __future__ import annotations

import datetime
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, collective_timeout: float, fn, args) -> None:
    import deepspeed
    import torch.distributed as dist

    torch.set_num_threads(1)  # W processes share the machine's cores
    deepspeed.init_distributed(
        dist_backend="gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=collective_timeout),
        verbose=False,
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():  # fn may have left the group itself
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0) -> list[dict]:
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _entry,
            args=(world_size, free_port(), out_dir, timeout / 2, fn, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} ranks of {fn.__name__} did not finish in {timeout:.0f} s")
        finally:
            for p in ctx.processes:  # only the processes started here
                if p.is_alive():
                    p.kill()
                    p.join()
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
