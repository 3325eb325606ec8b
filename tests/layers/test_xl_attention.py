"""Transformer-XL relative attention and segment memory: the relative shift against the direct formula,
causal consistency (one segment == two segments with memory), memory 0 == no memory, config errors."""

import math

import pytest
import torch

from sigma_moe.layers import (
    DenseConfig,
    RelativeSelfAttention,
    SigmaMoEConfig,
    TransformerConfig,
    TransformerLM,
    rel_shift,
    relative_positions,
    sinusoidal_positions,
)

D_MODEL, HEADS, HEAD_DIM = 12, 3, 5  # H·D = 15 != d, like the paper's 10 × 41 at 412


def _direct_attention(att: RelativeSelfAttention, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """Dai et al.'s score written out per (query, key): no shift, no SDPA, O(T·K) Python loops."""
    b, t, d = x.shape
    m = memory.shape[1]
    h, dh = att.n_heads, att.head_dim
    kx = torch.cat([memory, x], dim=1)
    q = att.q(x).view(b, t, h, dh)
    k, v = att.kv(kx).view(b, m + t, 2, h, dh).unbind(2)
    sin = sinusoidal_positions(m + t, d).to(x.dtype)  # row δ: distance δ
    r = att.pos(sin).view(m + t, h, dh)
    u, w = att.content_bias, att.position_bias
    out = torch.zeros(b, t, h, dh, dtype=x.dtype)
    for i in range(t):
        keys = range(m + i + 1)  # the memory and the causal past, query i sitting at M + i
        score = torch.stack(
            [((q[:, i] + u) * k[:, j]).sum(-1) + ((q[:, i] + w) * r[m + i - j]).sum(-1) for j in keys], dim=-1
        ) / math.sqrt(dh)  # [B, H, keys]
        p = score.softmax(-1)
        out[:, i] = torch.einsum("bhj,bjhd->bhd", p, v[:, : m + i + 1])
    return att.out(out.reshape(b, t, h * dh))


def _attention(seed=0) -> RelativeSelfAttention:
    torch.manual_seed(seed)
    att = RelativeSelfAttention(d_model=D_MODEL, n_heads=HEADS, head_dim=HEAD_DIM, n_layers=2).double()
    with torch.no_grad():  # non-zero biases, so both bias terms are checked
        att.content_bias.normal_()
        att.position_bias.normal_()
    return att


@pytest.mark.parametrize("m, t", [(0, 7), (5, 7), (9, 4), (1, 1)])
def test_attention_matches_the_direct_formula(m, t):
    att = _attention()
    x, memory = torch.randn(2, t, D_MODEL, dtype=torch.double), torch.randn(2, m, D_MODEL, dtype=torch.double)
    got = att(x, memory if m else None)
    torch.testing.assert_close(got, _direct_attention(att, x, memory), rtol=1e-10, atol=1e-12)


def test_rel_shift_puts_distance_m_plus_i_minus_j_in_column_j():
    t, k = 4, 7  # M = 3
    raw = torch.arange(t * k, dtype=torch.float).view(t, k)  # column c holds distance k-1-c
    shifted = rel_shift(raw)
    for i in range(t):
        for j in range(k - t + i + 1):  # the visible keys
            assert shifted[i, j] == raw[i, k - 1 - (k - t + i - j)]


def test_relative_positions_are_sinusoids_of_descending_distances():
    torch.testing.assert_close(relative_positions(6, 10), sinusoidal_positions(6, 10).flip(0), rtol=0, atol=0)


def _xl_model(memory_segments=1, eval_memory_segments=1, context=16, **kw) -> TransformerLM:
    torch.manual_seed(0)
    cfg = TransformerConfig(
        vocab_size=23,
        d_model=16,
        n_layers=3,
        n_heads=2,
        context=context,
        attention="xl",
        ff=SigmaMoEConfig(n_experts=4, expert_size=8, k=2, expert_dropout=0.0),
        memory_segments=memory_segments,
        eval_memory_segments=eval_memory_segments,
        **kw,
    )
    model = TransformerLM(cfg)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.content_bias.normal_()
            block.attn.position_bias.normal_()
    return model


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_two_segments_with_memory_equal_one_segment(mode):
    """Whole model with σ-MoE feedforward, fp32, dropout off: the second half of a 2T-token segment
    sees exactly what a T-token segment sees with the first half as memory."""
    model = _xl_model(memory_segments=1, eval_memory_segments=1, context=16)
    model.train(mode == "train")
    tokens = torch.randint(0, 23, (3, 16))
    with torch.no_grad():
        whole = model(tokens).logits
        first = model(tokens[:, :8], model.empty_memory(3))
        second = model(tokens[:, 8:], first.memory)
        memory = second.memory
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole, rtol=1e-5, atol=1e-5)
    # memory_length = 1 segment × context 16: both halves kept, the block inputs of each layer
    assert [m.shape for m in memory] == [torch.Size([3, 16, 16])] * 3
    assert not any(m.requires_grad for m in memory)


def test_memory_is_trimmed_to_the_mode_length():
    model = _xl_model(memory_segments=1, eval_memory_segments=2, context=4)
    tokens = torch.randint(0, 23, (2, 4))
    with torch.no_grad():
        for mode, want in (("train", [4, 4, 4]), ("eval", [4, 8, 8])):
            model.train(mode == "train")
            memory, lengths = model.empty_memory(2), []
            for _ in range(3):
                memory = model(tokens, memory).memory
                lengths.append(memory[0].shape[1])
            assert lengths == want, mode


def test_memory_length_zero_equals_no_memory():
    model = _xl_model(memory_segments=0, eval_memory_segments=0).eval()
    tokens = torch.randint(0, 23, (2, 10))
    with torch.no_grad():
        a = model(tokens[:, :5], model.empty_memory(2))
        b = model(tokens[:, 5:], a.memory)
        memory = b.memory
        alone = model(tokens[:, 5:]).logits
    assert memory[0].shape == (2, 0, 16)
    torch.testing.assert_close(b.logits, alone, rtol=0, atol=0)
    with torch.no_grad():  # and memory does change the output when it is kept
        keeps = _xl_model(eval_memory_segments=1).eval()
        with_memory = keeps(tokens[:, 5:], keeps(tokens[:, :5], keeps.empty_memory(2)).memory).logits
    assert (with_memory - keeps(tokens[:, 5:]).logits).abs().max() > 1e-3


def test_gradient_does_not_flow_into_memory_and_reaches_the_biases():
    model = _xl_model().train()
    tokens = torch.randint(0, 23, (2, 8))
    memory = model(tokens, model.empty_memory(2)).memory
    out = model(tokens, memory)
    (out.logits.square().mean() + out.aux_loss).backward()
    attn = model.blocks[0].attn
    assert attn.content_bias.grad.abs().sum() > 0 and attn.position_bias.grad.abs().sum() > 0
    assert attn.pos.weight.grad.abs().sum() > 0


def test_xl_has_no_absolute_positions_and_its_own_parameters():
    model = _xl_model()
    names = {n for n, _ in model.named_parameters()}
    assert "positions" not in names and model.positions is None
    assert {"blocks.0.attn.content_bias", "blocks.0.attn.position_bias", "blocks.0.attn.pos.weight"} <= names


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"attention": "rope"}, "attention"),
        ({"attention": "xl", "positions": "learned"}, "positions"),
        ({"attention": "xl", "memory_segments": -1}, "memory_segments"),
        ({"eval_memory_segments": -2}, "eval_memory_segments"),
    ],
)
def test_bad_attention_config_names_the_field(kw, match):
    base = {"vocab_size": 5, "d_model": 8, "n_layers": 1, "n_heads": 2, "context": 4, "ff": DenseConfig(d_ff=8)}
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**base, **kw)


def test_memory_misuse_is_a_clear_error():
    xl = _xl_model()
    tokens = torch.randint(0, 23, (2, 4))
    with pytest.raises(ValueError, match="empty_memory"):
        xl(tokens, xl.empty_memory(3))  # batch mismatch
    causal = TransformerLM(
        TransformerConfig(vocab_size=23, d_model=16, n_layers=1, n_heads=2, context=4, ff=DenseConfig(d_ff=8))
    )
    with pytest.raises(ValueError, match="causal"):
        causal(tokens, [torch.zeros(2, 0, 16)])
    with pytest.raises(ValueError, match="causal"):
        causal.empty_memory(2)
