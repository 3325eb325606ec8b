"""PKM against brute-force scoring of all n_keys² product keys."""

import math

import pytest
import torch

from sigma_moe.layers import PKMConfig, build_feedforward

D = torch.float64


def make(d=12, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = PKMConfig(**{"n_keys": 7, "n_heads": 3, "knn": 4, **kw})
    return build_feedforward(cfg, d_model=d, n_layers=2).to(D)


def brute_force(layer, x):
    """Score every value (i, j) of every head as x₁·K¹[i] + x₂·K²[j]; keep each head's top-knn."""
    n_keys, knn, half = layer.cfg.n_keys, layer.cfg.knn, x.shape[1] // 2
    scores, ids = [], []
    for h in range(layer.cfg.n_heads):
        k1, k2 = layer.keys[h, 0], layer.keys[h, 1]
        full = (x[:, :half] @ k1.T)[:, :, None] + (x[:, half:] @ k2.T)[:, None, :]  # [N, n, n]
        s, i = full.reshape(x.shape[0], n_keys * n_keys).topk(knn, -1)
        scores.append(s)
        ids.append(i)
    scores, ids = torch.cat(scores, 1), torch.cat(ids, 1)
    act = torch.relu(scores) if layer.cfg.activation == "relu" else torch.softmax(scores, -1)
    return torch.einsum("nk,nkd->nd", act, layer.values[ids])


@pytest.mark.parametrize("activation", ["relu", "softmax"])
def test_forward_and_gradients_match_brute_force(activation):
    layer = make(activation=activation)
    x = torch.randn(2, 9, 12, dtype=D)
    y = layer(x)
    want = brute_force(layer, x.reshape(-1, 12)).reshape(2, 9, 12)
    torch.testing.assert_close(y, want)
    assert layer.aux_loss.item() == 0.0 and layer.routing is None
    got = torch.autograd.grad(y.square().sum(), [layer.keys, layer.values])
    expected = torch.autograd.grad(want.square().sum(), [layer.keys, layer.values])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_knn_equal_to_n_keys_keeps_every_head_candidate():
    layer = make(n_keys=3, knn=3, n_heads=1)
    x = torch.randn(5, 12, dtype=D)
    torch.testing.assert_close(layer(x), brute_force(layer, x))


@pytest.mark.parametrize(
    "value_init,std", [("standard", lambda d, m, L: d**-0.5), ("paper", lambda d, m, L: math.sqrt(2 / (m * L)))]
)
def test_init(value_init, std):
    torch.manual_seed(0)
    d, n_keys, L = 64, 32, 3
    layer = build_feedforward(PKMConfig(n_keys=n_keys, value_init=value_init), d_model=d, n_layers=L)
    assert layer.values.std().item() == pytest.approx(std(d, n_keys**2, L), rel=0.03)
    bound = 1 / math.sqrt(d // 2)
    assert layer.keys.abs().max().item() <= bound
    assert layer.keys.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # uniform(±b)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="d_model = 13 must be even"):
        build_feedforward(PKMConfig(n_keys=4, knn=2), d_model=13, n_layers=1)
    with pytest.raises(ValueError, match="knn = 8: cannot exceed n_keys = 4"):
        PKMConfig(n_keys=4, knn=8)
