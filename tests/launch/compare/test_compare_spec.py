"""The comparison spec: its errors (each names the key and the fix), sizes picking variants and seeds,
the reuse of a run finished before a config field was added, and the committed specs' grids (sizes,
parameter parity, FLOPs)."""

import pytest

from launch_helpers import ROOT
from sigma_moe.config_check import ConfigError
from sigma_moe.launch.compare.spec import expand_grid, load_spec, spec_from_dict
from sigma_moe.launch.config import config_to_dict

TINY_SPEC = ROOT / "configs" / "compare" / "tiny.yaml"
COMPARE = ROOT / "configs" / "compare"


def test_a_run_finished_before_a_config_field_was_added_is_reused():
    """An older run.yaml lacks the fields added since; at their defaults it is the same run."""
    import copy

    run = expand_grid(load_spec(TINY_SPEC), "/nonexistent")[0]
    saved = copy.deepcopy(run.computed_config())
    del saved["training"]["on_divergence"], saved["training"]["max_skipped_steps"]
    assert run.same_as_saved(saved)
    saved["training"]["steps"] += 1
    assert not run.same_as_saved(saved)


def spec_dict(**changes):
    d = {
        "config": "../tiny.yaml",
        "match": "moe",
        "variants": {
            "moe": {"ff": {"kind": "sigma_moe", "n_experts": 4, "expert_size": 16, "k": 2}},
            "dense": {"ff": {"kind": "dense", "d_ff": "auto"}},
        },
    }
    d.update(changes)
    return d


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"seedz": [1]}, r"unknown key 'seedz' \(did you mean 'seeds'\?\)"),
        ({"match": "nope"}, "match: 'nope' is not a variant"),
        ({"config": "missing.yaml"}, "does not exist"),
        (
            {"variants": {"moe": {"ff": {"kind": "sigma_moe", "n_experts": "auto", "expert_size": 16, "k": 2}}}},
            "cannot have an 'auto' field",
        ),
        (
            {"variants": {"moe": {"ff": {"kind": "sigma_moe", "n_experts": 4, "expert_size": 16, "k": 2}, "lr": 1}}},
            "unknown key 'variants.moe.lr'; valid keys of variants.moe",
        ),
        ({"seeds": [0, "1"]}, "seeds: expected an integer, got str '1'"),
        ({"sizes": {"s": {"ff": {"other": {"k": 1}}}}}, "sizes.s.ff: 'other' is not a variant"),
        ({"set": {"model.ff.k": 3}}, "set feedforward fields there"),
        ({"set": {"training.stepz": 3}}, "did you mean 'training.steps'"),
        (
            {"sizes": {"s": {"variants": ["moe", "other"]}}},
            "sizes.s.variants: 'other' is not a variant",
        ),
        ({"sizes": {"s": {"seeds": []}}}, r"sizes.s.seeds = \[\]: give a non-empty list"),
        ({"baseline": "other"}, "baseline: 'other' is not a variant"),
        ({"sizes": {"a/b": {}}}, "sizes.a/b: names become folder names"),
        ({"match": "nope", "baseline": "other"}, "(?s)match: 'nope' is not.*baseline: 'other' is not"),  # all at once
        (
            {"variants": {"moe": {"ff": {"n_experts": 4}}, "dense": {"ff": {"d_ff": 8}}}},
            "variants.moe.ff: missing 'kind'",
        ),
    ],
)
def test_bad_spec_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        spec = spec_from_dict(spec_dict(**changes), COMPARE / "inline.yaml")
        expand_grid(spec, "/nonexistent")


def test_size_picks_its_variants_and_seeds():
    spec = spec_from_dict(
        spec_dict(seeds=[0], sizes={"a": {}, "b": {"variants": ["dense"], "seeds": [3, 4]}}), COMPARE / "inline.yaml"
    )
    runs = expand_grid(spec, "/nonexistent")
    assert [(r.size, r.variant, r.seed) for r in runs] == [
        ("a", "moe", 0),
        ("a", "dense", 0),
        ("b", "dense", 3),
        ("b", "dense", 4),
    ]
    # the match variant sets b's budget although it does not run there
    assert runs[2].target_params == runs[0].target_params and runs[2].cfg.model.ff.d_ff == runs[1].cfg.model.ff.d_ff


def sizing(spec_name):
    runs = expand_grid(load_spec(COMPARE / spec_name), "/nonexistent")
    return {(r.size, r.variant): r for r in runs}, runs


def test_repro_spec_grid():
    by, runs = sizing("repro-wiki.yaml")
    assert sorted((r.variant, r.seed) for r in runs) == sorted(
        [
            ("dense", 0),
            ("dense", 1),
            ("sigma_moe", 0),
            ("sigma_moe", 1),
            ("switch", 0),
            ("sbase", 0),
            ("pkm", 0),
            ("topk", 0),
        ]
    )
    cfgs = [r.cfg for r in runs]
    assert {(c.data.dataset, c.data.vocab_size, c.model.n_layers, c.training.steps) for c in cfgs} == {
        ("wiki_offline", 8000, 4, 450)
    }

    # identical data, schedule and seeds: the configs differ only in model.ff, the seed and the run folder
    def strip(r):
        return {
            **config_to_dict(r.cfg),
            "model": {**config_to_dict(r.cfg.model), "ff": None},
            "training": {**config_to_dict(r.cfg.training), "seed": None},
            "logging": None,
        }

    assert all(strip(r) == strip(runs[0]) for r in runs)
    assert by[("default", "sigma_moe")].mlp_flops / by[("default", "dense")].mlp_flops == pytest.approx(0.25, abs=0.01)
    target = by[("default", "sigma_moe")].params
    for name in ("dense", "topk"):
        assert abs(by[("default", name)].params - target) / target < 1e-3


def test_paper_spec_gives_the_paper_sizes():
    by, _ = sizing("paper-wt103-47m.yaml")
    assert by[("default", "dense")].cfg.model.ff.d_ff == 2053
    assert by[("default", "topk")].cfg.model.ff.d_ff == 2053
    assert by[("default", "pkm")].cfg.model.ff.n_keys == 62
    by, _ = sizing("paper-237m-many-experts.yaml")
    assert by[("e128", "sigma_moe")].params == pytest.approx(237e6, rel=0.01)  # the paper's 237M model


def test_ladder_spec_rungs():
    by, runs = sizing("ladder.yaml")
    assert sorted(
        {
            (r.size, r.variant): len([q for q in runs if (q.size, q.variant) == (r.size, r.variant)]) for r in runs
        }.items()
    ) == [
        (("r1", "dense"), 2),
        (("r1", "sigma_moe"), 2),
        (("r1", "sigma_moe_xdrop"), 2),
        (("r2", "dense"), 1),
        (("r2", "sigma_moe"), 1),
        (("r2", "sigma_moe_k8"), 1),
        (("r2", "switch"), 1),
        (("r3", "dense"), 2),
        (("r3", "sigma_moe"), 2),
    ]
    for rung in ("r1", "r2", "r3"):  # parameter-equal at every rung, a quarter of the dense MLP's FLOPs
        moe, dense = by[(rung, "sigma_moe")], by[(rung, "dense")]
        assert abs(dense.params - moe.params) / moe.params < 1e-3
        assert moe.mlp_flops / dense.mlp_flops == pytest.approx(0.25, abs=0.01)
    # the ablations differ from their rung's σ-MoE only where the paper's ablation table says
    xdrop, k8 = by[("r1", "sigma_moe_xdrop")], by[("r2", "sigma_moe_k8")]
    assert (
        xdrop.cfg.model.ff.expert_dropout == 0.05
        and xdrop.cfg.model.ff.k == 4
        and xdrop.params == by[("r1", "sigma_moe")].params
    )
    assert (k8.cfg.model.ff.n_experts, k8.cfg.model.ff.expert_size, k8.cfg.model.ff.k) == (32, 64, 8)
    assert abs(k8.params - by[("r2", "sigma_moe")].params) / k8.params < 3e-3  # only the selector grows
    r1, r2, r3 = (by[(r, "sigma_moe")].cfg for r in ("r1", "r2", "r3"))
    assert (r1.model.ff.expert_size * r1.model.ff.k, r2.model.ff.expert_size * r2.model.ff.k) == (256, 512)
    assert r3.training.steps == 4 * r2.training.steps and r3.model == r2.model
    # r1 is repro-wiki's σ-MoE and dense, unchanged
    repro, _ = sizing("repro-wiki.yaml")
    assert by[("r1", "sigma_moe")].cfg == repro[("default", "sigma_moe")].cfg.__class__(
        **{**vars(repro[("default", "sigma_moe")].cfg), "logging": by[("r1", "sigma_moe")].cfg.logging}
    )


@pytest.mark.parametrize("spec_name", ["expert-scaling.yaml", "paper-237m-many-experts.yaml"])
def test_expert_scaling_holds_active_flops(spec_name):
    by, _ = sizing(spec_name)
    sizes = ["e16", "e32", "e64", "e128"]
    moe = [by[(s, "sigma_moe")] for s in sizes]
    assert [r.cfg.model.ff.n_experts for r in moe] == [16, 32, 64, 128]
    d, n_layers = moe[0].cfg.model.d_model, moe[0].cfg.model.n_layers
    expert_flops = {r.mlp_flops - 2 * r.cfg.model.ff.n_experts * d * n_layers for r in moe}  # minus the selector
    assert len(expert_flops) == 1
    for s in sizes:  # dense tracks each point's parameters
        assert abs(by[(s, "dense")].params - by[(s, "sigma_moe")].params) / by[(s, "sigma_moe")].params < 1e-3


@pytest.mark.parametrize("spec_name", ["k-g-ablation.yaml", "paper-wt103-47m-k-g.yaml"])
def test_k_g_ablation_holds_parameters_and_flops(spec_name):
    _, runs = sizing(spec_name)
    moe = [r for r in runs if r.cfg.model.ff.kind == "sigma_moe"]
    ks = sorted(r.cfg.model.ff.k for r in moe)
    assert ks == [1, 2, 4, 8]
    assert len({r.cfg.model.ff.k * r.cfg.model.ff.expert_size for r in moe}) == 1
    assert len({r.cfg.model.ff.n_experts * r.cfg.model.ff.expert_size for r in moe}) == 1
    assert max(r.params for r in moe) / min(r.params for r in moe) < 1.005  # only the selector differs
