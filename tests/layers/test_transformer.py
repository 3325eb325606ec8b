"""The causal LM: causality for every feedforward kind, summed aux losses, config loading errors."""

import pytest
import torch

from sigma_moe.config_schema import build_config
from sigma_moe.layers import (
    ConfigError,
    DenseConfig,
    PKMConfig,
    SBaseConfig,
    SigmaMoEConfig,
    SwitchConfig,
    TopKMLPConfig,
    TransformerConfig,
    TransformerLM,
    feedforward_kinds,
)

FF_CONFIGS = {
    "dense": DenseConfig(d_ff=24),
    "topk_mlp": TopKMLPConfig(d_ff=24, k=5),
    "sigma_moe": SigmaMoEConfig(n_experts=4, expert_size=6, k=3, expert_dropout=0.2),
    "pkm": PKMConfig(n_keys=5, n_heads=2, knn=3),
    "switch": SwitchConfig(n_experts=4, expert_size=6),
    "sbase": SBaseConfig(n_experts=4, expert_size=6, k=2),
}


def tiny(ff, seed=0, **kw):
    torch.manual_seed(seed)
    base = {"vocab_size": 17, "d_model": 20, "n_layers": 2, "n_heads": 4, "context": 9, "ff": ff}
    cfg = TransformerConfig(**{**base, **kw})
    return TransformerLM(cfg)


def test_every_registered_kind_is_covered():
    assert sorted(FF_CONFIGS) == feedforward_kinds()


@pytest.mark.parametrize("kind", sorted(FF_CONFIGS))
@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_changing_token_t_leaves_earlier_logits_alone(kind, positions):
    model = tiny(FF_CONFIGS[kind], positions=positions).double().eval()
    tokens = torch.randint(0, 17, (3, 9))
    changed = tokens.clone()
    t = 5
    changed[:, t] = (changed[:, t] + 1) % 17
    with torch.no_grad():
        a, b = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-12)
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-6


@pytest.mark.parametrize("kind", sorted(set(FF_CONFIGS) - {"sbase"}))
def test_causal_in_training_too(kind):
    """Training-mode routing is per token for every kind but S-BASE, whose Sinkhorn balances over the
    whole batch (future tokens included, as in the paper)."""
    cfg = FF_CONFIGS[kind]
    if kind == "sigma_moe":
        cfg = SigmaMoEConfig(n_experts=4, expert_size=6, k=3)  # expert dropout would re-draw per call
    model = tiny(cfg).double().train()
    tokens = torch.randint(0, 17, (2, 9))
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 3) % 17
    a, b = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["sigma_moe", "switch"])
def test_aux_loss_is_the_sum_of_the_layers_losses(kind):
    model = tiny(FF_CONFIGS[kind], n_layers=3).double()
    inputs = []
    for ff in model.feedforward_layers():
        ff.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].reshape(-1, 20)))
    out = model(torch.randint(0, 17, (2, 9)))
    assert out.logits.shape == (2, 9, 17) and out.memory is None
    per_layer = []
    for ff, x in zip(model.feedforward_layers(), inputs):
        probs = torch.softmax(x @ ff.selector.T, -1)
        if kind == "sigma_moe":
            p = probs.mean(0)
            per_layer.append(1e-3 * (p * p.log()).sum())
        else:
            f = torch.bincount(probs.argmax(-1), minlength=4).double() / x.shape[0]
            per_layer.append(0.01 * 4 * (f * probs.mean(0)).sum())
    assert len(per_layer) == 3 and len({round(v.item(), 12) for v in per_layer}) == 3
    torch.testing.assert_close(out.aux_loss, sum(per_layer))


def test_feedforward_layers_in_order():
    model = tiny(FF_CONFIGS["dense"], n_layers=3)
    assert [id(ff) for ff in model.feedforward_layers()] == [id(b.ff) for b in model.blocks]


def test_from_dict_builds_the_nested_feedforward():
    d = {
        "vocab_size": 17,
        "d_model": 20,
        "n_layers": 1,
        "n_heads": 4,
        "context": 9,
        "dropout": 0,
        "ff": {"kind": "sigma_moe", "n_experts": 4, "expert_size": 6, "k": 2, "entropy_reg": 1.0e-3},
    }
    cfg = build_config(TransformerConfig, d, "model")  # as the YAML loader builds it
    assert cfg.ff == SigmaMoEConfig(n_experts=4, expert_size=6, k=2) and cfg.dropout == 0.0
    assert TransformerLM(cfg)(torch.zeros(1, 9, dtype=torch.long)).logits.shape == (1, 9, 17)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"d_modle": 20}, r"unknown key 'model.d_modle' \(did you mean 'model.d_model'\?\)"),
        ({"ff": {"kind": "sigma_moe", "n_expert": 4}}, r"unknown key 'model.ff.n_expert'"),
        ({"ff": {"kind": "moe"}}, "model.ff.kind: unknown feedforward kind 'moe'"),
        (
            {"ff": {"kind": "dense", "d_ff": 8, "dropout": "0.1x"}},
            "model.ff.dropout: expected a number, got str '0.1x'",
        ),
        ({"ff": 3}, "model.ff: expected a mapping with a 'kind'"),
        ({"n_heads": 3}, "model.n_heads = 3: does not divide d_model = 20; set head_dim"),
        ({"n_layers": 2.5}, "model.n_layers: expected an integer, got float 2.5"),
        ({"positions": "rope"}, "model.positions = 'rope': choose one of"),
    ],
)
def test_config_errors_name_the_key(change, match):
    d = {"vocab_size": 17, "d_model": 20, "n_layers": 1, "n_heads": 4, "context": 9, "ff": {"kind": "dense", "d_ff": 8}}
    with pytest.raises(ConfigError, match=match):
        build_config(TransformerConfig, {**d, **change}, "model")
    with pytest.raises(ConfigError, match=r"missing required key\(s\) \['model.context'\]"):
        build_config(TransformerConfig, {k: v for k, v in d.items() if k != "context"}, "model")
    with pytest.raises(TypeError, match=r"TransformerConfig.n_layers: expected an integer, got float 2.5"):
        TransformerConfig(**{**d, "ff": DenseConfig(d_ff=8), "n_layers": 2.5})  # built directly: named by class
    with pytest.raises(ValueError, match=r"TransformerConfig.ff: expected a FeedForwardConfig"):
        TransformerConfig(**d)  # a mapping is the loader's business; the class takes a config


def test_head_dim_independent_of_d_model_and_context_limit():
    model = tiny(FF_CONFIGS["dense"], n_heads=3, head_dim=7)  # 3 × 7 = 21 != 20, like the paper's 10 × 41
    assert model.blocks[0].attn.qkv.weight.shape == (63, 20)
    assert model(torch.zeros(2, 9, dtype=torch.long)).logits.shape == (2, 9, 17)
    with pytest.raises(ValueError, match="sequence length 10 exceeds the model's context 9"):
        model(torch.zeros(1, 10, dtype=torch.long))
