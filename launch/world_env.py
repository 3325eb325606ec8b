"""What launched this process, mapped to the variables torch.distributed reads: ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``.

In order, the first that applies decides:

- ``RANK`` is set: torchrun or the deepspeed launcher (or the user) set everything; it wins over the
  scheduler's variables around it (``srun torchrun ...``).
- srun started this process as one task of a job step: SLURM's variables give the rank, the world
  (the step's tasks), the local rank and world, and rank 0's host (the first of the step's nodes);
  the port is derived from the job and step ids unless ``MASTER_PORT`` is set.
- mpirun (Open MPI, MPICH's hydra, MVAPICH) started it: DeepSpeed's MPI discovery (mpi4py) fills them.
- nothing: one process, rank 0 of 1, on a free local port.

A job scheduler that started N > 1 tasks, each of which forms a job of its own (``srun -n 2 torchrun
--nproc_per_node 1`` without rendezvous arguments), would train N copies into one run directory:
:func:`check_one_job` stops that with a message saying how to launch instead.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from sigma_moe.config_check import ConfigError

# Ports derived from SLURM job ids stay below Linux's ephemeral range (32768-60999), where the
# kernel picks the local ports of outgoing connections.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 16000
# Step ids from here up are SLURM's special steps (batch script 0xfffffffe, extern, interactive).
SLURM_SPECIAL_STEPS = 0xFFFFFFF0
# Set by mpirun / MPI launchers (Open MPI, PMI, PMIx, MVAPICH).
MPI_LAUNCHER_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


@dataclass(frozen=True)
class LaunchEnv:
    """How this process was launched."""

    launcher: str  # "torchrun" | "deepspeed" | "launcher" (RANK set otherwise) | "srun" | "mpirun" | "none"
    variables: dict[str, str] = field(default_factory=dict)  # to put into os.environ before joining
    scheduler: str | None = None  # "srun" | "mpirun": what started the tasks around the launcher
    scheduler_tasks: int = 1  # how many tasks it started; all must end up in one job
    world_size: int | None = None  # ranks of the job this process joins, as the launcher says
    launcher_nodes: int | None = None  # torchrun / deepspeed launcher: how many of them form the job


def detect_launch(environ: Mapping[str, str]) -> LaunchEnv:
    scheduler, tasks = _scheduler(environ)
    if "RANK" in environ:
        if "TORCHELASTIC_RUN_ID" in environ:
            launcher, nodes = "torchrun", _int(environ.get("GROUP_WORLD_SIZE"))
        elif "CROSS_SIZE" in environ:
            launcher, nodes = "deepspeed", _int(environ.get("CROSS_SIZE"))
        else:
            launcher, nodes = "launcher", None
        return LaunchEnv(launcher, {}, scheduler, tasks, _int(environ.get("WORLD_SIZE")), nodes)
    if started_by_srun(environ):
        return LaunchEnv("srun", slurm_variables(environ), "srun", tasks, tasks)
    if launched_by_mpirun(environ):  # DeepSpeed's mpi_discovery sets the variables
        return LaunchEnv("mpirun", {}, "mpirun", tasks, tasks)
    variables = {
        "MASTER_ADDR": environ.get("MASTER_ADDR", "127.0.0.1"),
        "MASTER_PORT": environ.get("MASTER_PORT") or str(_free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
    }
    return LaunchEnv("none", variables, scheduler, tasks, 1)


def check_one_job(launch: LaunchEnv) -> None:
    """Raise ConfigError when the scheduler's tasks will not all join one job (N separate copies).
    Checked before joining: a copy would otherwise wait for, or form, a process group of its own."""
    tasks = launch.scheduler_tasks
    joined = launch.launcher_nodes if launch.launcher_nodes is not None else launch.world_size
    if tasks <= 1 or joined is None or joined >= tasks:
        return
    inner = {
        "torchrun": f"torchrun formed a job of {joined} node(s)",
        "deepspeed": f"the deepspeed launcher formed a job of {joined} node(s)",
    }.get(launch.launcher, f"this process joins a job of {joined} rank(s)")
    if launch.scheduler == "srun":
        fix = (
            "run one task per GPU without torchrun (srun -n N python -m sigma_moe.launch.train ...), or one "
            "torchrun per node that all meet: srun --ntasks-per-node 1 torchrun --nnodes $SLURM_NNODES "
            "--nproc_per_node G --rdzv_backend c10d --rdzv_endpoint HOST:PORT ..."
        )
    else:
        fix = (
            "let mpirun start the ranks itself (mpirun -np N python -m sigma_moe.launch.train ...), or give "
            "the inner launcher --nnodes and a rendezvous all of them share"
        )
    raise ConfigError(
        f"{launch.scheduler} started {tasks} tasks, but {inner}: the tasks would train {tasks} separate copies "
        f"into one run_dir; {fix}"
    )


def launched_by_mpirun(environ: Mapping[str, str]) -> bool:
    """An MPI launcher's variables are set (``distributed.transport: auto`` then takes MPI on CPUs)."""
    return any(v in environ for v in MPI_LAUNCHER_ENV)


# ----------------------------------------------------------------------------------------------- SLURM


def started_by_srun(environ: Mapping[str, str]) -> bool:
    """srun started this process as a task of a job step (not the batch script, which has SLURM_PROCID
    0 but no step, and not mpirun inside an allocation, whose ranks inherit the SLURM variables of the
    daemons srun started: an MPI rank or size that disagrees with SLURM's gives that away)."""
    if "SLURM_PROCID" not in environ or _slurm_step_tasks(environ) is None:
        return False
    if "OMPI_COMM_WORLD_SIZE" in environ or "MV2_COMM_WORLD_SIZE" in environ:  # srun never sets these
        return False
    rank, tasks = environ["SLURM_PROCID"], str(_slurm_step_tasks(environ))
    # srun's own MPI plugins (pmi2, pmix) set these to SLURM's values
    return (
        all(environ.get(var, rank) == rank for var in ("PMI_RANK", "PMIX_RANK"))
        and environ.get("PMI_SIZE", tasks) == tasks
    )


def slurm_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT of an srun task."""
    tasks = _slurm_step_tasks(environ)
    nodelist = _first(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if nodelist is None and not environ.get("MASTER_ADDR"):
        raise ConfigError(
            "srun started this process but SLURM_STEP_NODELIST / SLURM_JOB_NODELIST is not set: "
            "set MASTER_ADDR to the host of task 0"
        )
    per_node = _first(environ, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")
    node = int(environ.get("SLURM_NODEID", "0"))
    counts = parse_tasks_per_node(per_node) if per_node else []
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": str(tasks),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(counts[min(node, len(counts) - 1)] if counts else tasks),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or next(iter_hostlist(nodelist)),
        "MASTER_PORT": environ.get("MASTER_PORT") or str(slurm_port(environ)),
    }


def slurm_port(environ: Mapping[str, str]) -> int:
    """The same port in every task of a step; concurrent steps of a job (and, most likely, jobs that
    share a node) get different ones."""
    job, step = _int(environ.get("SLURM_JOB_ID")) or 0, _int(_first(environ, "SLURM_STEP_ID", "SLURM_STEPID")) or 0
    return SLURM_PORT_BASE + (job * 8 + step) % SLURM_PORT_SPAN


def iter_hostlist(hostlist: str) -> Iterator[str]:
    """The host names of a SLURM hostlist, in order: ``node[01-03,07],gpu5`` -> node01 node02 node03
    node07 gpu5. Brackets may appear several times in a name (``rack[1-2]-n[1-2]``, every combination)
    and ranges keep their zero padding. A generator: the first of a huge list costs nothing."""
    for name in _split_top_level(hostlist):
        yield from _expand(name)


def parse_hostlist(hostlist: str) -> list[str]:
    return list(iter_hostlist(hostlist))


def parse_tasks_per_node(value: str) -> list[int]:
    """SLURM_TASKS_PER_NODE ``2(x3),1`` -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ConfigError(f"tasks per node {value!r}: expected SLURM's form, e.g. '2(x3),1'")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _split_top_level(hostlist: str) -> list[str]:
    names, depth, start = [], 0, 0
    for i, ch in enumerate(hostlist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            names.append(hostlist[start:i])
            start = i + 1
        if depth not in (0, 1):
            raise ConfigError(f"hostlist {hostlist!r}: unbalanced brackets")
    if depth:
        raise ConfigError(f"hostlist {hostlist!r}: unbalanced brackets")
    names.append(hostlist[start:])
    return [n.strip() for n in names if n.strip()]


def _expand(name: str) -> Iterator[str]:
    open_at = name.find("[")
    if open_at < 0:
        yield name
        return
    close_at = name.index("]", open_at)
    prefix, ranges, rest = name[:open_at], name[open_at + 1 : close_at], name[close_at + 1 :]
    for item in ranges.split(","):
        lo, _, hi = item.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ConfigError(f"hostlist entry {name!r}: {item!r} is not a number or range like 01-04")
        if hi and int(hi) < int(lo):
            raise ConfigError(f"hostlist entry {name!r}: the range {item!r} runs backwards")
        width = len(lo)  # node[01-10]: node01 ... node10
        for n in range(int(lo), int(hi or lo) + 1):
            for tail in _expand(rest):
                yield f"{prefix}{n:0{width}d}{tail}"


def _slurm_step_tasks(environ: Mapping[str, str]) -> int | None:
    """Tasks of the job step srun started; None outside a step (the batch script, salloc's shell)."""
    step = _int(_first(environ, "SLURM_STEP_ID", "SLURM_STEPID"))
    if step is None or step >= SLURM_SPECIAL_STEPS:  # the batch script's and salloc's steps
        return None
    return _int(_first(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"))


def _scheduler(environ: Mapping[str, str]) -> tuple[str | None, int]:
    """Which scheduler started the tasks around this process, and how many."""
    for var in ("OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if var in environ:
            return "mpirun", _int(environ[var]) or 1
    if started_by_srun(environ):
        return "srun", _slurm_step_tasks(environ) or 1
    if "PMI_SIZE" in environ:
        return "mpirun", _int(environ["PMI_SIZE"]) or 1
    return None, 1


def _first(environ: Mapping[str, str], *names: str) -> str | None:
    return next((environ[n] for n in names if environ.get(n)), None)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
