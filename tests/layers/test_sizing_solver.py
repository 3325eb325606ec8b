"""The parameter-equal solver: one 'auto' field filled so a variant's parameter count is nearest a target,
checked against closed-form counts (independent of the module code) and the paper's sizes."""

import pytest

from sigma_moe.layers import SigmaMoEConfig, feedforward_parameter_count
from sigma_moe.layers.sizing import solve_parameter_equal


def dense_params(d_ff, d):  # Linear(d, d_ff) + Linear(d_ff, d), with biases
    return 2 * d * d_ff + d_ff + d


def pkm_params(n_keys, d, heads=4):  # sub-keys [H, 2, n, d/2] + values [n², d]
    return heads * n_keys * d + n_keys**2 * d


def moe_params(n_experts, g, d):  # W1, W2, selector; no biases
    return 2 * n_experts * g * d + n_experts * d


def test_paper_2053_and_62_subkeys_at_d412():
    target = feedforward_parameter_count(SigmaMoEConfig(n_experts=16, expert_size=128, k=4), 412)
    assert target == moe_params(16, 128, 412)
    dense, n = solve_parameter_equal({"kind": "dense", "d_ff": "auto", "dropout": 0.1}, 412, target)
    assert (dense.d_ff, dense.dropout, n) == (2053, 0.1, dense_params(2053, 412))
    pkm, n = solve_parameter_equal({"kind": "pkm", "n_keys": "auto", "knn": 32}, 412, target)
    assert pkm.n_keys == 62 and n == pkm_params(62, 412)  # the paper's parameter-matched PKM: 62² = 3844
    topk, _ = solve_parameter_equal({"kind": "topk_mlp", "d_ff": "auto", "k": 512}, 412, target)
    assert (topk.d_ff, topk.k) == (2053, 512)  # Top-K is a dense MLP: the dense d_ff


@pytest.mark.parametrize("d,target", [(128, 270_000), (256, 1_050_001), (412, 1_694_144), (1024, 8_421_376)])
def test_dense_and_topk_within_a_tenth_of_a_percent(d, target):
    for ff in ({"kind": "dense", "d_ff": "auto"}, {"kind": "topk_mlp", "d_ff": "auto", "k": 8}):
        cfg, n = solve_parameter_equal(ff, d, target)
        assert abs(n - target) / target < 1e-3
        # nearest: neither neighbour is closer (closed form, not the module)
        assert abs(dense_params(cfg.d_ff, d) - target) <= min(
            abs(dense_params(cfg.d_ff + s, d) - target) for s in (-1, 1)
        )


@pytest.mark.parametrize("d,target", [(128, 270_000), (256, 1_050_001), (412, 1_694_144)])
def test_pkm_is_the_nearest_key_count(d, target):
    cfg, n = solve_parameter_equal({"kind": "pkm", "n_keys": "auto"}, d, target)
    assert n == pkm_params(cfg.n_keys, d)
    assert abs(n - target) <= min(abs(pkm_params(cfg.n_keys + s, d) - target) for s in (-1, 1))
    assert abs(n - target) / target < 0.01  # granularity ≈ 2·n_keys·d: within half a step, ~1%


@pytest.mark.parametrize("kind,g", [("sigma_moe", 64), ("switch", 256), ("sbase", 64)])
def test_expert_count_solved_for_routed_variants(kind, g):
    d = 256
    target = moe_params(48, 64, d)
    ff = {"kind": kind, "n_experts": "auto", "expert_size": g, "k": 1}
    cfg, n = solve_parameter_equal(ff, d, target)
    assert n == moe_params(cfg.n_experts, g, d)
    assert cfg.n_experts == round(target / (2 * g * d + d))


def test_rejected_small_values_count_as_too_small():
    # k = 600 needs d_ff >= 600: values below are invalid, the solution is still the nearest valid one
    cfg, _ = solve_parameter_equal({"kind": "topk_mlp", "d_ff": "auto", "k": 600}, 64, dense_params(1000, 64))
    assert cfg.d_ff == 1000


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="exactly one field"):
        solve_parameter_equal({"kind": "dense", "d_ff": 100}, 64, 1000)
    with pytest.raises(ValueError, match="exactly one field"):
        solve_parameter_equal({"kind": "sigma_moe", "n_experts": "auto", "expert_size": "auto", "k": 1}, 64, 1000)
    with pytest.raises(ValueError, match="must be even"):
        solve_parameter_equal({"kind": "pkm", "n_keys": "auto"}, 63, 10_000)
    with pytest.raises(ValueError, match="positive"):
        solve_parameter_equal({"kind": "dense", "d_ff": "auto"}, 64, 0)
