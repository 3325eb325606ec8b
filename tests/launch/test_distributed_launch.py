"""Expert parallelism through the training CLI under the real launchers (2 CPU ranks, gloo): E = 2
trains like E = 1 (torchrun, 20 steps, same losses); the deepspeed launcher gives the same run; mpirun,
with the all-to-all over MPI, resumes the torchrun run from its expert-sharded step-10 checkpoint and
continues exactly; a killed rank ends the job promptly."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from launch_helpers import ROOT, TINY, tiny_overrides
from launcher_runs import BIN, STEPS, finish, launch, train_losses
from ranks import run_ranks

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("launch")
    dirs = {name: base / name for name in ("ep2", "ep1", "resumed", "deepspeed")}
    dirs["ep2_log"] = finish(
        launch(
            "torchrun",
            dirs["ep2"],
            "distributed.expert_parallel_size=2",
            f"training.steps={STEPS}",
            "checkpoint.every=10",
        )
    )
    finish(launch("torchrun", dirs["ep1"], "distributed.expert_parallel_size=1", f"training.steps={STEPS}"))
    step10 = dirs["ep2"] / "checkpoints" / "step_00000010"
    # the MPI launch resumes the torchrun run: launchers, the sharded checkpoint and the MPI transport
    # of the all-to-all (distributed.transport auto under mpirun; it moves the same bytes as gloo)
    dirs["resumed_log"] = finish(
        launch(
            "mpirun",
            dirs["resumed"],
            "distributed.expert_parallel_size=2",
            f"training.steps={STEPS}",
            f"checkpoint.resume={step10}",
        )
    )
    finish(launch("deepspeed", dirs["deepspeed"], "distributed.expert_parallel_size=2", "training.steps=5"))
    return dirs


def test_expert_parallel_trains_like_data_parallel(runs):
    ep2, ep1 = train_losses(runs["ep2"]), train_losses(runs["ep1"])
    assert sorted(ep2) == sorted(ep1) == list(range(1, STEPS + 1))
    assert ep2[STEPS] < ep2[1] - 0.5  # it learns
    for step in ep1:
        assert ep2[step] == pytest.approx(ep1[step], rel=1e-4), f"step {step}: E=2 {ep2[step]}, E=1 {ep1[step]}"


def test_all_to_all_figures_in_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["ep2"] / "ep2"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    for layer in ("00", "01"):
        share = [e.value for e in acc.Scalars(f"routing/layer_{layer}/a2a_remote_share")]
        load = [e.value for e in acc.Scalars(f"routing/layer_{layer}/ep_max_mean_load")]
        assert len(share) == len(load) == STEPS
        assert all(0 < v < 1 for v in share) and all(1 <= v <= 2 for v in load)  # 2 EP ranks: max/mean <= 2
    mb = [e.value for e in acc.Scalars("routing/a2a_mb_per_step")]
    ms = [e.value for e in acc.Scalars("routing/a2a_ms_per_step")]
    assert len(mb) == len(ms) == STEPS and all(v > 0 for v in mb + ms)
    for name in ("a2a_mb_per_step", "a2a_ms_per_step", "tokens_received_per_step"):  # the busiest rank's too
        mean, top = (acc.Scalars(f"routing/{name}{s}") for s in ("", "_max"))
        assert all(t.value >= m.value > 0 for m, t in zip(mean, top)), name
    assert all(0 < e.value < 1 for e in acc.Scalars("routing/a2a_share_of_step"))
    # each rank's series: (token, slot) assignments its experts computed; the busiest over the mean
    per_rank = [[e.value for e in acc.Scalars(f"routing/ep_rank_{r:02d}/assignments_per_step")] for r in (0, 1)]
    top = [e.value for e in acc.Scalars("routing/ep_max_mean_assignments")]
    assert len(per_rank[0]) == len(per_rank[1]) == len(top) == STEPS
    for a, b, t in zip(*per_rank, top):
        assert t == pytest.approx(max(a, b) / ((a + b) / 2)) and a > 0 and b > 0
    ep1_tags = EventAccumulator(str(runs["ep1"] / "ep1")).Reload().Tags()["scalars"]
    assert "routing/layer_00/a2a_remote_share" not in ep1_tags and "routing/a2a_mb_per_step" not in ep1_tags


def test_deepspeed_launcher_runs_the_same_job(runs):
    ref, got = train_losses(runs["ep2"]), train_losses(runs["deepspeed"])
    assert sorted(got) == [1, 2, 3, 4, 5]
    for step, loss in got.items():
        assert loss == pytest.approx(ref[step], rel=1e-5), (
            f"deepspeed launcher step {step}: {loss} vs torchrun {ref[step]}"
        )


def test_expert_files_of_both_ranks_are_saved(runs):
    tag = runs["ep2"] / "checkpoints" / f"step_{STEPS:08d}"
    files = sorted(p.name for p in tag.glob("layer_*_expert_*"))
    assert files == sorted(f"layer_{i}_expert_{g}_mp_rank_00_model_states.pt" for i in range(2) for g in range(4))


def test_mpirun_resumes_the_torchrun_checkpoint_exactly(runs):
    assert "transport=MPIAllToAll(ranks=2)" in runs["resumed_log"]  # auto chose MPI under mpirun
    line = next(ln for ln in runs["ep2_log"].splitlines() if "expert parallelism over 2 ranks" in ln)
    assert "AllToAllDispatcher(" in line and "transport=" not in line  # torch.distributed under torchrun
    ref, resumed = train_losses(runs["ep2"]), train_losses(runs["resumed"])
    assert sorted(resumed) == list(range(11, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(ref[step], rel=1e-6), f"step {step}: resumed {loss}, uninterrupted {ref[step]}"


def test_one_process_evaluates_the_expert_parallel_checkpoint(runs):
    """All experts of both ranks, loaded by global id in one process, give the run's final valid loss."""
    final = re.search(r"valid loss ([0-9.]+)", runs["ep2_log"]).group(1)
    out = subprocess.run(
        [
            str(BIN / "sigma-moe"),
            "eval",
            str(TINY),
            "--checkpoint",
            str(runs["ep2"] / "checkpoints"),
            *[x for s in tiny_overrides(runs["ep2"]) for x in ("--set", s)],
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"valid: loss ([0-9.]+)", out.stdout).group(1) == final


def _leave_after_failure_then_success(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from sigma_moe.launch.world import leave_world_after

    kept = leave_world_after(1) == 1 and dist.is_initialized()  # a failed rank leaves the group alone
    dist.barrier()  # so the group still works
    left = leave_world_after(0) == 0 and not dist.is_initialized()
    return {"kept": kept, "left": left}


def test_a_process_leaves_the_group_only_after_success():
    """Every entry point (``sigma-moe``, ``-m sigma_moe.launch.train``, the compare worker) ends with
    leave_world_after: gloo's threads must not outlive the interpreter (a rank aborted at exit in CI)."""
    assert run_ranks(_leave_after_failure_then_success, 2) == [{"kept": True, "left": True}] * 2


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_killed_rank_ends_the_job_promptly(tmp_path):
    run_dir = tmp_path / "killed"
    proc = launch(
        "torchrun",
        run_dir,
        "distributed.expert_parallel_size=2",
        "training.steps=100000",
        "checkpoint.save_final=false",
    )
    try:
        deadline = time.monotonic() + 120
        while not list((run_dir / run_dir.name).glob("events.*")):  # rank 0 is in the training loop
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        time.sleep(2)
        workers = _children(proc.pid)
        assert len(workers) == 2, f"expected 2 rank processes under torchrun, found {workers}"
        os.kill(workers[1], signal.SIGKILL)
        killed_at = time.monotonic()
        proc.wait(timeout=60)
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert elapsed < 30, f"the job took {elapsed:.0f} s to end after a rank was killed"


def test_a_stopped_rank_is_named_when_the_collective_times_out(tmp_path):
    """SIGSTOP one of 2 ranks: the healthy rank's collective times out, and its one-line error names the
    stopped rank (pid, step) instead of failing as if it were the culprit itself."""
    run_dir = tmp_path / "stopped"
    proc = launch(
        "torchrun",
        run_dir,
        "distributed.expert_parallel_size=2",
        "training.steps=100000",
        "checkpoint.save_final=false",
        "distributed.timeout_s=12",
    )
    stopped = None
    try:
        deadline = time.monotonic() + 120
        while len(list((run_dir / ".ranks").glob("rank_*.json"))) < 2 or not list(
            (run_dir / run_dir.name).glob("events.*")
        ):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        time.sleep(2)
        ranks = sorted(
            p for p in _children(proc.pid) if b"sigma_moe.launch.train" in Path(f"/proc/{p}/cmdline").read_bytes()
        )
        assert len(ranks) == 2, f"expected 2 rank processes under torchrun, found {ranks}"
        stopped = ranks[1]
        os.kill(stopped, signal.SIGSTOP)
        stopped_at = time.monotonic()
        out, _ = proc.communicate(timeout=120)
        elapsed = time.monotonic() - stopped_at
    finally:
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):  # torchrun has killed it after rank 0's exit
                os.kill(stopped, signal.SIGCONT)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    line = next((ln for ln in out.splitlines() if "sigma-moe train: error: " in ln and "rank 1 (pid" in ln), None)
    assert line is not None, out[-3000:]
    assert re.search(
        rf"after 12 s (on rank 0|\(distributed.timeout_s\)): rank 1 \(pid {stopped} on [^)]+\) last "
        rf"answered \d+ s ago, at step \d+\. That process is stopped or frozen",
        line,
    ), line
    # torchrun's root cause is the first failure it polls: rank 0's exit status 2, or the stopped rank's
    # -9 (rank 0's watchdog SIGKILLs it on the way out); a rank still exiting then gets torchrun's SIGTERM
    root = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", out, re.S)
    assert root and root.group(1) in {"2", "-9"}, out[-3000:]
    assert set(re.findall(r"exitcode\s*:\s*(-?\d+)", out)) <= {"2", "-9", "-15"}, out[-3000:]
    # within about one timeout: the stopped rank is ended with rank 0, torchrun does not wait out its
    # 30 s SIGTERM grace on a process that cannot receive it
    assert elapsed < 12 + 20, f"the job took {elapsed:.0f} s to end after a rank was stopped"
