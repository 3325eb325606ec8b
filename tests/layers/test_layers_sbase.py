"""S-BASE: Sinkhorn balance, balanced choice in training, plain top-K at inference, sigmoid gates."""

import pytest
import torch

from sigma_moe.layers import SBaseConfig, build_feedforward, sinkhorn_log

D = torch.float64


def make(d=12, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = SBaseConfig(**{"n_experts": 5, "expert_size": 3, "k": 2, **kw})
    return build_feedforward(cfg, d_model=d, n_layers=2).to(D)


def skewed_logits(n=512, e=8):
    torch.manual_seed(0)
    logits = torch.randn(n, e, dtype=D)
    logits[:, 0] += 3  # plain top-1 sends ~90% of the tokens to expert 0
    return logits


def test_sinkhorn_balances_columns_and_rows():
    logits = skewed_logits()
    p = sinkhorn_log(logits, 3).exp()
    torch.testing.assert_close(p.sum(0), torch.ones(8, dtype=D))  # exact after the last column step
    torch.testing.assert_close(p.sum(1), torch.full((512,), 8 / 512, dtype=D), rtol=0.05, atol=0)
    assert torch.equal(sinkhorn_log(logits, 0), logits)


def test_sinkhorn_spreads_tokens_that_plain_topk_piles_up():
    logits = skewed_logits()
    plain = torch.bincount(logits.argmax(1), minlength=8)
    balanced = torch.bincount(sinkhorn_log(logits, 3).argmax(1), minlength=8)
    assert plain.max() > 0.85 * 512
    assert balanced.max() < 1.25 * 512 / 8 and balanced.min() > 0.75 * 512 / 8


def test_sinkhorn_column_sums_go_through_token_sum():
    """A process holding half of a batch made of two identical halves sees its column sums doubled."""
    logits = skewed_logits(n=64)
    global_result = sinkhorn_log(torch.cat([logits, logits]), 3)[:64]
    torch.testing.assert_close(sinkhorn_log(logits, 3, token_sum=lambda t: 2 * t), global_result)


def loop_forward(layer, x, choice):
    ys, chosen = [], []
    logits = x @ layer.selector.T
    for n in range(x.shape[0]):
        top = choice[n].topk(layer.k).indices.tolist()
        chosen += top
        ys.append(sum(torch.sigmoid(logits[n, e]) * torch.relu(x[n] @ layer.w1[e]) @ layer.w2[e] for e in top))
    return torch.stack(ys), torch.bincount(torch.tensor(chosen), minlength=layer.n_experts)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("training", [True, False])
def test_forward_matches_per_token_loop(backend, training):
    layer = make(backend=backend).train(training)
    with torch.no_grad():
        layer.selector[0] += 1.0  # skew, so that balancing changes the choice
    x = torch.randn(30, 12, dtype=D)
    y = layer(x)
    logits = (x @ layer.selector.T).detach()
    choice = sinkhorn_log(logits, 3) if training else logits
    want, counts = loop_forward(layer, x, choice)
    torch.testing.assert_close(y, want)
    assert torch.equal(layer.routing.tokens_per_expert, counts)
    assert layer.aux_loss.item() == 0.0
    if training:  # the balanced choice differs from plain top-K here
        assert not torch.equal(counts, loop_forward(layer, x, logits)[1])


def test_selector_gradient_flows_through_gates_only():
    layer = make()
    x = torch.randn(20, 12, dtype=D)
    (got,) = torch.autograd.grad(layer(x).sum(), layer.selector)
    idx = sinkhorn_log((x @ layer.selector.T).detach(), 3).topk(2, -1).indices  # fixed, no gradient
    gates = torch.sigmoid((x @ layer.selector.T).gather(1, idx))
    y = 0
    for j in range(2):
        e = idx[:, j]
        h = torch.relu(torch.einsum("nd,ndg->ng", x, layer.w1[e]))
        y = y + gates[:, j, None] * torch.einsum("ng,ngd->nd", h, layer.w2[e])
    (want,) = torch.autograd.grad(y.sum(), layer.selector)
    torch.testing.assert_close(got, want)
