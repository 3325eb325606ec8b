"""Session-wide test set-up."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton's kernels run only in its interpreter, and triton reads TRITON_INTERPRET when it
# is first imported (its standard library's jit functions are made then): set it before any test module
# imports triton, which torch's FLOP counter and DeepSpeed do on their way (tests/kernels/test_triton_cvmm.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def deepspeed_ops_built_in_this_environment():
    """As the entry points do (``build_ops_in_environment``); set here for the processes the tests
    start themselves (tests/ranks.py), which inherit it."""
    from sigma_moe.launch.world import build_ops_in_environment

    build_ops_in_environment()
    yield


@pytest.fixture(scope="session", autouse=True)
def leave_process_group_at_the_end():
    """In-process training tests join a one-rank process group and keep it for the session; leave it
    before the interpreter exits, as the entry points do (``leave_world_after``): gloo's threads
    outliving the interpreter can abort the process after every test has passed."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def environment_as_found(request):
    """Every test leaves os.environ as it found it. A one-rank set-up in this process writes RANK,
    WORLD_SIZE and MASTER_PORT (DeepSpeed, world_env); left behind, they reach the launchers that later
    tests start (an mpirun task then takes itself for a one-rank job, and four MPI ranks race for one
    leaked MASTER_PORT). A test that leaked them is named in the warnings summary."""
    saved = dict(os.environ)
    yield
    leaked = [v for v in LAUNCH_VARIABLES if os.environ.get(v) != saved.get(v)]
    if leaked:
        import warnings

        warnings.warn(f"{request.node.nodeid} left {', '.join(leaked)} in os.environ (restored)", stacklevel=1)
    os.environ.clear()
    os.environ.update(saved)
