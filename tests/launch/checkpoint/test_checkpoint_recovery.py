"""Nothing saved is lost silently: resume finds the newest intact checkpoint whatever happened to
``latest``, a damaged file is named, starting over never prunes the new checkpoints, one run holds a
run directory at a time, and checkpoint files that would run code are refused.

One real 6-step run (checkpoints at 2, 4, 6) is the source; each test damages a copy of it."""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch_helpers import (
    ROOT,
    SIX_STEPS,
    TINY,
    copy_run,
    one_thread,
    restored_environ,
    tiny_config,
    tiny_overrides,
    train_in_process,
)
from sigma_moe.config_check import ConfigError
from sigma_moe.launch.checkpoint.manager import CheckpointError, CheckpointManager, newest_intact, resolve_checkpoint
from sigma_moe.launch.checkpoint.manifest import MANIFEST, write_manifest
from sigma_moe.launch.cli import main
from sigma_moe.launch.guards.divergence import TrainingDiverged
from sigma_moe.launch.guards.run_lock import HOLDER_FILE, RunLock


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("recovery") / "run"
    result = train_in_process(tiny_config(run_dir, *SIX_STEPS))
    return run_dir, result


@pytest.fixture
def run(source, tmp_path):
    """A copy of the source run directory, free to damage."""
    return copy_run(source[0], tmp_path)


def _train_command(run_dir, *overrides):
    """``python -m sigma_moe.launch.train`` on the tiny config in a real process -> CompletedProcess."""
    sets = [a for o in tiny_overrides(run_dir, *overrides) for a in ("--set", o)]
    return subprocess.run(
        [sys.executable, "-m", "sigma_moe.launch.train", str(TINY), *sets],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _tags(ckpt):
    return sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step_"))


def _sets(run_dir, *overrides):
    return [a for o in tiny_overrides(run_dir, *overrides) for a in ("--set", o)]


def _error_message(stderr: str, command: str) -> str:
    """What ``sigma-moe COMMAND`` printed as its error, asserted to be one line and the last of stderr."""
    head = f"sigma-moe {command}: error: "
    assert head in stderr, stderr[-3000:]
    message = stderr.split(head, 1)[1]
    assert message.endswith("\n") and message.count("\n") == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    return message


def test_a_checkpoint_lists_its_files(source):
    ckpt = source[0] / "checkpoints"
    assert _tags(ckpt) == ["step_00000002", "step_00000004", "step_00000006"]
    files = json.loads((ckpt / "step_00000006" / MANIFEST).read_text())["files"]
    on_disk = {p.name for p in (ckpt / "step_00000006").iterdir() if p.name != MANIFEST}
    assert set(files) == on_disk and "rank_00000.pt" in files and "meta.json" in files
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in files.values())


@pytest.mark.parametrize(
    "damage, skipped",
    [
        ("latest names a missing folder", "names step_00000006, which does not exist"),
        ("latest is missing", "latest is missing"),
        ("manifest and meta missing", "step_00000006 is incomplete"),
        ("expert file bit-flipped", "layer_1_expert_2_mp_rank_00_model_states.pt is corrupted"),
        ("model file truncated", "mp_rank_00_model_states.pt has"),
        ("rank file deleted", "rank_00000.pt is missing"),
    ],
)
def test_resume_falls_back_to_the_newest_intact_checkpoint(run, damage, skipped, caplog):
    newest = run / "checkpoints" / "step_00000006"
    if damage == "latest names a missing folder":  # a crash inside a save that replaces a folder
        shutil.rmtree(newest)
    elif damage == "latest is missing":
        (run / "checkpoints" / "latest").unlink()
    elif damage == "manifest and meta missing":
        (newest / MANIFEST).unlink()
        (newest / "meta.json").unlink()
    elif damage == "expert file bit-flipped":
        path = newest / "layer_1_expert_2_mp_rank_00_model_states.pt"
        data = bytearray(path.read_bytes())
        data[-200:-168] = bytes(b ^ 0xFF for b in data[-200:-168])  # 32 bytes, same size
        path.write_bytes(bytes(data))
    elif damage == "model file truncated":
        path = newest / "mp_rank_00_model_states.pt"
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "rank file deleted":
        (newest / "rank_00000.pt").unlink()
    with caplog.at_level(logging.WARNING):
        found = newest_intact(run / "checkpoints")
    skipped_tag = "step_00000006" if damage != "latest is missing" else None
    want = "step_00000004" if skipped_tag else "step_00000006"
    assert found == run / "checkpoints" / want
    assert skipped in caplog.text
    # a resumed training run starts there, not at step 0
    resumed = train_in_process(tiny_config(run, *SIX_STEPS[1:], "training.steps=7"))
    assert resumed.start_step == int(want[-2:])


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(run):
    for tag in _tags(run / "checkpoints"):
        (run / "checkpoints" / tag / "rank_00000.pt").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match=r"holds no intact checkpoint:(.|\n)*rank_00000.pt has 10 bytes"):
        newest_intact(run / "checkpoints")
    out = _train_command(run, *SIX_STEPS[1:], "training.steps=8")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "holds no intact checkpoint" in out.stderr and "Traceback" not in out.stderr
    assert not (run / "checkpoints" / "step_00000008").exists()


def test_eval_of_a_corrupted_checkpoint_names_the_file(run):
    path = run / "checkpoints" / "step_00000006" / "layer_0_expert_1_mp_rank_00_model_states.pt"
    path.write_bytes(b"\0" * path.stat().st_size)  # zeroed
    with pytest.raises(CheckpointError, match="layer_0_expert_1_mp_rank_00_model_states.pt is corrupted"):
        resolve_checkpoint(run / "checkpoints" / "step_00000006")
    assert resolve_checkpoint(run / "checkpoints") == run / "checkpoints" / "step_00000004"  # the folder: fallback


def test_eval_of_a_checkpoint_missing_an_expert_file_is_one_line_and_status_2(run):
    """An expert file deleted from a saved checkpoint: the ``sigma-moe`` command names it in one line
    and exits with status 2."""
    tag = run / "checkpoints" / "step_00000006"
    (tag / "layer_0_expert_1_mp_rank_00_model_states.pt").unlink()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out = subprocess.run(
        [str(Path(sys.executable).with_name("sigma-moe")), "eval", str(TINY), "--checkpoint", str(tag), *_sets(run)],
        cwd=ROOT,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "layer_0_expert_1_mp_rank_00_model_states.pt is missing" in _error_message(out.stderr, "eval")


def test_a_checkpoint_saved_without_an_expert_file_is_one_line_and_status_2(run, capsys, monkeypatch):
    """The manifest agrees (the file was never written): the load itself finds the expert missing, inside
    DeepSpeed's load when resuming, in its place when evaluating. Both print one line, status 2."""
    tag = run / "checkpoints" / "step_00000006"
    name = "layer_1_expert_2_mp_rank_00_model_states.pt"
    (tag / name).unlink()
    manifest = json.loads((tag / MANIFEST).read_text())
    del manifest["files"][name]
    (tag / MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.chdir(ROOT)
    commands = [
        ["train", str(TINY), *_sets(run, f"checkpoint.resume={tag}", "training.steps=8")],
        ["eval", str(TINY), "--checkpoint", str(tag), *_sets(run)],
    ]
    for command in commands:
        with restored_environ(), one_thread():
            assert main(command) == 2
        message = _error_message(capsys.readouterr().err, command[0])
        assert f"expert 2 of routed layer 1 (blocks.1.ff) is missing from {tag}" in message, message


def test_starting_over_keeps_the_new_checkpoints(run):
    """A run started over (resume none) in a folder with checkpoints of later steps: keep_last prunes
    only this run's older ones; latest names the new one; the old run's later steps stay."""
    train_in_process(
        tiny_config(
            run,
            "checkpoint.resume=none",
            "training.steps=4",
            "checkpoint.every=1",
            "checkpoint.keep_last=2",
            "training.eval_every=0",
            "training.log_every=2",
            "training.seed=5",
        )
    )
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000004"
    assert _tags(ckpt) == ["step_00000003", "step_00000004", "step_00000006"]
    assert newest_intact(ckpt) == ckpt / "step_00000004"
    assert json.loads((ckpt / "step_00000004" / "meta.json").read_text())["step"] == 4


def test_saving_a_step_again_keeps_it_whole(source, tmp_path):
    """The final save of a step saved periodically a moment ago: nothing is removed or rewritten."""
    from launch_helpers import one_thread, restored_environ
    from sigma_moe.launch.session import start_session

    cfg = tiny_config(tmp_path / "again", "training.steps=2")
    with restored_environ(), one_thread():
        s = start_session(cfg)
        manager = CheckpointManager(tmp_path / "ck", keep_last=2, model_config=s.model_config)
        first = manager.save(s.engine, step=3, rank_state={})
        stamp = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
        assert manager.save(s.engine, step=3, rank_state={}) == first
        assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamp
        other = CheckpointManager(tmp_path / "ck", keep_last=2, model_config=s.model_config)
        assert other.save(s.engine, step=3, rank_state={"x": 1}) == first  # another run's step 3: replaced whole
        assert newest_intact(tmp_path / "ck") == first and not list((tmp_path / "ck").glob(".old-*"))


def test_a_refused_resume_leaves_config_yaml_alone(run):
    before = (run / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match="another shape"):
        train_in_process(tiny_config(run, *SIX_STEPS[1:], "training.steps=8", "model.ff.n_experts=8"))
    assert (run / "config.yaml").read_text() == before


def test_one_run_per_run_dir(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from sigma_moe.launch.guards.run_lock import RunLock\n"
                f"lock = RunLock({str(tmp_path / 'run')!r}); lock.acquire(); print('held', flush=True); time.sleep(120)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert any(line.strip() == "held" for line in iter(holder.stdout.readline, ""))  # after import noise
        out = _train_command(tmp_path / "run", "training.steps=2")
        assert out.returncode == 2, out.stderr[-2000:]
        assert f"is in use by another training run (pid {holder.pid} on " in out.stderr
        assert not (tmp_path / "run" / "config.yaml").exists()  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the OS drops the lock with the process
        holder.wait()
    assert (tmp_path / "run" / HOLDER_FILE).exists()  # the dead holder's note is left behind...
    lock = RunLock(tmp_path / "run")
    lock.acquire()  # ...and is no obstacle
    assert json.loads((tmp_path / "run" / HOLDER_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path / "run").acquire()
    lock.release()
    RunLock(tmp_path / "run").acquire()


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_files_that_would_run_code_are_refused(run, tmp_path):
    from launch_helpers import one_thread, restored_environ
    from sigma_moe.launch.evaluate import evaluate_checkpoint

    tag = run / "checkpoints" / "step_00000006"
    for name in ("rank_00000.pt", "mp_rank_00_model_states.pt"):
        victim = tag / name
        backup = victim.read_bytes()
        torch.save({"step": 6, "payload": _RunsCode()}, victim)
        write_manifest(tag)  # an attacker rewrites the manifest too
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            with pytest.raises(CheckpointError, match=f"refusing to load .*{name}.*posix.system"):
                if name == "rank_00000.pt":
                    train_in_process(tiny_config(run, *SIX_STEPS[1:], "training.steps=8"))
                else:
                    with restored_environ(), one_thread():
                        evaluate_checkpoint(tiny_config(tmp_path / "eval"), str(tag))
        finally:
            os.chdir(cwd)
        assert not (tmp_path / "pwned").exists()
        victim.write_bytes(backup)


def test_divergence_stops_the_run_before_a_non_finite_checkpoint(run):
    """lr 1e6 without clipping: the run stops with the step named, and every checkpoint left holds
    finite weights (non-finite ones never push good ones out)."""
    with pytest.raises(TrainingDiverged, match=r"training diverged (at|by) step \d+: the (loss|gradients|weights)"):
        train_in_process(
            tiny_config(
                run,
                "training.steps=30",
                "checkpoint.every=1",
                "checkpoint.keep_last=3",
                "optimizer.lr=1e6",
                "training.grad_clip=0",
                "training.eval_every=0",
                "training.log_every=2",
            )
        )
    ckpt = run / "checkpoints"
    assert len(_tags(ckpt)) >= 3
    for tag in _tags(ckpt):
        module = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]
        assert all(torch.isfinite(t).all() for t in module.values()), tag


class _FileSizeLimit:
    """Wraps the manager's ``save_experts``: from the expert files on, no file may grow past ``limit``
    bytes (EFBIG), as torch.save fails on a full disk. Restored by ``restore``."""

    def __init__(self, save_experts, limit: int):
        self.save_experts, self.limit, self.saved = save_experts, limit, None

    def __call__(self, module, tag_dir):
        self.saved = (resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN))
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.saved[0][1]))
        self.save_experts(module, tag_dir)

    def restore(self):
        if self.saved is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, self.saved[0])
            signal.signal(signal.SIGXFSZ, self.saved[1])


def test_a_failed_write_says_where_and_keeps_the_earlier_checkpoints(run, monkeypatch):
    """A save that cannot write its files says where and why in one line (the CLI prints it, exit 2),
    not as a C++ stream error, and the checkpoints saved before stay intact."""
    from sigma_moe.launch.checkpoint import manager

    limit = _FileSizeLimit(manager.save_experts, 4096)  # the expert files are ~6 KB
    monkeypatch.setattr(manager, "save_experts", limit)
    try:
        with pytest.raises(CheckpointError) as e:
            train_in_process(tiny_config(run, *SIX_STEPS[1:], "training.steps=8", "logging.tensorboard=false"))
    finally:
        limit.restore()
    assert f"could not write the checkpoint of step 8 to {run / 'checkpoints'} (" in str(e.value)
    assert "MiB free there" in str(e.value) and "checkpoints saved before are intact" in str(e.value)
    assert newest_intact(run / "checkpoints") == run / "checkpoints" / "step_00000006"
