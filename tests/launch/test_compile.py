"""training.compile: every Transformer block compiled with torch.compile.

- A σ-MoE block (causal and XL attention) traces into one graph, forward and backward: a fullgraph
  compile succeeds (it would raise at a graph break), Dynamo's explain counts no break, and the CVMM
  calls are in the graph as the torch backend's custom ops. With aot_eager the compiled block runs the
  eager kernels, so outputs, aux loss, routing counts and gradients equal eager ones bit for bit.
- Inductor (generated kernels) on the CPU: three AdamW steps of a tiny model match eager losses within
  a relative 1e-5 (fp32; the fused kernels sum in another order).
- Through the training loop (DeepSpeed's engine): a compiled run resumed from an eager checkpoint
  repeats the eager run's losses exactly (aot_eager), its checkpoint's state dict has the eager names
  (no ``_orig_mod.``), and an eager evaluation of that checkpoint gives the eager run's validation loss.
- Expert parallelism: two ranks with a compiled model (the all-to-all eager between the graphs) train
  like one eager process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from launch_helpers import one_thread, restored_environ, tiny_config, train_in_process
from sigma_moe.layers import TransformerLM


def _model(*overrides: str) -> TransformerLM:
    """The tiny config's model, in training mode, the same weights at every call."""
    cfg = tiny_config(Path("unused"), *overrides)  # only the model section is read
    torch.manual_seed(0)
    return TransformerLM(cfg.model).train()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _block_step(block, h, memory=None, positions=None):
    args = (h,) if memory is None else (h, memory, positions)
    out = block(*args)
    out.square().mean().add(block.ff.aux_loss).backward()
    return out.detach(), block.ff.aux_loss.detach(), block.ff.routing.tokens_per_expert


@pytest.mark.parametrize("attention", ["causal", "xl"])
def test_a_block_is_one_graph_forward_and_backward(attention):
    noisy = ("model.dropout=0.1", "model.ff.expert_dropout=0.1", f"model.attention={attention}")
    eager, compiled = _model(*noisy).blocks[0], _model(*noisy).blocks[0]
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 32, 32, generator=g)
    xl = (torch.randn(2, 32, 32, generator=g), torch.randn(64, 32, generator=g)) if attention == "xl" else ()

    explained = torch._dynamo.explain(eager)(h, *xl)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    # the autograd.Functions' forward and backward are subgraphs (Dynamo traces the backward with the
    # forward, so a break there would count too)
    subgraphs = [m for gm in explained.graphs for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]
    ops = {str(n.target) for m in subgraphs for n in m.graph.nodes if n.op == "call_function"}
    for op in ("gather_mm", "mm_scatter", "mm_scatter_backward", "weight_grad"):
        assert f"sigma_moe.torch_{op}.default" in ops, sorted(ops)
    torch._dynamo.reset()

    compiled.compile(fullgraph=True, backend="aot_eager")  # raises on any graph break
    torch.manual_seed(5)
    want = _block_step(eager, h, *xl)
    torch.manual_seed(5)
    got = _block_step(compiled, h, *xl)
    for w, o in zip(want, got):
        assert torch.equal(w, o)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.slow  # inductor's C++ code generation: ~1 min of CPU time
def test_inductor_losses_match_eager_within_1e_5():
    """Inductor's generated CPU kernels against eager, three AdamW steps on the same batches."""
    losses = {}
    for mode in ("eager", "inductor"):
        model = _model()
        if mode == "inductor":
            model.compile_blocks(fullgraph=True)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(2)
        losses[mode] = []
        with one_thread():
            for _ in range(3):
                x, y = (torch.randint(0, 256, (4, 32), generator=g) for _ in range(2))
                out = model(x)
                loss = F.cross_entropy(out.logits.flatten(0, 1), y.flatten()) + out.aux_loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses[mode].append(loss.item())
    assert losses["inductor"] == pytest.approx(losses["eager"], rel=1e-5), losses
    assert losses["eager"][2] != losses["eager"][0]  # the steps changed the weights


# Four eager steps with the launch tests' schedule (test_distributed_launch.STEPS), checkpoints at 2 and 4:
# what the compiled runs below, resumed or expert-parallel, must repeat. A sixth of the slice keeps each
# run's final evaluation (two ranks: an all-to-all per batch) short.
DATA = "data.max_chars=30000"
EAGER = ("training.steps=4", "training.eval_every=0", "training.log_every=1", "schedule.decay_steps=20", DATA)


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("compile") / "eager"
    return run_dir, train_in_process(tiny_config(run_dir, *EAGER, "checkpoint.every=2", "checkpoint.keep_last=3"))


def test_compiled_training_resumes_eager_checkpoints_and_vice_versa(eager_run, tmp_path):
    eager_dir, eager = eager_run
    ckpt = eager_dir / "checkpoints"
    compiled = train_in_process(
        tiny_config(
            tmp_path / "compiled",
            *EAGER,
            "training.compile=true",
            "training.compile_backend=aot_eager",
            f"checkpoint.resume={ckpt / 'step_00000002'}",
        )
    )
    assert compiled.start_step == 2 and compiled.losses == eager.losses[2:]
    assert compiled.valid.loss == eager.valid.loss

    saved = tmp_path / "compiled" / "checkpoints" / "step_00000004"
    state = torch.load(saved / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    eager_state = torch.load(ckpt / "step_00000004" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert list(state) == list(eager_state) and not any("_orig_mod" in k for k in state)

    from sigma_moe.launch.evaluate import evaluate_checkpoint

    with restored_environ(), one_thread():  # an in-process evaluation joins a one-rank group
        again = evaluate_checkpoint(tiny_config(tmp_path / "eval", DATA), str(saved), splits=("valid",))
    assert again["valid"].loss == eager.valid.loss


@pytest.mark.multiprocess
@pytest.mark.slow
def test_expert_parallel_compiled_trains_like_one_eager_process(eager_run, tmp_path):
    from launcher_runs import STEPS, finish, launch, train_losses

    assert f"schedule.decay_steps={STEPS}" in EAGER  # the schedule launch() sets
    sets = ("training.steps=4", "training.compile=true", "training.compile_backend=aot_eager", DATA)
    finish(launch("torchrun", tmp_path / "ep2", "distributed.expert_parallel_size=2", *sets))
    _, one = eager_run
    ep2 = train_losses(tmp_path / "ep2")
    assert sorted(ep2) == [1, 2, 3, 4]
    for step, loss in ep2.items():
        assert loss == pytest.approx(one.losses[step - 1], rel=1e-4), (step, loss, one.losses)


def test_torch_backend_custom_ops_pass_opcheck():
    """Schema, fake kernels and autograd dispatch of the torch backend's ops agree with the real ones."""
    from sigma_moe.kernels import prepare_selection, torch_ops

    g = torch.Generator().manual_seed(3)
    n, k, e, d, h_dim = 11, 2, 4, 6, 5
    sel = prepare_selection(torch.randint(0, e - 1, (n, k), generator=g), e)  # expert 3 gets no rows
    args = (*torch_ops.selection_args(sel), 4, 2)  # small blocks: several chunks
    x, h = torch.randn(n, d, generator=g), torch.randn(n * k, h_dim, generator=g)
    w, gates, grad_out = torch.randn(e, h_dim, d, generator=g), torch.rand(n * k, generator=g), torch.randn(n, d)
    torch.library.opcheck(torch_ops.gather_mm, (x, w.transpose(1, 2), *args))
    torch.library.opcheck(torch_ops.mm_scatter, (h, w, gates, *args))
    torch.library.opcheck(torch_ops.weight_grad, (x, h, *args, True, False))
    for need in [(True, True, True), (False, True, False)]:
        torch.library.opcheck(torch_ops.mm_scatter_backward, (grad_out, h, w, gates, *args, *need))


def test_inductor_without_a_cxx_compiler_is_a_config_error(tmp_path, monkeypatch):
    from sigma_moe.launch.config_checks import check_world

    cfg = tiny_config(tmp_path / "run", "training.compile=true")
    assert check_world(cfg, 1, "cpu") == []  # g++ is on this machine's PATH
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    (problem,) = check_world(cfg, 1, "cpu")
    assert problem.startswith("training.compile: inductor needs a C++ compiler") and "aot_eager" in problem
    assert (
        check_world(
            tiny_config(tmp_path / "run", "training.compile=true", "training.compile_backend=aot_eager"), 1, "cpu"
        )
        == []
    )


def test_bench_compile_reports_both_modes(tmp_path):
    """The benchmark at toy size (aot_eager: seconds to compile, the eager kernels, equal losses)."""
    import json
    import subprocess
    import sys

    from launch_helpers import ROOT

    out = tmp_path / "bench.json"
    args = ["--backend", "aot_eager", "--steps", "3", "--batch", "2", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_compile.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "speedup (eager / compiled step)" in proc.stdout
    figures = json.loads(out.read_text())
    assert figures["max_rel_loss"] == 0 and len(figures["compiled"]["losses"]) == 3
    assert figures["compiled"]["step_s"] > 0 and figures["eager"]["step_s"] > 0
    assert figures["speedup"] == pytest.approx(figures["eager"]["step_s"] / figures["compiled"]["step_s"])
