"""Launcher discovery (launch/world_env.py) on the environments the launchers set: SLURM's hostlists and
tasks per node, srun without and around torchrun, mpirun inside a SLURM allocation, the batch script;
and the check that stops N separate copies of one job. The real launches are in test_cluster_launch.py."""

from __future__ import annotations

import pytest

from sigma_moe.config_check import ConfigError
from sigma_moe.launch.world_env import (
    SLURM_PORT_BASE,
    check_one_job,
    detect_launch,
    iter_hostlist,
    parse_hostlist,
    parse_tasks_per_node,
)


@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("gpu5", ["gpu5"]),
        ("node[9-11]", ["node9", "node10", "node11"]),  # no padding: widths grow
        ("node[098-101]", ["node098", "node099", "node100", "node101"]),  # padding kept, then outgrown
        ("rack[1-2]-n[08-09]", ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]),  # every combination
        ("cn-a[3]-ib,cn-b[1,4-5].ib", ["cn-a3-ib", "cn-b1.ib", "cn-b4.ib", "cn-b5.ib"]),  # dashes, suffixes
        ("a, b ,c", ["a", "b", "c"]),
        ("10.0.0.[1-2]", ["10.0.0.1", "10.0.0.2"]),
    ],
)
def test_hostlists_expand_in_order(hostlist, hosts):
    assert parse_hostlist(hostlist) == hosts


def test_first_host_of_a_huge_list_is_not_expanded_whole():
    hosts = iter_hostlist("n[0000000-9999999]")
    assert next(hosts) == "n0000000" and next(hosts) == "n0000001"


@pytest.mark.parametrize(
    "hostlist, problem",
    [
        ("node[1-3", "unbalanced"),
        ("node]1[", "unbalanced"),
        ("node[a-b]", "not a number"),
        ("node[3-1]", "backwards"),
        ("node[1-2-3]", "not a number"),
    ],
)
def test_bad_hostlists_are_config_errors(hostlist, problem):
    with pytest.raises(ConfigError, match=problem):
        parse_hostlist(hostlist)


def test_tasks_per_node():
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("4") == [4]
    with pytest.raises(ConfigError, match="2\\(x3\\),1"):
        parse_tasks_per_node("2x3")


def srun_task(
    procid: int, *, tasks: int = 4, nodes: str = "gpu[07-08]", per_node: str = "2(x2)", step: int = 0, job: int = 81234
) -> dict[str, str]:
    """What srun sets in task ``procid`` of a step (block distribution)."""
    counts = parse_tasks_per_node(per_node)
    node = next(i for i in range(len(counts)) if procid < sum(counts[: i + 1]))
    return {
        "SLURM_JOB_ID": str(job),
        "SLURM_STEP_ID": str(step),
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid - sum(counts[:node])),
        "SLURM_NODEID": str(node),
        "SLURM_NTASKS": str(tasks),
        "SLURM_STEP_NUM_TASKS": str(tasks),
        "SLURM_JOB_NODELIST": nodes,
        "SLURM_STEP_NODELIST": nodes,
        "SLURM_STEP_TASKS_PER_NODE": per_node,
        "SLURM_TASKS_PER_NODE": per_node,
    }


def test_srun_tasks_get_ranks_and_the_first_host():
    envs = [detect_launch(srun_task(r, per_node="3,1")) for r in range(4)]
    assert {e.launcher for e in envs} == {"srun"}
    got = [(e.variables["RANK"], e.variables["LOCAL_RANK"], e.variables["LOCAL_WORLD_SIZE"]) for e in envs]
    assert got == [("0", "0", "3"), ("1", "1", "3"), ("2", "2", "3"), ("3", "0", "1")]
    assert {e.variables["WORLD_SIZE"] for e in envs} == {"4"}
    assert {e.variables["MASTER_ADDR"] for e in envs} == {"gpu07"}
    ports = {e.variables["MASTER_PORT"] for e in envs}
    assert len(ports) == 1 and SLURM_PORT_BASE <= int(ports.pop()) < 32768  # below the ephemeral range
    second_step = detect_launch(srun_task(0, step=1)).variables["MASTER_PORT"]
    other_job = detect_launch(srun_task(0, job=81235)).variables["MASTER_PORT"]
    assert len({envs[0].variables["MASTER_PORT"], second_step, other_job}) == 3
    for e in envs:
        check_one_job(e)  # one job: nothing to complain about


def test_srun_keeps_a_master_address_and_port_the_user_set():
    env = detect_launch({**srun_task(1), "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "6000"})
    assert (env.variables["MASTER_ADDR"], env.variables["MASTER_PORT"]) == ("10.1.2.3", "6000")


def test_srun_with_its_mpi_plugin_is_still_srun():
    pmi2 = {**srun_task(2), "PMI_RANK": "2", "PMI_SIZE": "4"}
    pmix = {**srun_task(2), "PMIX_RANK": "2"}
    assert detect_launch(pmi2).launcher == detect_launch(pmix).launcher == "srun"
    assert detect_launch(pmi2).variables["RANK"] == "2"


def test_mpirun_inside_an_allocation_is_mpirun():
    """mpirun's ranks inherit the SLURM variables of the daemon srun started (one per node)."""
    open_mpi = {**srun_task(1, tasks=2, per_node="1(x2)"), "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "5"}
    hydra = {**srun_task(1, tasks=2, per_node="1(x2)"), "PMI_RANK": "5", "PMI_SIZE": "8"}
    for environ in (open_mpi, hydra):
        env = detect_launch(environ)
        assert (env.launcher, env.variables, env.scheduler, env.scheduler_tasks) == ("mpirun", {}, "mpirun", 8)


def test_the_batch_script_is_one_process():
    """sbatch -n 4 sets SLURM_PROCID 0 and SLURM_NTASKS 4 in the script itself, which is no step."""
    batch = {k: v for k, v in srun_task(0).items() if not k.startswith("SLURM_STEP")}
    for environ in (batch, {**srun_task(0), "SLURM_STEP_ID": str(0xFFFFFFFE)}):
        env = detect_launch(environ)
        assert env.launcher == "none" and env.variables["WORLD_SIZE"] == "1"
        check_one_job(env)
    # and torchrun in the batch script: one job of its own, also fine
    check_one_job(detect_launch({**batch, **torchrun_worker(world=4, nodes=1)}))


def torchrun_worker(*, world: int, nodes: int, rank: int = 0) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        "GROUP_WORLD_SIZE": str(nodes),
        "TORCHELASTIC_RUN_ID": "none",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }


def test_torchrun_wins_over_slurm():
    env = detect_launch({**srun_task(1, tasks=2, per_node="1(x2)"), **torchrun_worker(world=8, nodes=2, rank=6)})
    assert (env.launcher, env.variables, env.scheduler, env.scheduler_tasks) == ("torchrun", {}, "srun", 2)
    check_one_job(env)  # 2 tasks, 2 torchrun nodes: one job


@pytest.mark.parametrize(
    "outside, inside, words",
    [
        # srun -n 2 torchrun --nproc_per_node 1 (no rendezvous): two 1-rank jobs
        (
            srun_task(1, tasks=2, per_node="2"),
            torchrun_worker(world=1, nodes=1),
            ["srun started 2 tasks", "torchrun formed a job of 1 node"],
        ),
        # srun -N 2 torchrun --nproc_per_node 4 (no --nnodes): two 4-rank jobs
        (srun_task(1, tasks=2, per_node="1(x2)"), torchrun_worker(world=4, nodes=1), ["srun started 2 tasks"]),
        # mpirun -np 2 deepspeed --num_gpus 1 ...
        (
            {"OMPI_COMM_WORLD_SIZE": "2"},
            {"RANK": "0", "WORLD_SIZE": "1", "CROSS_SIZE": "1"},
            ["mpirun started 2 tasks", "deepspeed launcher formed a job of 1 node"],
        ),
        # a RANK / WORLD_SIZE exported by hand into an srun step
        (srun_task(0, tasks=3, per_node="3"), {"RANK": "0", "WORLD_SIZE": "1"}, ["joins a job of 1 rank"]),
    ],
)
def test_copies_of_one_job_are_stopped(outside, inside, words):
    with pytest.raises(ConfigError) as err:
        check_one_job(detect_launch({**outside, **inside}))
    message = str(err.value)
    for w in [*words, "separate copies into one run_dir"]:
        assert w in message, message


def test_the_first_run_says_what_deepspeed_builds_and_a_stale_lock(tmp_path, monkeypatch, capsys):
    """A fresh TORCH_EXTENSIONS_DIR: the CPU op is named before DeepSpeed compiles it; a lock left in
    its folder is named with the fix; once the op is built nothing is printed."""
    import deepspeed

    from sigma_moe.launch.world import announce_op_build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    if not deepspeed.ops.__compatible_ops__.get("deepspeed_shm_comm", False):
        pytest.fail("DeepSpeed's CPU shared-memory op is not compatible here; the CPU runs use it")
    announce_op_build()
    first = capsys.readouterr().out
    assert first.startswith("building DeepSpeed's CPU communication op ") and "deepspeed_shm_comm" in first
    assert f"in {tmp_path / 'deepspeed_shm_comm'} (once per environment: 1-5 minutes)" in first
    assert "lock" not in first
    folder = tmp_path / "deepspeed_shm_comm"  # made by the first call, as torch does
    (folder / "lock").touch()
    announce_op_build()
    assert f"another process holds its build lock {folder / 'lock'}" in capsys.readouterr().out
    (folder / "deepspeed_shm_comm.so").touch()
    announce_op_build()
    assert capsys.readouterr().out == ""
