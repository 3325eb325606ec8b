"""Activation checkpointing: recomputing each block in backward changes nothing but memory and time.

Compared with and without it, in fp32 with every dropout on (embedding/residual, attention, expert
hidden units, σ-MoE's expert dropout): logits, aux loss, every gradient, the routing statistics the
monitor reads; for the dense and σ-MoE LMs, causal and Transformer-XL (with memory), in one process
and on 2 expert-parallel ranks (the recompute reruns the all-to-all and the all-reduce); and a tiny
training run through the CLI config. A forward-call count shows the recompute really happens.
"""

from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch_helpers import one_thread, tiny_config, train_in_process
from ranks import run_ranks
from sigma_moe.layers import DenseConfig, SigmaMoEConfig, TransformerConfig, TransformerLM

SIGMA = SigmaMoEConfig(n_experts=8, expert_size=6, k=3, expert_dropout=0.2, dropout=0.1, entropy_reg=0.5)
DENSE = DenseConfig(d_ff=24, dropout=0.1)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # tiny tensors: extra threads only wait for each other on a busy machine
        yield


def lm(ff, attention: str = "causal", seed: int = 0, *, checkpointing: bool = False) -> TransformerLM:
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        vocab_size=23,
        d_model=16,
        n_layers=3,
        n_heads=2,
        context=8,
        ff=ff,
        dropout=0.1,
        attention_dropout=0.1,
        attention=attention,
    )
    return TransformerLM(cfg, activation_checkpointing=checkpointing).train()


def count_block_calls(model: TransformerLM) -> list[int]:
    calls = [0]
    for block in model.blocks:
        block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def step(model: TransformerLM, tokens: torch.Tensor, memory=None, seed: int = 7) -> dict:
    """One forward (two segments for xl: the second reads the first's memory) and backward; what
    must not change. Same seed: the same dropout masks if the recompute replays the RNG."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    if memory is None:
        out = model(tokens)
    else:
        out = model(tokens.flip(0), model(tokens, memory).memory)
    logits, aux, mem_out = out.logits, out.aux_loss, out.memory or []
    forward_aux = [ff.aux_loss for ff in model.feedforward_layers()]
    (logits.square().mean() + aux).backward()
    return {
        "logits": logits.detach(),
        "aux": aux.detach(),
        "memory": [m.clone() for m in mem_out],
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "routing": [
            None
            if ff.routing is None
            else (ff.routing.tokens_per_expert.clone(), ff.routing.mean_probs.clone(), ff.routing.n_tokens)
            for ff in model.feedforward_layers()
        ],
        # the layers still hold the aux loss of the real forward, not a recomputed one with its graph
        "aux_kept": all(ff.aux_loss is a for ff, a in zip(model.feedforward_layers(), forward_aux)),
    }


def assert_same(a: dict, b: dict) -> None:
    torch.testing.assert_close(a["logits"], b["logits"], rtol=0, atol=0)
    torch.testing.assert_close(a["aux"], b["aux"], rtol=0, atol=0)
    torch.testing.assert_close(a["memory"], b["memory"], rtol=0, atol=0)
    assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) > 10
    for name in a["grads"]:
        torch.testing.assert_close(a["grads"][name], b["grads"][name], rtol=1e-6, atol=1e-9, msg=name)
    assert len(a["routing"]) == len(b["routing"])
    for ra, rb in zip(a["routing"], b["routing"]):
        assert (ra is None) == (rb is None)
        if ra is not None:
            assert torch.equal(ra[0], rb[0]) and torch.equal(ra[1], rb[1]) and ra[2] == rb[2]


@pytest.mark.parametrize("attention", ["causal", "xl"])
@pytest.mark.parametrize("ff", [SIGMA, DENSE], ids=["sigma_moe", "dense"])
def test_recompute_gives_the_same_losses_gradients_and_routing(ff, attention):
    plain = lm(ff, attention)
    ckpt = lm(ff, attention, checkpointing=True)  # the same seed: the same weights
    calls = count_block_calls(ckpt)
    tokens = torch.randint(0, 23, (4, 8))
    memory = plain.empty_memory(4) if attention == "xl" else None
    want, got = step(plain, tokens, memory), step(ckpt, tokens, memory)
    assert_same(want, got)
    segments = 1 if memory is None else 2
    assert calls[0] == (segments + 1) * 3  # each segment's forward, and the last one's recompute
    assert got["aux_kept"]
    if ff is SIGMA:
        assert float(got["aux"]) != 0 and got["routing"][0][0].sum() == 4 * 8 * 3
        # the masks matter: another seed gives other routing, so equal routing above is no accident
        other = step(lm(ff, attention), tokens, memory, seed=8)
        assert not torch.equal(other["logits"], want["logits"])


def test_no_recompute_without_grad():
    model = lm(SIGMA, checkpointing=True).eval()
    calls = count_block_calls(model)
    tokens = torch.randint(0, 23, (2, 8))
    with torch.no_grad():
        logits = model(tokens).logits
        torch.testing.assert_close(lm(SIGMA).eval()(tokens).logits, logits, rtol=0, atol=0)
    assert calls[0] == 3  # each block once: no recompute


# ---------------------------------------------------------------- 2 expert-parallel ranks (gloo)


def _expert_parallel(rank: int, world: int) -> dict:
    from dataclasses import dataclass

    from sigma_moe.distributed import parallelize

    @dataclass
    class EP:
        expert_parallel_size: int = 2
        transport: str = "torch"

    torch.set_num_threads(1)
    out = {}
    for attention in ("causal", "xl"):
        plain = parallelize(lm(SIGMA, attention), EP())
        ckpt = parallelize(lm(SIGMA, attention, checkpointing=True), EP())
        g = torch.Generator().manual_seed(100 + rank)
        tokens = torch.randint(0, 23, (2 + rank, 8), generator=g)  # another batch size on each rank
        memory = plain.empty_memory(tokens.shape[0]) if attention == "xl" else None
        out[attention] = (step(plain, tokens, memory, seed=rank), step(ckpt, tokens, memory, seed=rank))
    return out


@pytest.mark.multiprocess
def test_two_expert_parallel_ranks_recompute_their_all_to_alls():
    for rank, result in enumerate(run_ranks(_expert_parallel, 2, timeout=120)):
        for want, got in result.values():
            assert_same(want, got)
            assert got["aux_kept"]
            assert got["routing"][0][0].sum() == (2 + rank) * 8 * 3  # this rank's tokens × k


# ---------------------------------------------------------------- through the run config


@pytest.mark.parametrize("attention", ["causal", "xl"])
def test_training_run_is_the_same_with_checkpointing(tmp_path, attention):
    runs = {}
    for flag in (False, True):
        cfg = tiny_config(
            tmp_path / str(flag),
            "training.steps=4",
            "training.eval_every=0",
            "training.log_every=2",
            "model.dropout=0.1",
            "model.ff.expert_dropout=0.1",
            "checkpoint.save_final=false",
            f"model.attention={attention}",
            f"training.activation_checkpointing={str(flag).lower()}",
        )
        assert cfg.training.activation_checkpointing is flag and cfg.model.attention == attention
        runs[flag] = train_in_process(cfg)
    assert runs[True].losses == pytest.approx(runs[False].losses, rel=1e-5)
    assert runs[True].valid.loss == pytest.approx(runs[False].valid.loss, rel=1e-5)
    # what the monitor logged: the same routing, counted once (k assignments per token of the batch)
    loads = {}
    for flag in (False, True):
        acc = EventAccumulator(str(tmp_path / str(flag) / str(flag)), size_guidance={"histograms": 0, "scalars": 0})
        acc.Reload()
        slots = [e.value for e in acc.Scalars("routing/model/routed_slots_per_layer")]
        loads[flag] = [
            [round(b * n) for b in h.histogram_value.bucket]  # share × slots = assignments
            for h, n in zip(acc.Histograms("routing/layer_01/load_share"), slots)
        ]
        # every forward of the 2-step logging interval, each counted once (k assignments per token)
        assert slots == [2 * cfg.training.batch_size * cfg.model.context * cfg.model.ff.k] * 2
    assert loads[True] == loads[False] and len(loads[True]) == 2
