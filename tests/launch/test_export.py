"""``sigma-moe export`` and ``sigma-moe generate`` on a tiny run's checkpoint: the export holds every
expert by global id, loads without DeepSpeed or pickle and gives the checkpoint's logits exactly;
eval and generate read an export as they read a checkpoint; generation works with the byte and the
BPE tokenizer and cuts a long prompt. Multi-process: an export of a checkpoint saved at expert-parallel
size 2 equals the saved expert files by global id, and equals the export of the same weights saved
at size 1."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from launch_helpers import ROOT, TINY, one_thread, restored_environ, tiny_config, tiny_overrides, train_in_process
from sigma_moe.launch.cli import main

# Runs whose only product is a checkpoint: a sixth of the slice keeps their final evaluation short.
EVAL_OFF = ("training.eval_every=0", "data.max_chars=30000")
SHORT = ("training.steps=4", *EVAL_OFF)  # a tiny run's checkpoint


def text_from(stdout: str, prompt: str) -> str:
    """What generate printed from the prompt on (DeepSpeed may log a line to stdout on import)."""
    return stdout[stdout.index(prompt) :]


def sets(run_dir, *extra) -> list[str]:
    return [a for o in tiny_overrides(run_dir, *extra) for a in ("--set", o)]


def cli(*args) -> int:
    with restored_environ(), one_thread():
        return main([str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A short run of the tiny config (bytes), its checkpoints and an export of them."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    train_in_process(tiny_config(run_dir, *SHORT))
    out = run_dir.parent / "exported"
    assert cli("export", TINY, "--checkpoint", run_dir / "checkpoints", "--out", out, *sets(run_dir, *SHORT)) == 0
    return run_dir, out


def test_export_holds_every_expert_by_global_id(tiny_run):
    from safetensors.torch import load_file

    _, out = tiny_run
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # bytes: no tokenizer file
    tensors = load_file(out / "model.safetensors")
    for layer in range(2):
        for g in range(4):
            assert tensors[f"blocks.{layer}.ff.w1.{g}"].shape == (32, 16)
            assert tensors[f"blocks.{layer}.ff.w2.{g}"].shape == (16, 32)
        assert f"blocks.{layer}.ff.w1" not in tensors  # stacks are split by expert
    assert tensors["embedding.weight"].shape == (256, 32)


def test_exported_logits_equal_the_checkpoints(tiny_run):
    from sigma_moe.launch.checkpoint.manager import resolve_checkpoint
    from sigma_moe.launch.checkpoint.weights import load_model_weights
    from sigma_moe.launch.config import config_to_dict
    from sigma_moe.layers import TransformerLM, load_export

    run_dir, out = tiny_run
    cfg = tiny_config(run_dir)
    from_checkpoint = TransformerLM(cfg.model).eval()
    load_model_weights(
        from_checkpoint, resolve_checkpoint(run_dir / "checkpoints"), model_config=config_to_dict(cfg.model)
    )
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_export(out)(tokens).logits, from_checkpoint(tokens).logits)


def test_an_export_loads_without_deepspeed_or_pickle(tiny_run):
    """In a fresh interpreter where unpickling raises, nothing of DeepSpeed gets imported."""
    _, out = tiny_run
    code = (
        "import pickle, sys\n"
        "def refuse(*a, **k): raise AssertionError('something unpickled')\n"
        "pickle.load = pickle.loads = refuse\n"
        "class Refused(pickle.Unpickler):\n"
        "    def __init__(self, *a, **k): refuse()\n"
        "pickle.Unpickler = Refused\n"
        "import torch\n"
        "from sigma_moe.layers import load_export\n"
        f"model = load_export({str(out)!r})\n"
        "logits = model(torch.zeros(1, 4, dtype=torch.long)).logits\n"
        "assert logits.shape == (1, 4, 256), logits.shape\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'deepspeed'], 'deepspeed imported'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_eval_reads_an_export_like_its_checkpoint(tiny_run, capsys):
    run_dir, out = tiny_run
    losses = []
    for source in (run_dir / "checkpoints", out):
        args = ("eval", TINY, "--checkpoint", source, "--split", "valid", "--max-batches", "2")
        assert cli(*args, *sets(run_dir, *EVAL_OFF)) == 0
        losses.append(re.search(r"valid: loss ([\d.]+)", capsys.readouterr().out).group(1))
    assert losses[0] == losses[1]


def test_generate_from_the_checkpoint_and_from_the_export(tiny_run, capsys):
    """The bar: ROMEO:, 60 new tokens, seed 0; the export gives the same text."""
    run_dir, out = tiny_run
    texts = []
    for source in (run_dir / "checkpoints", out):
        args = ("generate", TINY, "--checkpoint", source, "--prompt", "ROMEO:", "--max-new-tokens", 60, "--seed", 0)
        assert cli(*args, *sets(run_dir)) == 0
        printed = capsys.readouterr()
        texts.append(text_from(printed.out, "ROMEO:"))
        assert re.search(r"60 new tokens in [\d.]+ s: [\d.]+ tokens/s \(prompt: 6 tokens", printed.err)
    assert texts[0] == texts[1]
    assert len(texts[0]) >= 40


def test_an_export_generates_without_the_run_config(tiny_run, capsys, tmp_path, monkeypatch):
    """An export carries its model and tokenizer: no CONFIG, and from another folder, where the run's
    relative data path would not resolve; the same text as from the checkpoint. A checkpoint without
    its CONFIG is one line, status 2."""
    run_dir, out = tiny_run
    args = ("--prompt", "ROMEO:", "--max-new-tokens", 60, "--seed", 0)
    assert cli("generate", TINY, "--checkpoint", run_dir / "checkpoints", *args, *sets(run_dir)) == 0
    from_checkpoint = text_from(capsys.readouterr().out, "ROMEO:")
    monkeypatch.chdir(tmp_path)
    assert cli("generate", "--checkpoint", out, *args) == 0
    assert text_from(capsys.readouterr().out, "ROMEO:") == from_checkpoint
    assert cli("generate", "--checkpoint", run_dir / "checkpoints", *args) == 2
    err = capsys.readouterr().err.strip()
    assert "is a checkpoint, not an export: give the CONFIG of its run" in err and len(err.splitlines()) == 1


def test_a_long_prompt_is_cut_with_a_warning(tiny_run, capsys, caplog):
    run_dir, out = tiny_run
    prompt = "O Romeo, Romeo! wherefore art thou Romeo? Deny thy father and refuse thy name."
    assert cli("generate", TINY, "--checkpoint", out, "--prompt", prompt, "--max-new-tokens", 5, *sets(run_dir)) == 0
    assert "the prompt has 78 tokens, more than the model's context (32): only its last 32 are used" in caplog.text
    assert text_from(capsys.readouterr().out, prompt[-32:])


@pytest.mark.parametrize(
    "args,message",
    [
        (("--top-p", "0"), "--top-p 0.0: must be in (0, 1]"),
        (("--max-new-tokens", "0"), "--max-new-tokens 0: must be >= 1"),
        (("--prompt", ""), "--prompt is empty"),
        (("--device", "gpu"), "--device 'gpu': not a torch device"),
    ],
)
def test_bad_generation_input_is_one_line_and_status_2(tiny_run, capsys, args, message):
    run_dir, out = tiny_run
    assert cli("generate", TINY, "--checkpoint", out, "--prompt", "x", *args, *sets(run_dir)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_not_a_checkpoint_nor_an_export(tmp_path, capsys):
    assert cli("export", TINY, "--checkpoint", tmp_path, "--out", tmp_path / "out") == 2
    assert "or an export folder (sigma-moe export" in capsys.readouterr().err


def test_bpe_run_exports_its_tokenizer_and_generates(tmp_path, capsys):
    from sigma_moe.launch.data.tokenizers import BPETokenizer

    run_dir = tmp_path / "bpe"
    bpe = ("data.tokenizer=bpe", "data.vocab_size=512", "model.vocab_size=512", "training.steps=2", *EVAL_OFF)
    train_in_process(tiny_config(run_dir, *bpe))
    out = tmp_path / "exported"
    assert cli("export", TINY, "--checkpoint", run_dir / "checkpoints", "--out", out, *sets(run_dir, *bpe)) == 0
    assert BPETokenizer(out / "tokenizer.model").encode("ROMEO: hark") != []
    os.replace(run_dir, tmp_path / "gone")  # the export alone: no checkpoint, no token cache
    os.replace(tmp_path / "data-cache", tmp_path / "gone-cache")
    texts = []
    for temperature in ("0", "1"):
        args = ("--prompt", "ROMEO:", "--max-new-tokens", 20, "--temperature", temperature, "--top-k", 50)
        assert cli("generate", TINY, "--checkpoint", out, *args, *sets(run_dir, *bpe)) == 0
        texts.append(text_from(capsys.readouterr().out, "ROMEO:"))
    assert all(len(t) > len("ROMEO:\n") for t in texts)


# -- multi-process: a checkpoint saved at expert-parallel size 2 -------------------------------------


@pytest.fixture(scope="module")
def ep2_checkpoint(tmp_path_factory):
    from launcher_runs import finish, launch

    run_dir = tmp_path_factory.mktemp("export-ep2") / "ep2"
    finish(launch("torchrun", run_dir, "distributed.expert_parallel_size=2", "training.steps=3", *EVAL_OFF))
    return run_dir


@pytest.mark.multiprocess
@pytest.mark.slow
def test_export_of_an_expert_parallel_checkpoint(ep2_checkpoint, tmp_path):
    """The EP = 2 export holds the saved expert files by global id and DeepSpeed's module state, and
    equals the export of the same weights saved by one process."""
    from safetensors.torch import load_file

    from sigma_moe.distributed.checkpoint import expert_file
    from sigma_moe.distributed.deepspeed_compat import MODEL_FILE
    from sigma_moe.launch.checkpoint.manager import CheckpointManager, resolve_checkpoint
    from sigma_moe.launch.checkpoint.weights import load_model_weights
    from sigma_moe.launch.export import export_model
    from sigma_moe.launch.session import start_session

    tag = resolve_checkpoint(ep2_checkpoint / "checkpoints")
    cfg = tiny_config(tmp_path / "one", *EVAL_OFF)
    with restored_environ(), one_thread():
        export_model(cfg, tag, tmp_path / "from_ep2")
        s = start_session(cfg)
        try:  # the same weights, saved at expert-parallel size 1
            load_model_weights(s.engine.module, tag, model_config=s.model_config)
            manager = CheckpointManager(tmp_path / "ep1", keep_last=1, model_config=s.model_config)
            manager.save(s.engine, step=3, rank_state={})
        finally:
            s.close()
        export_model(cfg, tmp_path / "ep1", tmp_path / "from_ep1")
    from_ep2 = load_file(tmp_path / "from_ep2" / "model.safetensors")
    from_ep1 = load_file(tmp_path / "from_ep1" / "model.safetensors")
    assert from_ep2.keys() == from_ep1.keys()
    for name in from_ep2:
        assert torch.equal(from_ep2[name], from_ep1[name]), name
    module = torch.load(tag / MODEL_FILE, map_location="cpu", weights_only=True)["module"]
    for layer in range(2):
        for g in range(4):  # rank g // 2 wrote expert g
            saved = torch.load(expert_file(tag, layer, g), weights_only=True)
            for p in ("w1", "w2"):
                assert torch.equal(from_ep2[f"blocks.{layer}.ff.{p}.{g}"], saved[f"blocks.{layer}.ff.{p}.{g}"])
    for name in ("embedding.weight", "blocks.1.ff.selector", "blocks.0.attn.qkv.weight", "output.weight"):
        assert torch.equal(from_ep2[name], module[name]), name
