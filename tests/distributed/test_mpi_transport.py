"""``distributed.transport: mpi``: the expert all-to-all over MPI (mpi4py) equals torch.distributed's,
forward and backward, under a real ``mpirun`` of 4 ranks (tests/mpi_transport_check.py); a job that
mpirun did not start is refused with a message that says so. (Training under mpirun with this
transport: test_distributed_launch.py, the resumed run.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch_helpers import ROOT
from ranks import run_ranks

pytestmark = pytest.mark.multiprocess

BIN = Path(sys.executable).parent


def test_mpi_all_to_all_equals_torch_distributed_on_four_ranks():
    out = subprocess.run(
        [
            str(BIN / "mpirun"),
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            "4",
            sys.executable,
            str(ROOT / "tests" / "mpi_transport_check.py"),
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert sorted(line for line in out.stdout.splitlines() if line.startswith("OK")) == [
        f"OK rank {r} of 4" for r in range(4)
    ]


def _build_outside_mpirun(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from sigma_moe.distributed.mpi_all_to_all import MPIAllToAll

    try:
        MPIAllToAll(dist.group.WORLD)
    except ValueError as err:
        return {"error": str(err)}
    return {"error": None}


def test_mpi_transport_refuses_a_job_not_started_by_mpirun():
    for res in run_ranks(_build_outside_mpirun, 2, timeout=120):
        assert res["error"] is not None and "launched by mpirun" in res["error"]
        assert "distributed.transport: torch" in res["error"]  # the fix


@pytest.mark.parametrize(
    "name,backend,environ,want",
    [
        ("auto", "gloo", {"OMPI_COMM_WORLD_SIZE": "2"}, "mpi"),  # a CPU job that mpirun started
        ("auto", "gloo", {"PMIX_RANK": "0"}, "mpi"),
        ("auto", "gloo", {"PMI_SIZE": "2"}, "mpi"),
        ("auto", "gloo", {"MV2_COMM_WORLD_SIZE": "2"}, "mpi"),
        ("auto", "nccl", {"OMPI_COMM_WORLD_SIZE": "2"}, "torch"),  # GPUs: NCCL
        ("auto", "gloo", {"RANK": "0"}, "torch"),  # torchrun / deepspeed
        ("torch", "gloo", {"OMPI_COMM_WORLD_SIZE": "2"}, "torch"),  # explicit choices stand
        ("mpi", "nccl", {}, "mpi"),
    ],
)
def test_auto_transport_takes_mpi_only_for_cpu_jobs_that_mpirun_started(name, backend, environ, want):
    """The launcher says whether mpirun started the job (launch/world_env.py), the transport chooses."""
    from sigma_moe.distributed.mpi_all_to_all import choose_transport
    from sigma_moe.launch.world_env import launched_by_mpirun

    assert choose_transport(name, backend=backend, launched_by_mpirun=launched_by_mpirun(environ)) == want


def test_unknown_transport_is_refused():
    from sigma_moe.distributed.mpi_all_to_all import choose_transport

    with pytest.raises(ValueError, match="'auto', 'torch' or 'mpi'"):
        choose_transport("shm", backend="gloo", launched_by_mpirun=False)
