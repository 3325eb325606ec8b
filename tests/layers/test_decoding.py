"""Incremental decoding (layers/decoding.py, TransformerLM.decode) and sampling (launch/generate.py):
the prompt in one call and then one token per call give the logits of a forward over the whole
sequence, for causal attention (key/value cache) and XL (segment memory), with a σ-MoE and a dense
feedforward; greedy generation picks the argmax of a full recompute; top-k / top-p keep what they say."""

from __future__ import annotations

import pytest
import torch

from sigma_moe.layers import DenseConfig, SigmaMoEConfig, TransformerConfig, TransformerLM

FF = {
    "sigma_moe": SigmaMoEConfig(n_experts=6, expert_size=5, k=2, expert_dropout=0.3),
    "dense": DenseConfig(d_ff=24),
}
CONTEXT = 12


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny matrices: one thread is fastest, and does not wait on a loaded machine's other cores."""
    from launch_helpers import one_thread

    with one_thread():
        yield


def model(kind: str, attention: str, positions: str = "sinusoidal") -> TransformerLM:
    torch.manual_seed(0)
    cfg = TransformerConfig(
        vocab_size=19,
        d_model=16,
        n_layers=2,
        n_heads=2,
        context=CONTEXT,
        ff=FF[kind],
        dropout=0.1,  # off in eval mode: decoding must not depend on it
        attention=attention,
        positions=positions,
    )
    return TransformerLM(cfg).double().eval()


@pytest.mark.parametrize("attention", ["causal", "xl"])
@pytest.mark.parametrize("kind", sorted(FF))
def test_decoding_token_by_token_gives_the_full_forward_logits(kind, attention):
    m = model(kind, attention)
    tokens = torch.randint(0, 19, (3, CONTEXT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(tokens).logits  # [B, T, V]: the whole sequence at once, no cache, no memory
        state = m.start_decoding(3)
        pieces = [m.decode(tokens[:, :5], state)]  # the prompt (prefill), then one token at a time
        pieces += [m.decode(tokens[:, t : t + 1], state) for t in range(5, 9)]
        pieces.append(m.decode(tokens[:, 9:], state))  # several after a cache: a causal mask offset by S
    assert state.length == CONTEXT
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-9, atol=1e-9)


def test_learned_positions_decode_at_their_offsets():
    m = model("dense", "causal", positions="learned")
    tokens = torch.randint(0, 19, (2, CONTEXT))
    with torch.no_grad():
        full = m(tokens).logits
        state = m.start_decoding(2)
        got = torch.cat([m.decode(tokens[:, t : t + 1], state) for t in range(CONTEXT)], dim=1)
    torch.testing.assert_close(got, full, rtol=1e-9, atol=1e-9)


def test_the_causal_cache_holds_one_context_and_says_so():
    m = model("sigma_moe", "causal")
    state = m.start_decoding(1)
    with torch.no_grad():
        m.decode(torch.zeros(1, CONTEXT - 1, dtype=torch.long), state)
        assert state.room == 1
        m.decode(torch.zeros(1, 1, dtype=torch.long), state)
        assert state.room == 0
        with pytest.raises(ValueError, match="exceed the model's context 12; start again"):
            m.decode(torch.zeros(1, 1, dtype=torch.long), state)
    xl = model("sigma_moe", "xl").start_decoding(1)
    assert xl.room is None  # the XL memory slides: no limit


@pytest.mark.parametrize("attention", ["causal", "xl"])
def test_greedy_generation_is_the_argmax_of_a_full_recompute(attention):
    from sigma_moe.launch.generate import Sampling, generate

    m = model("sigma_moe", attention)
    prompt = [3, 1, 4, 1, 5]
    out = generate(m, prompt, max_new_tokens=CONTEXT - len(prompt), sampling=Sampling(temperature=0), seed=0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(CONTEXT - len(prompt)):
            ids.append(int(m(torch.tensor([ids])).logits[0, -1].argmax()))
    assert out.prompt_ids + out.new_ids == ids
    longer = generate(m, prompt, max_new_tokens=3 * CONTEXT, sampling=Sampling(), seed=0)  # past the context
    assert len(longer.new_ids) == 3 * CONTEXT and longer.tokens_per_s > 0


def test_sampling_keeps_top_k_and_the_nucleus():
    from sigma_moe.launch.generate import Sampling, next_token

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(400, 1)
    g = torch.Generator().manual_seed(0)
    top2 = next_token(logits, Sampling(top_k=2), g)
    assert set(top2.tolist()) == {0, 1}
    nucleus = next_token(logits, Sampling(top_p=0.7), g)  # 0.5 < 0.7 <= 0.8: tokens 0 and 1
    assert set(nucleus.tolist()) == {0, 1}
    assert set(next_token(logits, Sampling(top_p=0.4), g).tolist()) == {0}  # the first always stays
    everything = next_token(logits, Sampling(temperature=2.0), g)
    assert set(everything.tolist()) == {0, 1, 2, 3}
    a = next_token(logits, Sampling(), torch.Generator().manual_seed(7))
    assert torch.equal(a, next_token(logits, Sampling(), torch.Generator().manual_seed(7)))  # seeded
