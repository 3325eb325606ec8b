"""The user's own DeepSpeed JSON (``deepspeed.config`` / ``--deepspeed_config``), merged with the config
the YAML generates: keys the YAML owns agree or fail with both values named (exit 2), everything else
reaches DeepSpeed unchanged. The engine tests build real DeepSpeed engines (ZeRO-1, ZeRO-2) on the tiny
config and look at what the pass-through keys do: DeepSpeed's CSV and TensorBoard monitors write their
files, the flops profiler writes its profile, ``steps_per_print`` prints progress, the bucket sizes
reach the ZeRO optimizer."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch_helpers import (
    ROOT,
    SLICE,
    TINY,
    one_thread,
    restored_environ,
    tiny_config,
    tiny_overrides,
    train_in_process,
)
from sigma_moe.config_check import ConfigError
from sigma_moe.launch.cli import main
from sigma_moe.launch.config import load_config
from sigma_moe.launch.config_checks import check_world
from sigma_moe.launch.deepspeed_config import deepspeed_config, generated_config
from sigma_moe.launch.optim import config_schedule
from sigma_moe.layers.transformer import TransformerLM


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def tiny_with(tmp_path: Path, ds: dict, *extra: str):
    return tiny_config(tmp_path / "run", f"deepspeed.config={write_json(tmp_path / 'ds.json', ds)}", *extra)


def test_without_a_json_the_yaml_generates_everything(tmp_path):
    cfg = tiny_config(tmp_path / "run", "training.grad_accumulation=2", "training.precision=bf16")
    assert deepspeed_config(cfg, 2) == {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": True},
        "data_types": {"buffer_dtype": "bf16"},
    }


def test_pass_through_keys_reach_deepspeed_unchanged(tmp_path):
    from deepspeed.runtime.config import DeepSpeedConfig

    user = {
        "zero_optimization": {
            "reduce_bucket_size": 40_000,
            "allgather_bucket_size": 50_000,
            "overlap_comm": True,
            "contiguous_gradients": False,
            "offload_optimizer": {"device": "cpu", "pin_memory": False},
        },
        "zero_force_ds_cpu_optimizer": False,
        "fp16": {"initial_scale_power": 12, "loss_scale_window": 500, "hysteresis": 3},
        "flops_profiler": {"enabled": True, "profile_step": 3, "module_depth": 2},
        "tensorboard": {"enabled": True, "output_path": "tb/", "job_name": "ds"},
        "activation_checkpointing": {"partition_activations": True, "number_checkpoints": 2},
        "steps_per_print": 7,
        "wall_clock_breakdown": True,
    }
    cfg = tiny_with(tmp_path, user, "training.precision=fp16", "training.zero_stage=2")
    final = deepspeed_config(cfg, 2)
    ours = generated_config(cfg, 2)
    assert final["zero_optimization"] == {"stage": 2, **user["zero_optimization"]}  # deep-merged under ours
    assert final["fp16"] == {"enabled": True, "initial_scale_power": 12, "loss_scale_window": 500, "hysteresis": 3}
    for key in ("flops_profiler", "tensorboard", "activation_checkpointing", "zero_force_ds_cpu_optimizer"):
        assert final[key] == user[key]
    assert final["steps_per_print"] == 7 and final["wall_clock_breakdown"] is True  # the JSON wins over our defaults
    assert {k: final[k] for k in ours if k not in user} == {k: v for k, v in ours.items() if k not in user}
    # and DeepSpeed's own reader sees them
    ds = DeepSpeedConfig(
        {**final, "train_batch_size": 8, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1}
    )
    assert (ds.zero_config.reduce_bucket_size, ds.zero_config.overlap_comm) == (40_000, True)
    assert (ds.float16_config.initial_scale_power, ds.float16_config.loss_scale_window) == (12, 500)
    assert ds.flops_profiler_config.profile_step == 3 and ds.monitor_config.tensorboard.job_name == "ds"
    assert ds.activation_checkpointing_config.number_checkpoints == 2


def test_auto_takes_the_yamls_values(tmp_path):
    owned_auto = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": "auto"},
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
    }
    cfg = tiny_with(
        tmp_path, owned_auto, "training.grad_accumulation=2", "training.zero_stage=1", "training.precision=bf16"
    )
    assert deepspeed_config(cfg, 2) == {**generated_config(cfg, 2), "fp16": {"enabled": False}}


def test_the_shipped_example_merges(tmp_path):
    cfg = tiny_config(
        tmp_path / "run", f"deepspeed.config={ROOT / 'configs/deepspeed/example.json'}", "training.zero_stage=2"
    )
    final = deepspeed_config(cfg, 2)
    assert (final["train_batch_size"], final["train_micro_batch_size_per_gpu"], final["steps_per_print"]) == (8, 4, 100)
    assert final["zero_optimization"]["stage"] == 2 and final["zero_optimization"]["overlap_comm"] is True


@pytest.mark.parametrize(
    "user, key, json_value, yaml_value",
    [
        ({"train_batch_size": 16}, "train_batch_size", "16", "8"),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps", "2", "1"),
        ({"gradient_clipping": 0.5}, "gradient_clipping", "0.5", "1.0"),
        ({"zero_optimization": {"stage": 2, "overlap_comm": True}}, "zero_optimization.stage", "2", "1"),
        ({"bf16": {"enabled": True}}, "bf16.enabled", "true", "false"),
        ({"bfloat16": {"enabled": True}}, "bf16.enabled", "true", "false"),  # DeepSpeed's old name for bf16
    ],
)
def test_an_owned_key_that_disagrees_fails_with_both_values(tmp_path, capsys, user, key, json_value, yaml_value):
    path = write_json(tmp_path / "ds.json", user)
    args = ["train", str(TINY), "--deepspeed_config", str(path), "--set", "training.zero_stage=1"]
    assert main([*args, *[x for o in tiny_overrides(tmp_path / "run") for x in ("--set", o)]]) == 2
    err = capsys.readouterr().err
    assert f"{key}: the DeepSpeed JSON says {json_value}, but the YAML's training." in err
    assert f"makes it {yaml_value}; make them agree" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()  # refused before any work


def test_micro_batch_is_checked_against_the_world_size(tmp_path):
    cfg = tiny_with(tmp_path, {"train_micro_batch_size_per_gpu": 8})  # right for one rank, not for two
    assert check_world(cfg, 1) == []
    (problem,) = check_world(cfg, 2)
    assert (
        "train_micro_batch_size_per_gpu: the DeepSpeed JSON says 8, but the YAML's training.batch_size (8) "
        "/ (world size 2 × training.grad_accumulation (1)) makes it 4" in problem
    )
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        deepspeed_config(cfg, 2)


@pytest.mark.parametrize(
    "user, expected",
    [
        (
            {"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}},
            "optimizer: not allowed in the DeepSpeed JSON: the YAML's optimizer section builds the optimizer",
        ),
        (
            {"scheduler": {"type": "WarmupLR"}},
            "scheduler: not allowed in the DeepSpeed JSON: the YAML's schedule section",
        ),
        (
            {"zero_optimization": {"reduce_bucket_size": "auto"}},
            'zero_optimization.reduce_bucket_size: "auto" is only understood for the keys the YAML decides',
        ),
        (
            {"zero_optimization": {"reduce_bucket_sise": 5}},
            "DeepSpeed rejects it: ValidationError",
        ),  # DeepSpeed's reader
        ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, 'add "zero_force_ds_cpu_optimizer": false'),
        (
            {"gradient_allreduce_op": "sum"},
            'gradient_allreduce_op: the DeepSpeed JSON says "sum", but expert parallelism',
        ),
        ({"zero_optimization": True}, "zero_optimization: expected a JSON object"),
    ],
)
def test_what_the_yaml_builds_or_deepspeed_rejects_fails_at_load(tmp_path, user, expected):
    with pytest.raises(ConfigError) as e:
        tiny_with(tmp_path, user, "training.zero_stage=2")
    assert expected in str(e.value) and "deepspeed.config (" in str(e.value)


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "no such file (a relative path is taken from the current directory"),
        ("[1, 2]", "expected a JSON object"),
        ('{"steps_per_print": 1,', "not valid JSON"),
        ('{"steps_per_print": 1, "steps_per_print": 2}', "'steps_per_print' appears twice"),
    ],
)
def test_a_bad_json_file_fails_with_exit_2(tmp_path, capsys, monkeypatch, content, expected):
    if content is not None:
        (tmp_path / "ds.json").write_text(content)
    monkeypatch.chdir(tmp_path)  # a relative path is taken from the current directory
    assert main(["size", str(TINY), "--set", "deepspeed.config=ds.json", "--set", f"data.path={SLICE}"]) == 2
    err = capsys.readouterr().err
    assert "deepspeed.config: ds.json: " in err and expected in err


def test_flag_and_yaml_must_name_the_same_file(tmp_path, capsys, monkeypatch):
    a, b = write_json(tmp_path / "a.json", {}), write_json(tmp_path / "b.json", {})
    monkeypatch.chdir(tmp_path)
    same = load_config(
        TINY, [f"deepspeed.config={a}", f"data.path={SLICE}"], deepspeed_config="a.json"
    )  # the same file, spelt relatively
    assert same.deepspeed.config == "a.json"
    assert (
        main(
            [
                "size",
                str(TINY),
                "--set",
                f"deepspeed.config={a}",
                "--deepspeed",
                "--deepspeed_config",
                str(b),
                "--set",
                f"data.path={SLICE}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"--deepspeed_config {b} and the YAML's deepspeed.config {a} name different files" in err


# ---------------------------------------------------------------------------------------------------
# Real engines


def engine_for(cfg):
    from sigma_moe.launch.session import start_session

    with restored_environ(), one_thread():
        return start_session(cfg).engine


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_optimizer_takes_the_jsons_settings(tmp_path, stage):
    user = {
        "zero_optimization": {
            "stage": "auto",
            "reduce_bucket_size": 12_345,
            "allgather_bucket_size": 23_456,
            "overlap_comm": False,
            "contiguous_gradients": stage == 2,
        },
        "activation_checkpointing": {"partition_activations": True, "number_checkpoints": 3},
    }
    engine = engine_for(tiny_with(tmp_path, user, f"training.zero_stage={stage}"))
    opt = engine.optimizer
    assert engine.zero_optimization_stage() == stage and opt.partition_gradients == (stage == 2)
    assert (opt.reduce_bucket_size, opt.allgather_bucket_size) == (12_345, 23_456)
    assert opt.overlap_comm is False and opt.contiguous_gradients == (stage == 2)
    assert engine._config.activation_checkpointing_config.number_checkpoints == 3


def test_deepspeeds_monitors_and_profiler_write_their_files(tmp_path):
    out = tmp_path / "ds-out"
    steps = 3
    user = {
        "csv_monitor": {"enabled": True, "output_path": str(out / "csv"), "job_name": "csv_job"},
        "tensorboard": {"enabled": True, "output_path": str(out / "tb"), "job_name": "tb_job"},
        "flops_profiler": {"enabled": True, "profile_step": 2, "output_file": str(out / "flops.txt")},
    }
    cfg = tiny_with(
        tmp_path,
        user,
        f"training.steps={steps}",
        "training.eval_every=0",
        "training.zero_stage=1",
        "checkpoint.save_final=false",
    )
    result = train_in_process(cfg)
    assert len(result.losses) == steps
    with open(out / "csv" / "csv_job" / "Train_Samples_lr.csv") as f:  # DeepSpeed's lr after each step
        rows = [(int(r["step"]), float(r["lr"])) for r in csv.DictReader(f)]
    schedule = config_schedule(cfg)
    assert rows == [
        (k * cfg.training.batch_size, pytest.approx(cfg.optimizer.lr * schedule(k))) for k in range(1, steps + 1)
    ]
    assert len(list((out / "tb" / "tb_job").glob("events.out.tfevents.*"))) == 1
    profile = (out / "flops.txt").read_text()
    n_params = sum(p.numel() for p in TransformerLM(cfg.model).parameters())
    assert "DeepSpeed Flops Profiler" in profile
    assert re.search(rf"params per GPU:\s+{n_params / 1e3:.2f} K", profile), profile[:1500]


def test_command_line_deepspeed_config_zero2_prints_every_steps_per_print(tmp_path):
    """``python -m sigma_moe.launch.train CONFIG --deepspeed --deepspeed_config ds.json``, as DeepSpeed's
    examples run: ZeRO-2 from the YAML, DeepSpeed's progress line every 2 steps from the JSON."""
    ds = write_json(
        tmp_path / "ds.json",
        {"zero_optimization": {"stage": 2, "reduce_bucket_size": 5000}, "steps_per_print": 2, "log_level": "info"},
    )
    run_dir = tmp_path / "run"
    sets = tiny_overrides(
        run_dir, "training.steps=5", "training.eval_every=0", "training.zero_stage=2", "checkpoint.save_final=false"
    )
    cmd = [
        sys.executable,
        "-m",
        "sigma_moe.launch.train",
        str(TINY),
        "--deepspeed",
        "--deepspeed_config",
        str(ds),
        *[x for s in sets for x in ("--set", s)],
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    progress = [int(s) for s in re.findall(r"step=(\d+), skipped=0, lr=", proc.stdout)]
    assert progress == [0, 2, 4], proc.stdout[-3000:]  # at the start, then every 2 steps (ours: never)
    assert "done: 5 steps" in proc.stdout
