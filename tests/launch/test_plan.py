"""``sigma-moe plan``: the report and its JSON, every assumption printed and overridable, a
recommendation that fits and is fastest; and the plan against real CPU runs of the tiny config with 8
experts at 1, 2 and 4 ranks (the all-to-all bytes the exchange meter and TensorBoard count, the FLOPs
torch's FLOP counter counts, the bytes the engine and autograd hold)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from launch_helpers import ROOT, TINY, one_thread, restored_environ, tiny_config
from sigma_moe.launch.cli import main
from sigma_moe.launch.plan import make_plan

EIGHT = "model.ff.n_experts=8"
KEYS = ("a2a_mb_per_step_per_rank", "memory_bytes_per_rank", "flops_per_step", "step_time_s")


def plan_cli(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["plan", str(TINY), "--set", EIGHT, *args])
    out, err = capsys.readouterr()
    return status, out, err


def test_json_has_the_figures_and_the_recommendation(capsys):
    status, out, _ = plan_cli(capsys, "--gpus", "2", "--set", "distributed.expert_parallel_size=2", "--json")
    assert status == 0
    plan = json.loads(out)
    assert all(plan[k] > 0 for k in KEYS)
    alternatives = {a["expert_parallel_size"]: a for a in plan["alternatives"]}
    assert sorted(alternatives) == [1, 2] and plan["best_expert_parallel_size"] in alternatives
    assert alternatives[1]["a2a_mb_per_step_per_rank"] == 0 < alternatives[2]["a2a_mb_per_step_per_rank"]
    best = alternatives[plan["best_expert_parallel_size"]]
    assert best["why"] == "recommended" and best["fits"]
    assert best["step_time_s"] == min(a["step_time_s"] for a in plan["alternatives"] if a["fits"])
    # as configured: EP 2 within one node, all of it over NVLink
    assert plan["a2a_intra_node_mb"] == plan["a2a_mb_per_step_per_rank"] and plan["a2a_inter_node_mb"] == 0


def test_the_installed_command_prints_only_json():
    """A fresh process (DeepSpeed loads there for the first time and logs as it does): stdout is the
    JSON object alone, fit for ``| jq``; the log goes to stderr."""
    script = Path(sys.executable).parent / "sigma-moe"
    proc = subprocess.run(
        [str(script), "plan", str(TINY), "--gpus", "2", "--json"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["gpus"] == 2


def test_every_assumption_is_printed_and_overridable(capsys):
    base = ("--gpus", "4", "--gpus-per-node", "2", "--set", "distributed.expert_parallel_size=4")
    status, text, _ = plan_cli(capsys, *base)
    assert status == 0
    for key in (
        "mfu",
        "peak_tflops",
        "device_memory_gib",
        "usable_memory",
        "intra_node_gb_per_s",
        "inter_node_gb_per_s",
    ):
        assert f"plan.{key} = " in text
    assert "recommended: expert_parallel_size=" in text and "why not" in text
    _, out, _ = plan_cli(capsys, *base, "--json")
    _, slow, _ = plan_cli(capsys, *base, "--json", "--set", "plan.mfu=0.2", "--set", "plan.inter_node_gb_per_s=5")
    plan, slow = json.loads(out), json.loads(slow)
    assert slow["compute_s"] == pytest.approx(2 * plan["compute_s"])
    # EP 4 over nodes of 2: one of the three other ranks is in the node, two are not
    assert plan["a2a_inter_node_mb"] == pytest.approx(2 * plan["a2a_intra_node_mb"])
    inter = plan["a2a_inter_node_mb"] * 1e6
    assert slow["a2a_s"] - plan["a2a_s"] == pytest.approx(inter / 5e9 - inter / 50e9)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--gpus", "3"), "training.batch_size: 8 sequences cannot be split over 3 ranks"),
        (("--gpus", "2", "--set", "plan.mfu=2"), r"plan.mfu = 2.0: must lie in \(0, 1\]"),
        (("--gpus", "2", "--set", "plan.mfuu=0.3"), "plan.mfuu"),
    ],
)
def test_bad_input_is_one_line_with_exit_2(capsys, args, message):
    import re

    status, out, err = plan_cli(capsys, *args)
    assert status == 2 and not out and len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_a_config_that_rules_out_zero_stages_is_planned_without_them(capsys):
    """on_divergence: skip needs ZeRO 0: the plan weighs only what the config allows, not an error."""
    status, out, err = plan_cli(capsys, "--gpus", "2", "--set", "training.on_divergence=skip", "--json")
    assert status == 0, err
    plan = json.loads(out)
    assert plan["alternatives"] and all(a["zero_stage"] == 0 for a in plan["alternatives"])


def test_memory_decides_the_recommendation(tmp_path):
    from sigma_moe.launch.guards.memory_estimate import GIB, parameter_counts
    from sigma_moe.launch.plan import candidates, cluster

    cfg = tiny_config(tmp_path, EIGHT)
    roomy = make_plan(cfg, gpus=4)
    assert roomy.best.fits and roomy.best_per_ep[1].fits  # 72 GiB: everything fits, the fastest wins
    assert roomy.best.step_s == min(x.step_s for x in roomy.best_per_ep.values())
    assert not roomy.best.checkpointing and roomy.best.accumulation == 1  # no recompute, the largest micro-batch
    every = candidates(cfg, cluster(4, 8, "h100", "fp32", {}), parameter_counts(cfg))
    ep1 = min(x.memory_bytes for x in every if x.ep == 1)  # EP 1 at its leanest (ZeRO 2, recompute, ...)
    assert min(x.memory_bytes for x in every if x.ep > 1) < ep1
    tight = make_plan(cfg, gpus=4, plan_overrides={"device_memory_gib": (ep1 - 1) / GIB, "usable_memory": 1.0})
    assert not tight.best_per_ep[1].fits and tight.best.fits and tight.best.ep > 1
    assert tight.best.memory_bytes < ep1
    nothing = make_plan(cfg, gpus=4, plan_overrides={"device_memory_gib": 1e-6})
    assert not nothing.best.fits


def test_reach_is_the_share_of_expert_choices_touching_another_rank():
    """Uniform routing, counted: every K-subset of the E experts, the other ranks holding one of them."""
    from itertools import combinations

    from sigma_moe.distributed.exchange_volume import rows_sent_per_token

    for n_experts, ep, k in ((8, 2, 2), (8, 4, 2), (12, 3, 4), (6, 6, 1)):
        per = n_experts // ep
        subsets = list(combinations(range(n_experts), k))
        others = sum(len({e // per for e in s} - {0}) for s in subsets)  # from rank 0
        assert rows_sent_per_token(n_experts=n_experts, ep_size=ep, k=k) == pytest.approx(others / len(subsets))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    from plan_measure import measure_step
    from ranks import run_ranks

    out = {}
    for w in (1, 2, 4):
        sets = (EIGHT, f"distributed.expert_parallel_size={w}")
        run_dir = tmp_path_factory.mktemp(f"w{w}")
        if w == 1:  # in this process: a spawned rank's start-up would be most of its time
            with restored_environ(), one_thread():
                ranks = [measure_step(0, 1, str(run_dir), *sets)]
        else:
            ranks = run_ranks(measure_step, w, str(run_dir), *sets, timeout=300)
        out[w] = (ranks, make_plan(tiny_config(run_dir, *sets), gpus=w))
    return out


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_the_plan_matches_a_real_step(measured, world):
    ranks, plan = measured[world]
    g = plan.given
    a2a = statistics.mean(r["a2a_bytes"] for r in ranks) / 1e6
    flops = sum(r["flops"] for r in ranks)
    saved = statistics.mean(r["saved_activations"] for r in ranks)
    kept = ("block inputs", "block activations, attention's included", "logits", "received expert rows")
    predicted_saved = sum(g.memory.get(k, 0) for k in kept)
    print(
        f"W={world}: a2a MB {a2a:.4f} measured, {g.a2a_mb:.4f} planned; FLOPs {flops:,} vs {g.flops_per_step:,.0f}; "
        f"saved activations {saved:,.0f} vs {predicted_saved:,}; "
        + "; ".join(f"{k} {ranks[0][k]:,} vs {g.memory[k]:,}" for k in ("weights", "gradients", "optimizer state"))
        + f"; peak RSS growth {[r['rss_peak_delta'] for r in ranks]}"
    )
    if world == 1:
        assert a2a == g.a2a_mb == 0
    else:
        assert g.a2a_mb == pytest.approx(a2a, rel=0.15)
    assert g.flops_per_step == pytest.approx(flops, rel=0.01)
    for r in ranks:
        assert r["weights"] == g.memory["weights"] and r["gradients"] == g.memory["gradients"]
        assert r["optimizer state"] == pytest.approx(g.memory["optimizer state"], rel=0.01)  # + AdamW's step counters
    assert predicted_saved == pytest.approx(saved, rel=0.15)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_the_planned_all_to_all_is_what_a_torchrun_run_logs(tmp_path, capsys):
    """The bar: a 5-step 2-rank torchrun run of the tiny config with 8 experts and EP 2 logs
    routing/a2a_mb_per_step within 15 % of the plan's a2a_mb_per_step_per_rank."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from launcher_runs import finish, launch

    sets = (EIGHT, "distributed.expert_parallel_size=2")
    run = tmp_path / "bar"
    # a sixth of the slice: the final evaluation (an all-to-all per batch) is not what is measured
    finish(launch("torchrun", run, *sets, "training.steps=5", "checkpoint.save_final=false", "data.max_chars=30000"))
    acc = EventAccumulator(str(run / run.name), size_guidance={"scalars": 0})
    acc.Reload()
    logged = [e.value for e in acc.Scalars("routing/a2a_mb_per_step")]
    status, out, _ = plan_cli(capsys, "--gpus", "2", "--set", sets[1], "--json")
    planned = json.loads(out)["a2a_mb_per_step_per_rank"]
    print(f"routing/a2a_mb_per_step over 5 steps: {logged}; planned {planned}")
    assert status == 0 and len(logged) == 5
    assert planned == pytest.approx(statistics.mean(logged), rel=0.15)


def test_readme_table_is_the_planners():
    """A row of the README's planner table, recomputed: the 262M σ-MoE on 64 H100s."""
    from sigma_moe.launch.config import load_config

    cfg = load_config(ROOT / "configs/paper/wt103-262m-sigma-moe.yaml", ["training.batch_size=512"])
    best = make_plan(cfg, gpus=64).best
    g = lambda x: f"{x * 1e3:.1f}"  # noqa: E731
    row = (
        f"| 262M | 64 | EP {best.ep}, micro-batch {best.micro_batch} | {best.memory_bytes / 2**30:.1f} | "
        f"{best.a2a_mb:,.0f} (all NVLink) | {g(best.compute_s)} + {g(best.a2a_s)} + {g(best.allreduce_s)} = "
        f"{g(best.step_s)} |"
    )
    assert row in (ROOT / "README.md").read_text()
