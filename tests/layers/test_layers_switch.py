"""Switch layer against plain formulas: softmax-probability gates, top-K, aux loss, init."""

import math

import pytest
import torch

from sigma_moe.layers import SwitchConfig, build_feedforward

D = torch.float64


def make(d=12, seed=0, dtype=D, **kw):
    torch.manual_seed(seed)
    cfg = SwitchConfig(**{"n_experts": 5, "expert_size": 3, **kw})
    return build_feedforward(cfg, d_model=d, n_layers=2).to(dtype)


def direct_aux(x, layer, coef):
    probs = torch.softmax(x @ layer.selector.T, -1)
    idx = probs.topk(layer.k, -1).indices
    f = torch.bincount(idx.reshape(-1), minlength=layer.n_experts).to(D) / idx.numel()
    return coef * layer.n_experts * (f * probs.mean(0)).sum()


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_forward_matches_per_token_loop(backend, k):
    layer = make(k=k, backend=backend)
    x = torch.randn(3, 5, 12, dtype=D)
    y = layer(x).reshape(-1, 12)
    flat = x.reshape(-1, 12)
    probs = torch.softmax(flat @ layer.selector.T, -1)
    chosen = []
    for n in range(flat.shape[0]):
        top = probs[n].topk(k).indices.tolist()
        chosen += top
        want = sum(probs[n, e] * torch.relu(flat[n] @ layer.w1[e]) @ layer.w2[e] for e in top)
        torch.testing.assert_close(y[n], want)
    assert torch.equal(layer.routing.tokens_per_expert, torch.bincount(torch.tensor(chosen), minlength=5))


@pytest.mark.parametrize("k", [1, 3])
def test_aux_loss_value_and_gradient(k):
    layer = make(k=k, aux_loss_coef=0.01)
    x = torch.randn(40, 12, dtype=D)
    layer(x)
    want = direct_aux(x, layer, 0.01)
    torch.testing.assert_close(layer.aux_loss, want)
    # f carries no gradient: only P = mean softmax does.
    (got,) = torch.autograd.grad(layer.aux_loss, layer.selector)
    (expected,) = torch.autograd.grad(want, layer.selector)
    torch.testing.assert_close(got, expected)
    # ... and at a uniform router the loss is exactly the coefficient.
    with torch.no_grad():
        layer.selector.zero_()
    layer(x)
    torch.testing.assert_close(layer.aux_loss, torch.tensor(0.01, dtype=D))


def test_aux_loss_means_go_through_token_sum():
    layer = make(k=2)
    x_here, x_there = torch.randn(7, 12, dtype=D), torch.randn(13, 12, dtype=D)
    probs = torch.softmax(x_there @ layer.selector.T, -1)
    assigned = torch.bincount(probs.topk(2, -1).indices.reshape(-1), minlength=5).to(D) / 2
    there = torch.cat([probs.sum(0), assigned, torch.tensor([13.0], dtype=D)]).detach()
    layer.token_sum = lambda t: t + there
    layer(x_here)
    torch.testing.assert_close(layer.aux_loss, direct_aux(torch.cat([x_here, x_there]), layer, 0.01))


def test_init_is_truncated_normal_with_scale():
    d, G, s = 256, 64, 0.1
    layer = make(d=d, n_experts=8, expert_size=G, init_scale=s, dtype=torch.float32)
    trunc_factor = 0.8796  # std of N(0, 1) cut at ±2
    for w, fan_in in [(layer.w1, d), (layer.w2, G), (layer.selector, d)]:
        std = math.sqrt(s / fan_in)
        assert w.abs().max().item() <= 2 * std
        assert w.std().item() == pytest.approx(trunc_factor * std, rel=0.05)
