"""Run config: YAML -> typed dataclasses, base includes, --set overrides, errors that name key and fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launch_helpers import ROOT
from sigma_moe.launch.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from sigma_moe.launch.config_checks import check_world
from sigma_moe.layers.sizing import parameter_equal_dense_d_ff

TINY = ROOT / "configs" / "tiny.yaml"
PAPER = ROOT / "configs" / "paper"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name data paths relative to the repository root


def _tiny(*overrides: str) -> RunConfig:
    return load_config(TINY, list(overrides))


def _error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        _tiny(*overrides)
    return str(e.value)


def test_tiny_loads_into_typed_sections():
    cfg = _tiny()
    assert type(cfg.model.ff).__name__ == "SigmaMoEConfig"
    assert (cfg.model.ff.n_experts, cfg.model.ff.expert_size, cfg.model.ff.k) == (4, 16, 2)
    assert cfg.model.vocab_size == cfg.data.vocab_size == 256  # filled in from the data section
    assert cfg.optimizer.betas == (0.9, 0.999) and isinstance(cfg.optimizer.betas, tuple)
    assert cfg.training.steps == 30 and cfg.training.precision == "fp32"
    assert cfg.checkpoint_dir == Path("runs/tiny/checkpoints")


def test_set_overrides_parse_yaml_values():
    cfg = _tiny(
        "training.steps=7",
        "optimizer.lr=1e-3",
        "optimizer.betas=[0.8, 0.95]",
        "model.ff.n_experts=8",
        "checkpoint.dir=null",
        "logging.tensorboard=false",
    )
    assert cfg.training.steps == 7
    assert cfg.optimizer.lr == 1e-3  # YAML 1.1 reads "1e-3" as text; a float field takes it
    assert cfg.optimizer.betas == (0.8, 0.95)
    assert cfg.model.ff.n_experts == 8 and cfg.model.ff.k == 2  # the other ff keys stay
    assert cfg.checkpoint.dir is None and cfg.logging.tensorboard is False


def test_set_switching_ff_kind_drops_the_old_variant_keys():
    cfg = _tiny("model.ff.kind=dense", "model.ff.d_ff=64")
    assert type(cfg.model.ff).__name__ == "DenseConfig" and cfg.model.ff.d_ff == 64
    cfg = _tiny("model.ff={kind: topk_mlp, d_ff: 64, k: 8}")
    assert (cfg.model.ff.kind, cfg.model.ff.k) == ("topk_mlp", 8)


def test_base_include_deep_merges(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {
                    "d_model": 16,
                    "n_layers": 1,
                    "n_heads": 2,
                    "context": 8,
                    "ff": {"kind": "sigma_moe", "n_experts": 4, "expert_size": 8, "k": 2},
                },
                "data": {
                    "dataset": "text",
                    "path": str(ROOT / "tests/data/shakespeare_slice.txt"),
                    "tokenizer": "bytes",
                    "vocab_size": 256,
                },
                "training": {"batch_size": 4, "steps": 3},
            }
        )
    )
    (tmp_path / "run.yaml").write_text("base: sub/base.yaml\nmodel: {ff: {k: 3}}\ntraining: {steps: 5}\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert (cfg.model.ff.k, cfg.model.ff.n_experts, cfg.training.steps, cfg.training.batch_size) == (3, 4, 5, 4)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "loop.yaml")


def test_saved_config_reads_back_equal(tmp_path):
    cfg = _tiny("model.ff.n_experts=8", "optimizer.betas=[0.8, 0.9]")
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.ff.n_expert=4", ["unknown key 'model.ff.n_expert'", "did you mean 'model.ff.n_experts'"]),
        ("training.stepz=3", ["unknown key 'training.stepz'", "did you mean 'training.steps'"]),
        ("training.steps=1.5", ["training.steps", "expected an integer"]),
        ("training.precision=fp8", ["training.precision", "choose one of ['fp32', 'bf16', 'fp16']"]),
        ("logging.tensorboard=yes please", ["logging.tensorboard", "expected true or false"]),
        ("optimizer.betas=[0.9]", ["optimizer.betas", "expected 2 values"]),
        ("model.ff.k=5", ["model.ff", "k", "cannot exceed n_experts"]),
        ("model.ff.expert_size=0", ["model.ff", "expert_size"]),
        ("model.ff.kind=moe", ["model.ff.kind", "unknown feedforward kind 'moe'", "sigma_moe"]),
        ("model.n_heads=3", ["model", "n_heads", "does not divide d_model"]),
        ("data.path=null", ["data.path", "needs data.path"]),
        ("data.path=no/such/file.txt", ["no/such/file.txt"]),
        ("training.grad_accumulation=3", ["training.batch_size", "not divisible by training.grad_accumulation=3"]),
        ("training.zero_stage=3", ["training.zero_stage", "use 0, 1 or 2"]),
        ("schedule.min_lr=1.0", ["schedule.min_lr", "must be in [0, optimizer.lr"]),
        ("schedule.warmup_steps=-1", ["schedule.warmup_steps", "must be >= 0"]),
        (
            "distributed.expert_parallel_size=3",
            ["distributed.expert_parallel_size", "does not divide model.ff.n_experts=4"],
        ),
        ("checkpoint.resume=/no/such/ckpt", ["checkpoint.resume", "does not exist"]),
        ("checkpoint.keep_last=0", ["checkpoint.keep_last", "must be > 0"]),
        ("optimizer.lr=.inf", ["optimizer.lr", "must be a finite number, got inf"]),
        ("training.grad_clip=.nan", ["training.grad_clip", "must be a finite number"]),
        ("training.seed=-1", ["training.seed", "must be in [0, 2**32)"]),
        ("checkpoint.dir=configs/tiny.yaml", ["checkpoint.dir", "is a file, not a folder"]),
        ("logging.run_dir=README.md", ["logging.run_dir", "is a file, not a folder"]),
    ],
)
def test_bad_values_name_the_key_and_the_fix(override, expected):
    msg = _error(override)
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_several_problems_are_reported_together():
    msg = _error("training.grad_accumulation=3", "checkpoint.keep_last=0")
    assert "training.batch_size" in msg and "checkpoint.keep_last" in msg


def test_malformed_set_and_missing_sections(tmp_path):
    assert "expected KEY=VALUE" in _error("training.steps")
    assert "is 30, not a section" in _error("training.steps.x=1")
    (tmp_path / "nomodel.yaml").write_text("data: {dataset: shakespeare}\n")
    with pytest.raises(ConfigError, match="missing section 'model'"):
        load_config(tmp_path / "nomodel.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_world_size_checks():
    cfg = _tiny("training.grad_accumulation=2")  # batch 8
    assert check_world(cfg, 2) == [] and check_world(cfg, 4) == []
    (problem,) = check_world(cfg, 3)
    assert "training.batch_size" in problem and "multiple of 6" in problem
    cfg = _tiny("distributed.expert_parallel_size=2", "training.batch_size=6")
    assert any("expert_parallel_size = 2 must divide the number of processes (3)" in p for p in check_world(cfg, 3))
    assert any("needs 2 or more processes, this job has 1" in p for p in check_world(cfg, 1))
    cfg = _tiny("training.precision=fp16")
    assert check_world(cfg, 1) == [] and check_world(cfg, 1, "cuda") == []
    assert check_world(cfg, 1, "cpu") == [
        "training.precision: fp16 needs a GPU (DeepSpeed's loss scaler); use bf16 or fp32 on CPU"
    ]
    assert check_world(cfg, 2) == []


def test_default_config_loads():
    cfg = load_config(ROOT / "configs" / "default.yaml")
    assert cfg.model.ff.kind == "sigma_moe" and cfg.data.dataset == "shakespeare"


PAPER_MODELS = {  # docs/paper.md table: d_model, layers, context, batch, dropout, σ-MoE N_E, dense d_ff
    "wt103-47m": (412, 16, 256, 64, 0.1, 16, 2053),
    "c4-47m": (412, 16, 256, 64, 0.1, 16, 2053),
    "pes2o-47m": (412, 16, 256, 64, 0.1, 16, 2053),
    "enwik8-41m": (512, 12, 512, 32, 0.1, 16, 2053),
    "wt103-262m": (1024, 18, 512, 64, 0.2, 32, 4110),
}
VARIANTS = {
    "dense": "dense",
    "sigma-moe": "sigma_moe",
    "switch": "switch",
    "sbase": "sbase",
    "pkm": "pkm",
    "topk": "topk_mlp",
}


@pytest.mark.parametrize("model", sorted(PAPER_MODELS))
def test_paper_configs_follow_the_paper(model):
    d, layers, context, batch, dropout, n_e, dense_d_ff = PAPER_MODELS[model]
    for variant, kind in VARIANTS.items():
        cfg = load_config(PAPER / f"{model}-{variant}.yaml")
        m, t, o = cfg.model, cfg.training, cfg.optimizer
        assert (m.d_model, m.n_layers, m.context, m.dropout, t.batch_size) == (d, layers, context, dropout, batch)
        assert m.ff.kind == kind
        assert (o.lr, o.betas, t.grad_clip, t.steps, cfg.schedule.min_lr) == (2.5e-4, (0.9, 0.999), 0.25, 100000, 0.0)
        assert cfg.schedule.warmup_steps == (4000 if model == "wt103-262m" else 0)
        assert cfg.logging.run_dir == f"runs/paper/{model}-{variant}"
        if kind in ("dense", "topk_mlp"):
            assert m.ff.d_ff == dense_d_ff
        if kind in ("sigma_moe", "sbase"):
            assert (m.ff.n_experts, m.ff.expert_size, m.ff.k) == (n_e, 128, 4)
            # the dense baseline is parameter-equal to σ-MoE (the paper rounds 4109.4 up to 4110)
            assert abs(parameter_equal_dense_d_ff(m.ff, d) - dense_d_ff) <= 1
        if kind == "switch":
            assert (m.ff.n_experts, m.ff.expert_size, m.ff.k) == (n_e // 4, 512, 1)
    moe = load_config(PAPER / f"{model}-sigma-moe.yaml").model.ff
    assert moe.entropy_reg == (1e-4 if model.startswith("enwik8") else 1e-3)
