"""End to end: the tiny σ-MoE config trains through DeepSpeed in this process; loss falls, TensorBoard
holds every figure, the resolved config and checkpoints are written, and the run resumes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch_helpers import tiny_config, train_in_process
from sigma_moe.launch.checkpoint.manager import read_meta
from sigma_moe.launch.config import load_config
from sigma_moe.launch.data.splits import load_token_splits
from sigma_moe.launch.evaluate import unigram_perplexity

STEPS, EVERY, LOG_EVERY, WARMUP = 40, 20, 5, 5


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    cfg = tiny_config(
        run_dir,
        f"training.steps={STEPS}",
        f"checkpoint.every={EVERY}",
        f"training.log_every={LOG_EVERY}",
        f"schedule.warmup_steps={WARMUP}",
        f"training.eval_every={EVERY}",
    )
    return cfg, train_in_process(cfg), run_dir


def _events(run_dir):
    acc = EventAccumulator(str(run_dir / run_dir.name), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    return acc


def test_loss_decreases(tiny_run):
    cfg, result, _ = tiny_run
    assert result.steps == STEPS and len(result.losses) == STEPS
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert first > math.log(256) - 0.5  # starts near uniform over 256 bytes
    assert last < first - 1.0, (first, last)
    assert result.valid.loss < first - 1.0


def test_final_evaluation_covers_every_token(tiny_run):
    cfg, result, _ = tiny_run
    splits = load_token_splits(cfg.data)
    assert result.valid.n_tokens == len(splits.valid) - 1
    assert result.test.n_tokens == len(splits.test) - 1
    assert result.valid.perplexity == pytest.approx(math.exp(result.valid.loss))
    assert result.valid.bits_per_byte == pytest.approx(result.valid.loss / math.log(2))  # bytes: 1 byte/token
    assert result.unigram_perplexity == pytest.approx(unigram_perplexity(splits.train, splits.valid, 256))


def test_tensorboard_has_every_figure(tiny_run):
    cfg, result, run_dir = tiny_run
    acc = _events(run_dir)
    scalars = set(acc.Tags()["scalars"])
    expected = {
        f"train/{n}"
        for n in ("loss", "ce", "aux_loss", "perplexity", "lr", "grad_norm", "tokens_per_s", "tflops_per_s")
    }
    expected |= {f"{s}/{n}" for s in ("valid", "test") for n in ("loss", "perplexity", "bits_per_byte")}
    figures = ("selection_entropy", "max_mean_load", "min_mean_load", "starved_experts", "dead_experts", "balance_loss")
    figures += ("load_cv", "units_used_min", "units_used_mean")
    for group in ("routing", "routing_valid"):  # the training interval's, and each validation's
        expected |= {f"{group}/layer_{i:02d}/{n}" for i in range(cfg.model.n_layers) for n in figures}
        expected |= {f"{group}/model/{n}" for n in (*figures, "routed_slots_per_layer")}
    assert expected <= scalars, expected - scalars
    assert "train/mfu" not in scalars  # a CPU has no peak figure unless training.peak_tflops_per_device is set
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    # periodic validation at step 20, the full one at the end
    assert [e.step for e in acc.Scalars("valid/perplexity")] == [EVERY, STEPS]
    assert all(e.value > 0 and math.isfinite(e.value) for e in acc.Scalars("train/grad_norm"))

    # lr: linear warm-up then cosine to 0 over the run, from an independent formula
    lr = cfg.optimizer.lr
    for e in acc.Scalars("train/lr"):
        s = e.step
        want = lr * (
            (s + 1) / WARMUP if s < WARMUP else 0.5 * (1 + math.cos(math.pi * (s - WARMUP) / (STEPS - WARMUP)))
        )
        assert e.value == pytest.approx(want, rel=1e-5, abs=1e-9), s

    ff = cfg.model.ff
    for e in acc.Scalars("routing/layer_00/selection_entropy"):
        assert 0 < e.value <= 1  # normalised: 1 = uniform
    for e in acc.Scalars("routing/layer_01/max_mean_load"):
        assert 1.0 <= e.value <= ff.n_experts
    for e in acc.Scalars("routing/layer_01/balance_loss"):
        assert 0 <= e.value <= math.log(ff.n_experts)
    # histogram bucket e = expert e's share of the interval's routed slots: k per token of LOG_EVERY steps
    hists = acc.Histograms("routing/layer_00/load_share")
    assert len(hists) == STEPS // LOG_EVERY
    h = hists[-1].histogram_value
    assert len(h.bucket) == ff.n_experts and sum(h.bucket) == pytest.approx(1.0)
    slots = acc.Scalars("routing/model/routed_slots_per_layer")
    assert {e.value for e in slots} == {LOG_EVERY * cfg.training.batch_size * cfg.model.context * ff.k}
    assert set(acc.Tags()["images"]) == {
        "routing/load_heatmap",
        "routing/sorted_load",
        *(f"routing/layer_{i:02d}/{v}" for i in (0, 1) for v in ("balance_over_time", "units_over_time")),
    }
    for e in acc.Scalars("routing/layer_00/units_used_mean"):
        assert 0 < e.value <= 1
    # validation routing at the periodic evaluation and the final one, over every validation token
    assert [e.step for e in acc.Scalars("routing_valid/model/max_mean_load")] == [EVERY, STEPS]
    valid_slots = acc.Scalars("routing_valid/model/routed_slots_per_layer")[-1].value
    assert valid_slots >= result.valid.n_tokens * ff.k
    # images every logging.images_every = 100 steps and at the last: once in a 40-step run
    assert [i.step for i in acc.Images("routing/load_heatmap")] == [STEPS]
    assert acc.Images("routing/load_heatmap")[-1].width > 100 and acc.Images("routing/load_heatmap")[-1].height > 50


def test_resolved_config_and_checkpoints_written(tiny_run):
    cfg, result, run_dir = tiny_run
    assert load_config(run_dir / "config.yaml") == cfg
    ckpt = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000020", "step_00000040"]
    assert (ckpt / "latest").read_text() == "step_00000040" and result.checkpoint == ckpt / "step_00000040"
    meta = read_meta(ckpt / "step_00000040")
    assert meta["step"] == STEPS and meta["world_size"] == 1
    assert meta["model"]["ff"]["n_experts"] == cfg.model.ff.n_experts


def test_run_resumes_from_latest(tiny_run):
    cfg, first, run_dir = tiny_run
    cfg = load_config(run_dir / "config.yaml", [f"training.steps={STEPS + 5}", "training.eval_every=0"])
    again = train_in_process(cfg)
    assert again.start_step == STEPS and again.steps == STEPS + 5 and len(again.losses) == 5
    # it continued from the trained weights, not from scratch
    assert max(again.losses) < np.mean(first.losses[:5]) - 1.0


def test_unigram_perplexity_formula():
    train, valid = np.array([0, 0, 0, 1]), np.array([0, 1, 2])
    p = np.array([3 + 1, 1 + 1, 0 + 1]) / 7  # add-one counts over a vocabulary of 3
    assert unigram_perplexity(train, valid, 3) == pytest.approx(math.exp(-np.log(p).mean()))
