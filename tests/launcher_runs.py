"""Real launches of the tiny config's training CLI (torchrun, the deepspeed launcher, mpirun), one
thread per rank, and reading back what they logged: shared by the launch, elastic-resume, export,
compile, plan and cluster tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from launch_helpers import ROOT, TINY, tiny_overrides
from ranks import free_port

BIN = Path(sys.executable).parent
STEPS = 20


def command(launcher: str, port: int, nproc: int = 2) -> list[str]:
    module = ["-m", "sigma_moe.launch.train"]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(port), *module]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port), "--module", module[1]]
    if launcher == "mpirun":
        return [
            str(BIN / "mpirun"),
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            str(nproc),
            sys.executable,
            *module,
        ]
    raise ValueError(launcher)


def launch(launcher: str, run_dir: Path, *overrides: str, nproc: int = 2) -> subprocess.Popen:
    port = free_port()
    sets = tiny_overrides(
        run_dir, f"schedule.decay_steps={STEPS}", "training.log_every=1", "training.eval_every=0", *overrides
    )
    # One thread per rank: the deepspeed launcher leaves torch at one thread per core in every rank,
    # which on a small CPU machine slows the gloo collectives ~15x.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port), "PATH": f"{BIN}:{os.environ['PATH']}"}
    args = [*command(launcher, port, nproc), str(TINY), *[x for s in sets for x in ("--set", s)]]
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's own process group (start_new_session)
        out, _ = proc.communicate()
        pytest.fail(f"{proc.args[0]} run did not finish in {timeout} s:\n{out[-3000:]}")
    assert proc.returncode == 0, f"{proc.args[0]} exited {proc.returncode}:\n{out[-3000:]}"
    return out


def train_losses(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / run_dir.name))  # events: RUN_DIR/<run name>
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}
