"""Dense and top-K activation MLPs against their formulas; the pre-LN init."""

import math

import pytest
import torch

from sigma_moe.layers import DenseConfig, TopKMLPConfig, build_feedforward

D = torch.float64


def test_dense_forward_and_init():
    torch.manual_seed(0)
    d, d_ff, L = 128, 512, 4
    layer = build_feedforward(DenseConfig(d_ff=d_ff), d_model=d, n_layers=L)
    assert layer.w1.weight.std().item() == pytest.approx(math.sqrt(2 / (d * L)), rel=0.02)
    assert layer.w2.weight.std().item() == pytest.approx(math.sqrt(2 / (d_ff * L)), rel=0.02)
    assert layer.w1.bias.abs().sum() == 0 and layer.w2.bias.abs().sum() == 0
    layer = layer.to(D)
    with torch.no_grad():
        layer.w1.bias.normal_()
        layer.w2.bias.normal_()
    x = torch.randn(3, 4, d, dtype=D)
    want = torch.relu(x @ layer.w1.weight.T + layer.w1.bias) @ layer.w2.weight.T + layer.w2.bias
    torch.testing.assert_close(layer(x), want)
    assert layer.aux_loss.item() == 0.0 and layer.routing is None


@pytest.mark.parametrize("k", [1, 3, 20])
def test_topk_mlp_keeps_the_k_largest_hidden_units(k):
    torch.manual_seed(0)
    layer = build_feedforward(TopKMLPConfig(d_ff=20, k=k), d_model=12, n_layers=2).to(D)
    x = torch.randn(2, 5, 12, dtype=D, requires_grad=True)
    y = layer(x)
    h = torch.relu(x @ layer.w1.weight.T + layer.w1.bias)
    kth = h.sort(-1, descending=True).values[..., k - 1 : k]
    mask = (h >= kth).to(D).detach()  # no ties in random data
    assert torch.all(mask.sum(-1) == k)
    want = (h * mask) @ layer.w2.weight.T + layer.w2.bias
    torch.testing.assert_close(y, want)
    # The mask carries no gradient: gradients flow through the kept units only.
    got = torch.autograd.grad(y.square().sum(), [x, layer.w1.weight])
    expected = torch.autograd.grad(want.square().sum(), [x, layer.w1.weight])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_topk_mlp_masks_after_dropout():
    """The mask is chosen after dropout: K non-zero units per token are kept (choosing before dropout
    would leave about half of them zeroed), each a surviving unit scaled by 1 / (1 - p)."""
    torch.manual_seed(0)
    layer = build_feedforward(TopKMLPConfig(d_ff=40, k=4, dropout=0.5), d_model=12, n_layers=2).to(D)
    seen = {}
    layer.w2.register_forward_pre_hook(lambda mod, args: seen.update(h=args[0]))
    x = torch.randn(50, 12, dtype=D)
    layer(x)
    h = torch.relu(x @ layer.w1.weight.T + layer.w1.bias)
    kept = seen["h"] != 0
    assert torch.all(kept.sum(-1) <= 4) and kept.sum() > 0.9 * 50 * 4
    torch.testing.assert_close(seen["h"][kept], 2 * h[kept])
