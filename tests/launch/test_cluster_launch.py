"""Cluster launches on localhost, each against one process training on the same global batch: two
torchrun "nodes" (``--nnodes 2 --node_rank 0/1``, one rank each, expert_parallel_size 2); two tasks
with the variables srun sets (no srun here) running ``python -m sigma_moe.launch.train``; ``sigma-moe
eval`` on 2 ranks under the deepspeed launcher (the installed script) and torchrun, against a
one-process eval of the same checkpoint; and ``srun -n 2 torchrun`` without rendezvous arguments, which
would train two copies into one run_dir, stopped with exit status 2."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from launch_helpers import ROOT, TINY, restored_environ, tiny_config, tiny_overrides, train_in_process
from launcher_runs import BIN, finish, train_losses
from ranks import free_port

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

STEPS = 6
TRAIN = (f"training.steps={STEPS}", "training.eval_every=0", "training.log_every=1", f"schedule.decay_steps={STEPS}")


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    # one thread per rank (the machine is small and shared); the launchers from this venv
    env = {**env, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def stop(*procs: subprocess.Popen) -> None:
    """After a failure: no launcher or rank left running (each is its own session's leader)."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def sets(*overrides: str) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def clean_env() -> dict[str, str]:
    """This environment without what a launcher (or an earlier in-process run) set."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("SLURM_")}


def slurm_port_job_id() -> tuple[int, int]:
    """A SLURM job id whose derived master port (step 0) is free here, and that port."""
    from sigma_moe.launch.world_env import SLURM_PORT_BASE, slurm_port

    for _ in range(200):
        port = free_port()
        if SLURM_PORT_BASE <= port < SLURM_PORT_BASE + 16000 and (port - SLURM_PORT_BASE) % 8 == 0:
            break
    else:  # the kernel hands out ports from the ephemeral range: look below it ourselves
        port = next(p for p in range(SLURM_PORT_BASE + 8 * 131, SLURM_PORT_BASE + 16000, 8) if _bindable(p))
    job = 2000 * 37 + (port - SLURM_PORT_BASE) // 8
    assert slurm_port({"SLURM_JOB_ID": str(job), "SLURM_STEP_ID": "0"}) == port
    return job, port


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def srun_env(procid: int, job: int) -> dict[str, str]:
    """What ``srun -N 1 -n 2`` sets in task ``procid`` (Slurm 23/24), on a node named localhost."""
    return {
        **clean_env(),
        "SLURM_JOB_ID": str(job),
        "SLURM_JOBID": str(job),
        "SLURM_STEP_ID": "0",
        "SLURM_STEPID": "0",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid),
        "SLURM_NODEID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_NPROCS": "2",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NUM_NODES": "1",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_NODELIST": "localhost",
        "SLURM_TASKS_PER_NODE": "2",
        "SLURM_STEP_TASKS_PER_NODE": "2",
        "SLURMD_NODENAME": "localhost",
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("cluster")
    dirs = {name: base / name for name in ("one", "nodes", "srun")}
    ep2 = "distributed.expert_parallel_size=2"
    port = free_port()
    nodes = [
        start(
            [
                str(BIN / "torchrun"),
                "--nnodes",
                "2",
                "--node_rank",
                str(r),
                "--nproc_per_node",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                "--rdzv_backend",
                "static",
                "-m",
                "sigma_moe.launch.train",
                str(TINY),
                *sets(*tiny_overrides(dirs["nodes"], *TRAIN, ep2)),
            ],
            clean_env(),
        )
        for r in (0, 1)
    ]
    job, _ = slurm_port_job_id()
    tasks = [
        start(
            [
                sys.executable,
                "-m",
                "sigma_moe.launch.train",
                str(TINY),
                *sets(*tiny_overrides(dirs["srun"], *TRAIN, ep2, "checkpoint.save_final=false")),
            ],
            srun_env(r, job),
        )
        for r in (0, 1)
    ]
    try:
        one = train_in_process(tiny_config(dirs["one"], *TRAIN, "checkpoint.save_final=false"))
        logs = {"nodes": [finish(p) for p in nodes], "srun": [finish(p) for p in tasks]}
    finally:
        stop(*nodes, *tasks)
    return {"dirs": dirs, "one": one, "logs": logs}


def test_two_torchrun_nodes_train_like_one_process(runs):
    got, one = train_losses(runs["dirs"]["nodes"]), runs["one"].losses
    assert sorted(got) == list(range(1, STEPS + 1))
    assert one[-1] < one[0] - 0.3  # it learns
    for step, loss in got.items():
        assert loss == pytest.approx(one[step - 1], rel=1e-4), (
            f"step {step}: 2 nodes {loss}, one process {one[step - 1]}"
        )
    assert "expert parallelism over 2 ranks" in runs["logs"]["nodes"][0]


def test_srun_tasks_form_one_job_like_one_process(runs):
    got, one = train_losses(runs["dirs"]["srun"]), runs["one"].losses
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, loss in got.items():
        assert loss == pytest.approx(one[step - 1], rel=1e-4), f"step {step}: srun {loss}, one process {one[step - 1]}"
    assert "expert parallelism over 2 ranks" in runs["logs"]["srun"][0]  # task 0 is rank 0 of 2


def _valid(text: str) -> tuple[float, int]:
    m = re.search(r"valid: loss ([\d.]+), perplexity [^(]+\(([\d,]+) tokens\)", text)
    assert m, text[-3000:]
    return float(m.group(1)), int(m.group(2).replace(",", ""))


def test_eval_on_two_ranks_equals_one_process(runs, capsys, monkeypatch):
    """``sigma-moe eval`` of the 2-node run's expert-parallel checkpoint: under the deepspeed launcher
    (the installed script, expert parallel) and torchrun (data parallel) as in one process."""
    from sigma_moe.launch.cli import main

    run_dir = runs["dirs"]["nodes"]
    args = [
        "eval",
        str(TINY),
        "--checkpoint",
        str(run_dir / "checkpoints"),
        "--split",
        "valid",
        *sets(*tiny_overrides(run_dir)),
    ]
    script = str(BIN / "sigma-moe")  # what `$(which sigma-moe)` names
    deepspeed = start(
        [
            str(BIN / "deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            script,
            *args,
            "--set",
            "distributed.expert_parallel_size=2",
        ],
        clean_env(),
    )
    torchrun = start(
        [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), script, *args], clean_env()
    )
    monkeypatch.chdir(ROOT)
    try:
        with restored_environ():
            assert main(args) == 0
        outs = {"deepspeed": finish(deepspeed), "torchrun": finish(torchrun)}
    finally:
        stop(deepspeed, torchrun)
    loss, tokens = _valid(capsys.readouterr().out)
    for name, out in outs.items():
        got_loss, got_tokens = _valid(out)
        assert got_tokens == tokens, f"{name}: {got_tokens} tokens evaluated, one process {tokens}"
        assert got_loss == pytest.approx(loss, abs=1.5e-4), f"{name}: valid loss {got_loss}, one process {loss}"


def test_srun_around_torchrun_without_rendezvous_stops(tmp_path):
    """``srun -n 2 torchrun --nproc_per_node 1 ...``: task 1's torchrun forms a job of its own."""
    proc = start(
        [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc_per_node",
            "1",
            "-m",
            "sigma_moe.launch.train",
            str(TINY),
            *sets(*tiny_overrides(tmp_path / "copies", *TRAIN)),
        ],
        srun_env(1, 1),
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "sigma-moe train: error: srun started 2 tasks, but torchrun formed a job of 1 node(s)" in out, out[-3000:]
    assert "separate copies into one run_dir" in out and "--rdzv_endpoint" in out
    assert re.search(r"exitcode\s*:\s*2\b", out), out[-3000:]  # torchrun reports the rank's exit status
    assert "Traceback" not in out.split("sigma-moe train: error")[0]
    assert not (tmp_path / "copies").exists()  # stopped before writing anything


def test_copies_under_mpirun_exit_2(tmp_path, capsys, monkeypatch):
    """``mpirun -np 2 torchrun --standalone ...`` as the CLI sees it: one message, exit status 2."""
    from sigma_moe.launch.cli import main

    monkeypatch.chdir(ROOT)
    with restored_environ():
        os.environ.update(
            OMPI_COMM_WORLD_SIZE="2",
            OMPI_COMM_WORLD_RANK="1",
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            GROUP_WORLD_SIZE="1",
            TORCHELASTIC_RUN_ID="x",
        )
        assert main(["train", str(TINY), *sets(*tiny_overrides(tmp_path / "copies"))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sigma-moe train: error: mpirun started 2 tasks, but torchrun formed a job of 1 node(s)")
    assert "Traceback" not in err
