"""The process world: join (or start) the process group whatever launched this process, give each CPU
rank its share of the cores, keep DeepSpeed's JIT ops in this environment, leave the group at the end.
What launched the process is found in :mod:`sigma_moe.launch.world_env`.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from sigma_moe.distributed.deepspeed_compat import check_deepspeed_version, op_to_build_on_cpu
from sigma_moe.launch.config import DistributedConfig
from sigma_moe.launch.cpu_memory import keep_freed_memory
from sigma_moe.launch.world_env import check_one_job, detect_launch, launched_by_mpirun


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launched_by_mpirun: bool  # what distributed.transport: auto needs to know


def init_world(dist_cfg: DistributedConfig) -> World:
    """Start (or join) the process group, whatever launched this process: deepspeed, torchrun,
    mpirun, srun (with or without torchrun), or nothing (a bare single process gets rank 0 of 1 on a
    free local port). See :mod:`sigma_moe.launch.world_env`."""
    check_deepspeed_version()  # before any process group or op build
    launch = detect_launch(os.environ)
    mpirun = launched_by_mpirun(os.environ)  # before the launcher's variables are added
    check_one_job(launch)  # N copies of a job that should be one
    os.environ.update(launch.variables)
    build_ops_in_environment()
    accel = get_accelerator()
    if accel.device_name() == "cpu" and os.environ.get("LOCAL_RANK", "0") == "0":
        announce_op_build()
    deepspeed.init_distributed(
        dist_backend=accel.communication_backend_name(),
        auto_mpi_discovery=True,
        # under mpirun DeepSpeed sets MASTER_PORT to this (default 29500): let the environment choose it
        distributed_port=int(os.environ.get("MASTER_PORT", "29500")),
        timeout=datetime.timedelta(seconds=dist_cfg.timeout_s),
    )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accel.device_name() != "cpu":
        # srun --gpus-per-task shows each task only its own GPU: local rank 1 then has device 0
        index = local_rank % max(1, accel.device_count())
        accel.set_device(index)
        device = torch.device(accel.device_name(index))
    else:
        device = torch.device("cpu")
        share_cpu_threads()
        keep_freed_memory()
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device, mpirun)


def leave_world_after(status: int) -> int:
    """Leave the process group at the end of a process that ends with ``status``; returns it.

    Exiting with the group alive lets gloo's worker threads outlive the interpreter: a rank then aborts
    at exit now and then ("terminate called without an active exception") and the launcher reports
    the job as failed. After a failure the group is left alone: the other ranks may still be inside a
    collective, and tearing it down could hang them instead of letting them time out."""
    if status == 0 and dist.is_initialized():
        dist.destroy_process_group()
    return status


def local_world_size() -> int:
    """Ranks on this host (the launcher's variable), or the whole world when none says."""
    for var in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if var in os.environ:
            return int(os.environ[var])
    return dist.get_world_size()  # none of them set: assume one host


def share_cpu_threads() -> None:
    """Give each CPU rank its share of the cores unless OMP_NUM_THREADS says otherwise.

    Every rank otherwise starts one OpenMP thread per core; with more threads than cores the
    spinning threads of one rank steal the core another rank's collective waits on (measured: 5
    steps of the tiny config under the deepspeed launcher with 2 ranks took 92 s instead of 6 s)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world_size()))


def build_ops_in_environment() -> None:
    """DeepSpeed's JIT ops (the CPU shared-memory op) go into this environment's own folder unless
    ``TORCH_EXTENSIONS_DIR`` says otherwise. In the shared ``~/.cache/torch_extensions`` two
    environments (two clones, CI beside a checkout) rebuild each other's op at every start, since the
    build depends on the environment's paths, and a build killed midway leaves a lock that makes every
    later process wait forever."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    prefer_environment_ninja()


def announce_op_build() -> None:
    """Say so when DeepSpeed is about to compile its CPU op (the first run would sit silent for
    minutes), and what to do when a killed build left its lock (every later run would wait forever)."""
    todo = op_to_build_on_cpu()
    if todo is None:
        return
    op, folder = todo
    print(f"building DeepSpeed's CPU communication op {op} in {folder} (once per environment: 1-5 minutes)", flush=True)
    if (folder / "lock").exists():
        print(
            f"  another process holds its build lock {folder / 'lock'}: waiting for it; if no build is running "
            "(a killed one left the lock), stop this run, remove that file and start again",
            flush=True,
        )


def prefer_environment_ninja() -> None:
    """Build DeepSpeed's JIT ops (the CPU shared-memory op) with the ninja installed beside this Python.

    torch runs whichever ``ninja`` PATH finds first. A system ninja (1.11) and the venv's (1.13) hash
    commands differently in the shared ``.ninja_log``, so processes that alternate between them (a
    launcher in ``.venv/bin`` puts it on PATH, a bare ``python`` does not) rebuild the op every time
    (30-50 s each). Putting this interpreter's bin folder first makes every process agree."""
    bin_dir = Path(sys.executable).parent
    if (bin_dir / "ninja").is_file():
        path = os.environ.get("PATH", "")
        if path.split(os.pathsep)[0] != str(bin_dir):
            os.environ["PATH"] = os.pathsep.join([str(bin_dir), path]) if path else str(bin_dir)
