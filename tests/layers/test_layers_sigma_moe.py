"""σ-MoE layer against plain per-token formulas: forward, gradients, init, expert dropout, regulariser."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from sigma_moe.layers import LocalDispatcher, SigmaMoE, SigmaMoEConfig, build_feedforward

D = torch.float64


def make(d=12, n_layers=2, dtype=D, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = SigmaMoEConfig(**{"n_experts": 5, "expert_size": 3, "k": 3, **kw})
    return build_feedforward(cfg, d_model=d, n_layers=n_layers).to(dtype)


def loop_forward(layer, x, scores):
    """y[n] = Σ over the K largest scores[n] of score · ReLU(x W1[e]) W2[e], one token at a time."""
    ys, chosen = [], []
    for n in range(x.shape[0]):
        top = sorted(range(scores.shape[1]), key=lambda e: -float(scores[n, e].detach()))[: layer.k]
        chosen += top
        ys.append(sum(scores[n, e] * torch.relu(x[n] @ layer.w1[e]) @ layer.w2[e] for e in top))
    return torch.stack(ys), torch.bincount(torch.tensor(chosen), minlength=layer.n_experts)


def direct_regulariser(x, selector, gamma):
    p = torch.softmax(x @ selector.T, dim=-1).mean(0)
    return gamma * (p * p.log()).sum()


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("n_experts,expert_size,k", [(5, 3, 3), (4, 3, 4), (6, 4, 1)])
def test_forward_matches_per_token_loop(backend, n_experts, expert_size, k):
    layer = make(n_experts=n_experts, expert_size=expert_size, k=k, backend=backend, entropy_reg=0.01)
    x = torch.randn(2, 7, 12, dtype=D)
    layer.track_units = True  # the monitor's: which hidden units fired for some token of each expert
    with torch.no_grad():
        layer.w1[0, :, 0] = 0  # expert 0's unit 0 never fires
    y = layer(x)
    flat = x.reshape(-1, 12)
    scores = torch.sigmoid(flat @ layer.selector.T)
    want, counts = loop_forward(layer, flat, scores)
    torch.testing.assert_close(y, want.reshape(2, 7, 12))
    assert torch.equal(layer.routing.tokens_per_expert, counts)
    assert layer.routing.n_tokens == 14
    p = torch.softmax(flat @ layer.selector.T, -1).mean(0)
    torch.testing.assert_close(layer.routing.mean_probs, p)
    fired = torch.zeros(n_experts, expert_size, dtype=torch.bool)
    for n, top in enumerate(scores.topk(k, dim=-1).indices.tolist()):
        for e in top:
            fired[e] |= flat[n] @ layer.w1[e] > 0
    assert torch.equal(layer.routing.units_fired, fired) and fired.any() and not fired[0, 0]
    torch.testing.assert_close(layer.aux_loss, direct_regulariser(flat, layer.selector, 0.01))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_experts_without_tokens(backend):
    """Expert 0's logit is 0 (score 0.5) while every other is > 0.5: it never gets a token."""
    layer = make(backend=backend)
    with torch.no_grad():
        layer.selector.abs_()
        layer.selector[0] = 0
    x = torch.randn(9, 12, dtype=D).abs()
    y = layer(x)
    want, counts = loop_forward(layer, x, torch.sigmoid(x @ layer.selector.T))
    assert counts[0] == 0 and layer.routing.tokens_per_expert[0] == 0
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize(
    "selection,gate_fn",
    [
        ("softmax_before_topk", lambda logits, top: torch.softmax(logits, -1)[top]),
        ("softmax_after_topk", lambda logits, top: torch.softmax(logits[top], -1)),
    ],
)
def test_softmax_selection_ablations(selection, gate_fn):
    layer = make(selection=selection, backend="torch")
    x = torch.randn(6, 12, dtype=D)
    y = layer(x)
    logits = x @ layer.selector.T
    for n in range(6):
        top = logits[n].topk(layer.k).indices
        gates = gate_fn(logits[n], top)
        want = sum(g * torch.relu(x[n] @ layer.w1[e]) @ layer.w2[e] for g, e in zip(gates, top))
        torch.testing.assert_close(y[n], want)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradcheck_layer(backend):
    layer = make(d=6, n_experts=4, expert_size=3, k=2, backend=backend, entropy_reg=0.1)
    params = {name: p.detach().clone().requires_grad_() for name, p in layer.named_parameters()}
    x = torch.randn(5, 6, dtype=D, requires_grad=True)
    names = list(params)

    def fn(x, *ps):
        y = functional_call(layer, dict(zip(names, ps)), (x,))
        return y, layer.aux_loss

    assert torch.autograd.gradcheck(fn, (x, *params.values()), eps=1e-6, atol=1e-6, fast_mode=True)


def test_paper_init_statistics():
    d, L, E, G = 256, 4, 16, 32
    layer = make(d=d, n_layers=L, n_experts=E, expert_size=G, k=2, dtype=torch.float32)
    assert layer.w1.std().item() == pytest.approx(math.sqrt(2 / (d * L)), rel=0.02)
    assert layer.w2.std().item() == pytest.approx(math.sqrt(2 / (E * G * L)), rel=0.02)  # the full d_ff
    assert layer.selector.std().item() == pytest.approx(math.sqrt(2 / (d * L)), rel=0.06)
    norms = layer.selector.norm(dim=1)
    torch.testing.assert_close(norms, norms.mean().expand_as(norms), rtol=1e-5, atol=0)
    standard = make(d=d, n_layers=L, n_experts=E, expert_size=G, k=2, dtype=torch.float32, init="standard")
    assert standard.w2.std().item() == pytest.approx(math.sqrt(2 / (G * L)), rel=0.02)  # per expert


def test_expert_dropout_never_selects_a_dropped_expert():
    layer = make(n_experts=6, k=2, expert_dropout=0.5)
    x = torch.randn(300, 12, dtype=D)
    torch.manual_seed(1)
    r = layer.route(x)
    torch.manual_seed(1)  # the mask route drew: one uniform per token and expert
    dropped = torch.rand(300, 6, dtype=D) < 0.5
    assert dropped.float().mean().item() == pytest.approx(0.5, abs=0.03)
    scores = torch.sigmoid(x @ layer.selector.T)
    survivors = (~dropped).sum(1)
    hit = dropped.gather(1, r.expert_idx)
    # A dropped expert fills a slot only when fewer than K survive, and then its gate is 0.
    assert torch.all(~hit | (survivors < 2)[:, None])
    assert torch.all(r.gates[hit] == 0)
    # The kept slots are exactly the top-K surviving experts, with raw (unrescaled) sigmoid gates.
    kept = scores.masked_fill(dropped, 0).topk(2, dim=1)
    torch.testing.assert_close(r.gates.sort(1).values, kept.values.sort(1).values)
    assert torch.all(survivors.min() < 2) and torch.all(hit.any(1) == (survivors < 2))


def test_expert_dropout_inactive_in_eval():
    layer = make(expert_dropout=0.9).eval()
    x = torch.randn(8, 12, dtype=D)
    scores = torch.sigmoid(x @ layer.selector.T)
    top = scores.topk(layer.k, dim=1).values  # every expert competes: no mask in eval
    torch.testing.assert_close(layer.route(x).gates.sort(1).values, top.sort(1).values)
    want, _ = loop_forward(layer, x, scores)
    torch.testing.assert_close(layer(x), want)


def test_regulariser_ignores_expert_dropout_and_has_the_analytic_gradient():
    gamma = 0.05
    layer = make(entropy_reg=gamma, expert_dropout=0.5)
    x = torch.randn(40, 12, dtype=D)
    layer(x)
    torch.testing.assert_close(layer.aux_loss, direct_regulariser(x, layer.selector, gamma))
    (grad,) = torch.autograd.grad(layer.aux_loss, layer.selector)
    # d/dW3 of γ Σ p log p: g_p = γ(log p + 1); per token, softmax Jacobian; chain through x.
    s = torch.softmax(x @ layer.selector.T, -1).detach()
    g_p = gamma * (s.mean(0).log() + 1)
    g_logits = s * (g_p - (s * g_p).sum(-1, keepdim=True)) / x.shape[0]
    torch.testing.assert_close(grad, (g_logits.T @ x), rtol=1e-5, atol=1e-7)


def test_regulariser_off_gives_zero_and_no_selector_gradient():
    layer = make(entropy_reg=0.0)
    layer(torch.randn(5, 12, dtype=D))
    assert layer.aux_loss.item() == 0.0 and not layer.aux_loss.requires_grad


def test_regulariser_mean_goes_through_token_sum():
    """A token_sum that adds another process's sums gives the regulariser of the joint batch."""
    layer = make(entropy_reg=0.1)
    x_here, x_there = torch.randn(6, 12, dtype=D), torch.randn(11, 12, dtype=D)
    there = torch.cat([torch.softmax(x_there @ layer.selector.T, -1).sum(0), torch.tensor([11.0], dtype=D)])
    layer.token_sum = lambda t: t + there.detach().to(t.dtype)
    layer(x_here)
    joint = direct_regulariser(torch.cat([x_here, x_there]), layer.selector, 0.1)
    torch.testing.assert_close(layer.aux_loss, joint)


class TwoShardDispatcher:
    """Runs the experts in two halves, swapping each half's weights into the layer like an
    expert-parallel rank would: run_experts must read self.w1 / self.w2 at call time."""

    def __init__(self, layer):
        self.layer, self.full = layer, (layer.w1, layer.w2)
        self.seen = []

    def __call__(self, x, expert_idx, gates, run_experts):
        self.seen.append(expert_idx.clone())
        half, y = self.layer.n_experts // 2, 0
        for lo, hi in [(0, half), (half, self.layer.n_experts)]:
            mine = (expert_idx >= lo) & (expert_idx < hi)
            self.layer.w1 = nn.Parameter(self.full[0][lo:hi])
            self.layer.w2 = nn.Parameter(self.full[1][lo:hi])
            local = torch.where(mine, expert_idx - lo, 0)
            y = y + LocalDispatcher(hi - lo)(x, local, torch.where(mine, gates, 0), run_experts)
        self.layer.w1, self.layer.w2 = self.full
        return y


def test_dispatcher_hook_with_swapped_expert_shards():
    layer = make(n_experts=6, k=2, backend="torch")
    x = torch.randn(10, 12, dtype=D)
    want = layer(x)
    layer.dispatcher = TwoShardDispatcher(layer)
    torch.testing.assert_close(layer(x), want)
    assert torch.equal(layer.dispatcher.seen[0].sort(1).values, layer.route(x).expert_idx.sort(1).values)


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="SigmaMoEConfig.k = 5: cannot exceed n_experts = 4"):
        SigmaMoEConfig(n_experts=4, expert_size=8, k=5)
    with pytest.raises(ValueError, match="selection"):
        SigmaMoEConfig(n_experts=4, expert_size=8, k=2, selection="softmax")
    with pytest.raises(ValueError, match="expert_dropout"):
        SigmaMoEConfig(n_experts=4, expert_size=8, k=2, expert_dropout=0.1, selection="softmax_after_topk")
    with pytest.raises(TypeError, match=r"SigmaMoEConfig.entropy_reg: expected a number, got str '1e-3' \(YAML"):
        SigmaMoEConfig(n_experts=4, expert_size=8, k=2, entropy_reg="1e-3")
    assert isinstance(SigmaMoEConfig(n_experts=4, expert_size=8, k=2, entropy_reg=0).entropy_reg, float)
    assert isinstance(make(), SigmaMoE)


@pytest.mark.parametrize("kind", ["sigma_moe", "switch"])
def test_a_batch_without_tokens_gives_a_finite_aux_loss(kind):
    """The batch-mean statistics of an empty batch are 0, not 0/0: no NaN reaches the loss."""
    from sigma_moe.layers import Switch, SwitchConfig

    if kind == "sigma_moe":
        layer = SigmaMoE(SigmaMoEConfig(n_experts=4, expert_size=4, k=2, entropy_reg=0.5), d_model=8, n_layers=2)
    else:
        layer = Switch(SwitchConfig(n_experts=4, expert_size=4, k=1, aux_loss_coef=0.5), d_model=8, n_layers=2)
    y = layer(torch.zeros(0, 8, requires_grad=True))
    assert y.shape == (0, 8) and torch.isfinite(layer.aux_loss)
    (y.sum() + layer.aux_loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
