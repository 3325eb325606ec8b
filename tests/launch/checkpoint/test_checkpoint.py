"""Checkpoints: an exact resume (2N steps in one go == N, resume, N), atomic saves that survive a crash,
pruning to keep_last, and a clear error for a model of another shape."""

from __future__ import annotations

import shutil

import pytest
import torch

from launch_helpers import one_thread, restored_environ, tiny_config, train_in_process
from sigma_moe.distributed.checkpoint import expert_file
from sigma_moe.distributed.deepspeed_compat import MODEL_FILE
from sigma_moe.launch.checkpoint.manager import CheckpointError, CheckpointManager, read_meta, resolve_checkpoint
from sigma_moe.launch.evaluate import evaluate_checkpoint
from sigma_moe.launch.session import start_session

N = 8
# Dropout and expert dropout on, so the resumed run only matches if the RNG state came back too.
NOISY = ("model.dropout=0.1", "model.ff.expert_dropout=0.1", "training.eval_every=0", "training.log_every=4")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ckpt") / "full"
    cfg = tiny_config(run_dir, f"training.steps={2 * N}", "checkpoint.every=4", "checkpoint.keep_last=3", *NOISY)
    return cfg, train_in_process(cfg), run_dir / "checkpoints"


def test_resume_is_bit_exact(full_run, tmp_path):
    _, full, ckpt = full_run
    cfg = tiny_config(
        tmp_path / "resumed", f"training.steps={2 * N}", f"checkpoint.resume={ckpt / f'step_{N:08d}'}", *NOISY
    )
    resumed = train_in_process(cfg)
    assert resumed.start_step == N and len(resumed.losses) == N
    assert resumed.losses == full.losses[N:]  # exact float equality: model, optimizer, schedule, data, RNG
    assert resumed.valid.loss == full.valid.loss
    assert full.losses[N] != full.losses[N - 1]


def test_resume_is_bit_exact_with_zero2_bf16_and_accumulation(tmp_path):
    mixed = ("training.precision=bf16", "training.zero_stage=2", "training.grad_accumulation=2", *NOISY)
    full = train_in_process(tiny_config(tmp_path / "full", "training.steps=6", "checkpoint.every=3", *mixed))
    ckpt = tmp_path / "full" / "checkpoints" / "step_00000003"
    assert (ckpt / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()  # ZeRO's optimizer shard
    resumed = train_in_process(
        tiny_config(tmp_path / "resumed", "training.steps=6", f"checkpoint.resume={ckpt}", *mixed)
    )
    assert resumed.start_step == 3 and resumed.losses == full.losses[3:]


def test_resume_with_more_steps_follows_the_new_schedule(full_run, tmp_path, caplog):
    """Extending a run (more steps, so a longer cosine): the learning rate from the resumed step on is
    the new schedule's, not the old one's tail at min_lr."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sigma_moe.launch.optim import config_schedule

    _, _, ckpt = full_run
    run_dir = tmp_path / "longer"
    cfg = tiny_config(
        run_dir,
        f"training.steps={2 * N + 3}",
        f"schedule.decay_steps={4 * N}",
        "training.log_every=1",
        "training.eval_every=0",
        "checkpoint.save_final=false",
        f"checkpoint.resume={ckpt / f'step_{2 * N:08d}'}",
    )
    resumed = train_in_process(cfg)
    assert resumed.start_step == 2 * N
    acc = EventAccumulator(str(run_dir / run_dir.name))  # events: RUN_DIR/<run name>
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("train/lr")}  # after step s: the lr of step s + 1
    schedule = config_schedule(cfg)
    for step in range(2 * N + 1, 2 * N + 4):
        assert logged[step] == pytest.approx(cfg.optimizer.lr * schedule(step), rel=1e-6)
    assert logged[2 * N + 1] > 0.3 * cfg.optimizer.lr  # mid-cosine, not the old schedule's end (0 here)
    assert "the learning rate follows the config" in caplog.text


def test_keep_last_prunes_old_checkpoints(full_run):
    _, _, ckpt = full_run
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step_")) == [
        "step_00000008",
        "step_00000012",
        "step_00000016",
    ]
    assert resolve_checkpoint(ckpt) == ckpt / "step_00000016"
    # per-rank state beside DeepSpeed's files, and one file per (routed layer, expert)
    tag = ckpt / "step_00000016"
    assert (tag / "rank_00000.pt").is_file() and (tag / "mp_rank_00_model_states.pt").is_file()
    assert len(list(tag.glob("layer_*_expert_*_model_states.pt"))) == 2 * 4


class _CrashingHook:
    def save(self, engine, tag_dir):
        assert (tag_dir / MODEL_FILE).is_file()  # DeepSpeed has written its part
        assert expert_file(tag_dir, 1, 3).is_file()  # and the manager the expert files
        raise RuntimeError("simulated crash during the save")


def test_crash_during_save_leaves_previous_checkpoint(full_run, tmp_path):
    cfg, _, source = full_run
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(source, ckpt)
    model_cfg = read_meta(ckpt / "step_00000016")["model"]
    with restored_environ(), one_thread():
        s = start_session(cfg)
        crashing = CheckpointManager(ckpt, keep_last=3, model_config=model_cfg, hooks=[_CrashingHook()])
        with pytest.raises(RuntimeError, match="simulated crash"):
            crashing.save(s.engine, step=99, rank_state={"note": "never visible"})
        assert (ckpt / ".tmp-step_00000099").is_dir()  # the half-written save
        assert not (ckpt / "step_00000099").exists()
        assert crashing.latest() == ckpt / "step_00000016" == resolve_checkpoint(ckpt)

        with torch.no_grad():
            for p in s.engine.module.parameters():
                p.zero_()
        state = crashing.load(s.engine, crashing.latest())
        assert state["step"] == 16
        saved = torch.load(ckpt / "step_00000016" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        for name, p in s.engine.module.named_parameters():
            assert torch.equal(p, saved[name]), name

        manager = CheckpointManager(ckpt, keep_last=2, model_config=model_cfg)
        manager.save(s.engine, step=100, rank_state={})
    assert not (ckpt / ".tmp-step_00000099").exists()  # cleaned up by the next save
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step_")) == ["step_00000016", "step_00000100"]
    assert (ckpt / "latest").read_text() == "step_00000100"


def test_a_manager_built_with_its_defaults_saves_a_checkpoint_that_loads(full_run, tmp_path):
    """The expert files are the manager's own, not an option: DeepSpeed saves the module of data-parallel
    rank 0 only, and the load reads every expert from its file."""
    cfg, _, _ = full_run
    with restored_environ(), one_thread():
        s = start_session(cfg)
        try:
            saved = {n: p.detach().clone() for n, p in s.engine.module.named_parameters()}
            tag = CheckpointManager(tmp_path / "ck", keep_last=1, model_config=s.model_config).save(
                s.engine, step=5, rank_state={}
            )
            experts = {expert_file(tag, layer, e).name for layer in range(2) for e in range(4)}
            assert {p.name for p in tag.glob("layer_*")} == experts
            with torch.no_grad():
                for p in s.engine.module.parameters():
                    p.zero_()
            state = CheckpointManager(tmp_path / "ck", keep_last=1, model_config=s.model_config).load(s.engine, tag)
            loaded = {n: p.detach().clone() for n, p in s.engine.module.named_parameters()}
        finally:
            s.close()
    assert state["step"] == 5
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[n], saved[n]) for n in saved)


def test_other_shape_fails_naming_the_mismatch(full_run, tmp_path):
    _, _, ckpt = full_run
    cfg = tiny_config(tmp_path / "wider", "model.ff.n_experts=8")
    with restored_environ(), one_thread(), pytest.raises(CheckpointError) as e:
        evaluate_checkpoint(cfg, str(ckpt))
    msg = str(e.value)
    assert "another shape" in msg
    assert "model.ff.n_experts: checkpoint 4, this run 8" in msg
    assert "blocks.0.ff" in msg and "[4, 32]" in msg and "[8, 32]" in msg  # the selector's shapes


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("step_00000005")
    with pytest.raises(CheckpointError, match="latest names step_00000005, which does not exist"):
        resolve_checkpoint(tmp_path)


def _build_managers(rank: int, world_size: int, directory: str) -> dict:
    try:
        CheckpointManager(directory, keep_last=1, model_config={})
        refused = ""
    except ValueError as e:
        refused = str(e)
    manager = CheckpointManager(directory, keep_last=1, model_config={}, rank=rank, world_size=world_size)
    return {"refused": refused, "rank": manager.rank}


@pytest.mark.multiprocess
def test_a_manager_left_at_one_process_in_a_job_of_two_is_refused(tmp_path):
    """Every rank of such a manager would act as rank 0 (write meta.json, prune): refused, naming the fix;
    with its rank and world size passed it is built."""
    from ranks import run_ranks

    got = run_ranks(_build_managers, 2, str(tmp_path / "ck"), timeout=120)
    assert [g["rank"] for g in got] == [0, 1]
    assert all("pass its rank and world_size" in g["refused"] for g in got), got
