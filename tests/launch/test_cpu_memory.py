"""CPU runs keep freed memory: once warm, training-like steps (a 64 MB activation and its gradient,
allocated and freed every step) fault few pages in (usually none; heap fragmentation can cost a block
now and then), where glibc's defaults fault them all in again, every step. Measured in fresh
interpreters, with and without the setting."""

import os
import platform
import subprocess
import sys

import pytest

STEP_FAULTS = """
import resource, sys, torch
from sigma_moe.launch.cpu_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
torch.manual_seed(0)
layer, x = torch.nn.Linear(256, 4096), torch.randn(4096, 256)
def step():
    layer(x).square().mean().backward()
for _ in range(10):  # warm: the allocator's heap reaches its working size
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's allocator: a no-op elsewhere")


def step_faults(mode: str, **env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", STEP_FAULTS, mode],
        env={**clean, **env, "OMP_NUM_THREADS": "1"},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return out[0] == "True", int(out[1])


ACTIVATION_PAGES = (4096 * 4096 * 4) // os.sysconf("SC_PAGE_SIZE")


def test_warm_steps_fault_far_fewer_pages_in():
    applied, faults = step_faults("keep")
    default_applied, default_faults = step_faults("default")
    assert applied and not default_applied
    assert default_faults > 3 * ACTIVATION_PAGES  # glibc's default: fresh mappings every step
    assert faults < default_faults / 3  # seen: 0, 16384 or 32768 (a stray block or two) vs ~295k


def test_the_environments_own_threshold_wins():
    applied, faults = step_faults("keep", MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    assert not applied and faults > 3 * ACTIVATION_PAGES
