"""The ``sigma-moe`` command line: size figures against independent formulas, errors as one message
with exit status 2, the ``python -m sigma_moe.launch.train`` entry (with the deepspeed launcher's
``--local_rank``) in a real process, and ``eval`` of the checkpoint it wrote."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch_helpers import ROOT, TINY, one_thread, restored_environ, tiny_overrides
from sigma_moe.launch.cli import main, one_line, parse_args
from sigma_moe.launch.config import load_config
from sigma_moe.layers.transformer import TransformerLM


def _figure(text: str, label: str) -> str:
    m = re.search(rf"{label}: ([\d,.%]+)", text)
    assert m, f"{label!r} not in:\n{text}"
    return m.group(1).replace(",", "")


def test_size_of_tiny_matches_formulas(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["size", str(TINY), "--set", "model.ff.n_experts=6"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(TINY, ["model.ff.n_experts=6"])
    d, L, (n_e, g, k) = cfg.model.d_model, cfg.model.n_layers, (6, cfg.model.ff.expert_size, cfg.model.ff.k)
    params = sum(p.numel() for p in TransformerLM(cfg.model).parameters())
    assert int(_figure(out, "parameters")) == params
    # paper: σ-MoE MLP FLOPs = K·G·d·2·2 + N_E·d·2 per layer
    assert int(_figure(out, "MLP FLOPs per token")) == L * (4 * k * g * d + 2 * n_e * d)
    # dense layer with biases: d_ff·(2d + 1) + d parameters == σ-MoE's N_E·(2·d·G + d)
    assert int(_figure(out, "parameter-equal dense d_ff")) == round((n_e * (2 * d * g + d) - d) / (2 * d + 1))


def test_size_of_paper_sigma_moe(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["size", "configs/paper/wt103-47m-sigma-moe.yaml"]) == 0
    out = capsys.readouterr().out
    assert _figure(out, "parameter-equal dense d_ff") == "2053"  # the paper's figure
    # 4·128·412·4 + 16·412·2 over the dense 2053's 2·2·412·2053: about a quarter
    assert (
        _figure(out, "MLP FLOPs vs that dense model") == f"{(4 * 4 * 128 * 412 + 2 * 16 * 412) / (4 * 412 * 2053):.1%}"
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["size", "configs/tiny.yaml", "--set", "model.ff.k=9"], "k"),
        (["size", "configs/tiny.yaml", "--set", "training.batch_sise=4"], "did you mean 'training.batch_size'"),
        (["train", "configs/nope.yaml"], "does not exist"),
        (["eval", "configs/tiny.yaml", "--checkpoint", "configs"], "is not a checkpoint"),
        (
            ["size", "configs/tiny.yaml", "--set", "training.steps=0", "--set", "optimizer.lr=-1"],
            "invalid config: optimizer.lr = -1.0: must be > 0; training.steps",
        ),  # a list of problems, on one line
    ],
)
def test_bad_input_is_one_message_and_status_2(args, expected, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sigma-moe {args[0]}: error:") and expected in err
    assert "Traceback" not in err
    assert err.count("\n") == 1  # one line


def test_size_and_config_do_not_import_deepspeed():
    """They need no distributed engine: no DeepSpeed import (its accelerator probe and op build messages)."""
    code = (
        "import sys\n"
        "from sigma_moe.launch.cli import main\n"
        f"assert main(['size', {str(TINY)!r}]) == 0 and main(['config', 'training']) == 0\n"
        "print('imported:', sorted(m for m in ('deepspeed', 'sigma_moe.distributed') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parameters:" in proc.stdout and "imported: []" in proc.stdout, proc.stdout[-2000:]


def test_a_deepspeed_outside_the_range_is_one_line_and_status_2(tmp_path):
    """The installed DeepSpeed reporting another version: the command says which range and how to opt in."""
    code = (
        "import sys, deepspeed\n"
        "deepspeed.__version__ = '0.17.0'\n"
        "from sigma_moe.launch.cli import process_main\n"
        f"sys.exit(process_main(['train', {str(TINY)!r}, '--set', 'logging.run_dir={tmp_path}/run']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SIGMA_MOE_ALLOW_ANY_DEEPSPEED"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = proc.stderr.split("sigma-moe train: error: ", 1)[1]
    assert message.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "DeepSpeed 0.17.0 is outside the range sigma-moe supports (0.18.9 to 0.19.8)" in message
    assert "SIGMA_MOE_ALLOW_ANY_DEEPSPEED=1" in message
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_one_line():
    assert one_line(ValueError("invalid config:\n  - a.b: bad\n  - c: worse")) == "invalid config: a.b: bad; c: worse"
    assert one_line(ValueError("x is wrong\nfix it")) == "x is wrong; fix it"
    assert one_line(ValueError("plain")) == "plain"


def test_parser_accepts_the_launchers_local_rank_anywhere():
    """``deepspeed $(which sigma-moe) train CONFIG`` runs ``sigma-moe --local_rank=N train CONFIG``."""
    assert parse_args(["--local_rank=3", "train", "c.yaml"]).local_rank == 3
    assert parse_args(["train", "c.yaml", "--local_rank=3"]).local_rank == 3
    args = parse_args(["eval", "--local-rank", "1", "c.yaml", "--checkpoint", "x"])
    assert (args.local_rank, args.config, args.checkpoint) == (1, "c.yaml", "x")
    assert parse_args(["size", "c.yaml"]).local_rank is None
    with pytest.raises(SystemExit):  # not a number: the parser says so
        parse_args(["train", "c.yaml", "--local_rank=x"])


def test_local_rank_before_the_command(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with restored_environ():
        assert main(["--local_rank=0", "size", str(TINY)]) == 0
    assert "parameters:" in capsys.readouterr().out


def test_module_entry_trains_and_eval_reads_its_checkpoint(tmp_path, capsys, monkeypatch):
    """Also: its log, redirected (here to a pipe) with the bar on as by default, has one plain line per
    logging interval and no carriage return; the same command again says the run had finished."""
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, "training.steps=4", "training.eval_every=0", "training.log_every=2")
    cmd = [sys.executable, "-m", "sigma_moe.launch.train", str(TINY), "--local_rank=0"]
    for o in [*overrides, "logging.progress_bar=true"]:
        cmd += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = re.search(r"valid loss ([\d.]+), perplexity ([\d.]+)", proc.stdout)
    assert printed, proc.stdout
    assert "unigram baseline: valid perplexity" in proc.stdout
    assert "smoke run, 1,024 training tokens" in proc.stdout  # 4 steps end above the unigram baseline
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"
    assert "\r" not in proc.stdout + proc.stderr  # no progress-bar redraws in a log
    progress = re.findall(
        r"^step (\d+)/4 \| loss [\d.]+ \| [\d,]+ tokens/s \| elapsed \S+ \| ETA \S+$", proc.stdout, re.M
    )
    assert progress == ["2", "4"], proc.stdout  # one line per logging interval (log_every 2)

    monkeypatch.chdir(ROOT)
    with restored_environ(), one_thread():
        args = ["eval", str(TINY), "--checkpoint", str(run_dir / "checkpoints"), "--split", "valid"]
        for o in overrides:
            args += ["--set", o]
        assert main(args) == 0
    out = capsys.readouterr().out
    evaluated = re.search(r"valid: loss ([\d.]+), perplexity ([\d.]+)", out)
    assert evaluated, out
    assert evaluated.groups() == printed.groups()  # same weights, same full validation split
    assert torch.get_num_threads() >= 1

    with restored_environ(), one_thread():  # the same command again: nothing to train, and it says so
        assert main(["train", str(TINY), *[a for o in overrides for a in ("--set", o)]]) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"^already finished: \S+checkpoints holds step 4 of training.steps 4, nothing to train ", out, re.M
    )
    assert not re.search(r"^step \d", out, re.M)  # no training step


def test_an_unavailable_corpus_is_one_line_and_status_2(tmp_path):
    """A hub corpus with the hub offline: the command says how to get it, in one line, status 2."""
    cmd = [str(Path(sys.executable).with_name("sigma-moe")), "train", str(TINY)]
    for o in tiny_overrides(tmp_path / "run", "data.dataset=wikitext103", "data.path=null"):
        cmd += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = proc.stderr.split("sigma-moe train: error: ", 1)[1]
    assert message.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "data.dataset=wikitext103: could not load" in message and "wiki.train.raw" in message


def test_config_lists_every_key_with_type_default_and_doc(capsys):
    from sigma_moe.config_schema import config_keys
    from sigma_moe.launch.config import RunConfig

    keys = list(config_keys(RunConfig))
    assert [k.key for k in keys if not k.doc] == []  # every field has its docstring
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "training.steps: int, default 1000\n    Optimizer steps.\n" in out
    assert "model.ff.entropy_reg: float, default 0.001  [kind: sigma_moe]\n    γ of the load-balancing" in out
    assert "model.ff.k: int, default 1  [kind: switch]" in out and "data.dataset: str, default 'shakespeare'" in out
    assert out.count("\n    ") >= len(keys) and all(f"{k.key}: " in out for k in keys)
    assert main(["config", "distributed"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("distributed.expert_parallel_size: int, default 1") and "training." not in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "sigma-moe config" in capsys.readouterr().out


def test_board_starts_tensorboard_with_the_loader_that_keeps_descriptions(tmp_path, capsys, monkeypatch):
    started = []
    monkeypatch.setattr(os, "execv", lambda path, argv: started.append(argv))
    main(["board", str(tmp_path), "--port", "6007"])  # execv: TensorBoard would replace the process
    (argv,) = started
    assert argv[1:5] == ["-m", "tensorboard.main", "--logdir", str(tmp_path)]
    assert "--load_fast=false" in argv and argv[-2:] == ["--port", "6007"]  # the rest goes to TensorBoard
    assert main(["board", str(tmp_path / "missing")]) == 2
    assert "no folder" in capsys.readouterr().err
