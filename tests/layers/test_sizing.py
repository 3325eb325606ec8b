"""Parameter counts, MLP FLOPs and the parameter-equal dense d_ff (the paper's parity numbers)."""

import pytest

from sigma_moe.layers import (
    DenseConfig,
    PKMConfig,
    SBaseConfig,
    SigmaMoEConfig,
    SwitchConfig,
    TopKMLPConfig,
    TransformerConfig,
    TransformerLM,
    build_feedforward,
    count_parameters,
    feedforward_parameter_count,
    mlp_flops_per_token,
    parameter_equal_dense_d_ff,
)


def test_sigma_moe_16x128_at_d412_matches_dense_2053():
    cfg = SigmaMoEConfig(n_experts=16, expert_size=128, k=4)
    assert feedforward_parameter_count(cfg, 412) == 2 * 16 * 128 * 412 + 16 * 412  # W1, W2, W3; no biases
    assert parameter_equal_dense_d_ff(cfg, 412) == 2053


def test_parity_is_identity_for_dense_and_rounds_to_nearest():
    assert parameter_equal_dense_d_ff(DenseConfig(d_ff=777), 20) == 777
    # 32 × 128 at d = 1024: (8421376 - 1024) / 2049 = 4109.49 -> 4109 (the paper reports 4110).
    assert parameter_equal_dense_d_ff(SigmaMoEConfig(n_experts=32, expert_size=128, k=4), 1024) == 4109


@pytest.mark.parametrize(
    "cfg,params",
    [
        (DenseConfig(d_ff=30), 2 * 30 * 12 + 30 + 12),
        (TopKMLPConfig(d_ff=30, k=4), 2 * 30 * 12 + 30 + 12),
        (SigmaMoEConfig(n_experts=5, expert_size=3, k=2), 2 * 5 * 3 * 12 + 5 * 12),
        (SwitchConfig(n_experts=5, expert_size=3), 2 * 5 * 3 * 12 + 5 * 12),
        (SBaseConfig(n_experts=5, expert_size=3, k=2), 2 * 5 * 3 * 12 + 5 * 12),
        (PKMConfig(n_keys=6, n_heads=2, knn=3), 6 * 6 * 12 + 2 * 2 * 6 * 6),
    ],
)
def test_parameter_counts(cfg, params):
    assert count_parameters(build_feedforward(cfg, d_model=12, n_layers=2)) == params


def test_mlp_flops():
    d = 412
    dense = build_feedforward(DenseConfig(d_ff=2053), d_model=d, n_layers=1)
    moe = build_feedforward(SigmaMoEConfig(n_experts=16, expert_size=128, k=4), d_model=d, n_layers=1)
    assert mlp_flops_per_token(dense) == 2 * 2 * d * 2053
    assert mlp_flops_per_token(moe) == 4 * 128 * d * 2 * 2 + 16 * d * 2
    assert 0.25 < mlp_flops_per_token(moe) / mlp_flops_per_token(dense) < 0.26  # the paper's "25%"
    topk = build_feedforward(TopKMLPConfig(d_ff=64, k=8), d_model=12, n_layers=1)
    assert mlp_flops_per_token(topk) == 2 * 12 * 64 + 2 * 8 * 12
    pkm = build_feedforward(PKMConfig(n_keys=6, n_heads=2, knn=3), d_model=12, n_layers=1)
    assert mlp_flops_per_token(pkm) == 2 * (2 * 2 * 6 * 6) + 2 * 2 * 3 * 12


def test_model_flops_sum_over_layers_and_model_parameters():
    cfg = TransformerConfig(vocab_size=17, d_model=12, n_layers=3, n_heads=2, context=8, ff=DenseConfig(d_ff=30))
    model = TransformerLM(cfg)
    assert mlp_flops_per_token(model) == 3 * 2 * 2 * 12 * 30
    per_block = 2 * 30 * 12 + 30 + 12 + 4 * 12 * 12 + 2 * 2 * 12  # ff, attention (no bias), two LNs
    assert count_parameters(model) == 17 * 12 * 2 + 3 * per_block + 2 * 12  # embeddings, output, final LN
