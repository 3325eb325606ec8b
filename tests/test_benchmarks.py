"""The layer benchmark runs end to end at toy sizes and prints every figure its README table quotes
(speed itself is measured by running it, not here)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_feedforward  # noqa: E402

TOY = ["--tokens", "64", "--d-model", "32", "--expert-size", "16", "--k", "2", "--repeats", "1", "--warmup", "0"]


def test_expert_sweep_prints_ratios_and_the_matmul_floor(capsys: pytest.CaptureFixture[str]) -> None:
    bench_feedforward.main([*TOY, "--experts", "4", "8", "16"])
    out = capsys.readouterr().out
    for name in ("dense_active", "sigma_moe_4", "sigma_moe_8", "sigma_moe_16"):
        assert re.search(rf"^{name}\s", out, re.M), f"no row for {name}:\n{out}"
    assert re.search(r"selector FLOPs alone would give: N_E=8: [\d.]+, N_E=16: [\d.]+", out)
    assert re.search(r"per-expert matmuls and selection alone would give: N_E=8: [\d.]+, N_E=16: [\d.]+", out)
    assert re.search(r"sigma_moe N_E=4 matmuls / dense_active matmuls: [\d.]+", out)
    # toy activations are within the allocator's noise: any number, even negative, is a printed figure
    assert re.search(r"activation memory over the sweep: \S+ of N_E=4's", out)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_matmul_floor_covers_every_routed_row_once(dtype: str) -> None:
    """The floor's per-expert segments are the layer's real routing: all N·K rows, in order, none twice;
    its buffers take the layer's dtype."""
    args = bench_feedforward.parse_args([*TOY, "--experts", "8", "--dtype", dtype])
    segments, step = bench_feedforward.make_matmul_step(bench_feedforward.expert_sweep(args)[1], args)
    step()
    assert segments[0][1] == 0 and segments[-1][2] == args.tokens * args.k
    assert all(a < b for _, a, b in segments)
    assert all(end == start for (_, _, end), (_, start, _) in zip(segments, segments[1:]))
    assert len({e for e, _, _ in segments}) == len(segments) > 1


def test_monitor_benchmark_prints_its_costs(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_monitor

    got = bench_monitor.main(
        ["--tokens", "64", "--d-model", "16", "--expert-size", "8", "--layers", "1", "--repeats", "1"]
    )
    out = capsys.readouterr().out
    for line in ("hidden-unit tracking", "after_forward", "reduce (one process)", "scalars and bars", "images"):
        assert line in out, out
    assert all(v > 0 for v in got.values()), got
