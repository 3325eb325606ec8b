"""The GPU check's steps, run one after another, each in its own process, with one summary at the end.

``benchmarks/gpu_check.sh`` finds the Python and installs the repo into it, then runs this:

0. prerequisites: every module the steps import (named with its pip package when missing) and a CUDA
   device, checked before anything runs, so a machine without them fails in seconds, not midway;
1. the compiled Triton tests (``tests/kernels/test_triton_cvmm.py``, ``tests/kernels/test_cvmm.py``), junit XML;
2. ``bench_triton_gpu.py``: σ-MoE's TFLOP/s on active FLOPs against the dense MLP of the same active
   FLOPs (cuBLAS) and ``torch._grouped_mm``, d_model 1024, N_E 16/32/64/128 (K 4, G 128, bf16; the
   script's own default sweeps d_model 512/1024/2048);
3. ``gpu_train_check.py``: the default config trained through DeepSpeed in bf16 on the Triton backend
   (loss falls), against the torch backend (same losses within tolerance), and a checkpoint resumed.

``--cpu-smoke`` runs the same steps at tiny sizes on the CPU with the torch CVMM backend (the tests step
runs a quick CPU test file instead), to check this machinery without a GPU. Everything is written under
``--out``: each step's log, tests.xml, bench.json, train_check.json, summary.txt (the table printed at
the end) and summary.json; scratch/ (run dirs, checkpoints, data cache) is removed when every check
passed. ``--pack`` then moves all but the two summaries into ``gpu_check_files.tar.gz`` (for machines
that return few files). Exit status: 0 all passed, 1 a check failed, 2 prerequisites missing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_TESTS = ("tests/kernels/test_triton_cvmm.py", "tests/kernels/test_cvmm.py")
SMOKE_TESTS = ("tests/kernels/test_selection.py",)
# d_model 1024 only: each expert count compiles its own kernels (E_POW2), the time this check can spend
GPU_BENCH = ("--d-model", "1024", "--n-experts", "16", "32", "64", "128")
TABLE_D_MODEL = 1024  # the summary's TFLOP/s rows (N_E 16..128 at K 4, G 128)


@dataclass(frozen=True)
class Prerequisite:
    module: str
    pip: str
    used_by: str
    gpu_only: bool = False


PREREQUISITES = [
    Prerequisite("torch", "torch (a CUDA build)", "every step"),
    Prerequisite("triton", "triton (the one the CUDA torch pins)", "Triton kernels", gpu_only=True),
    Prerequisite("numpy", "numpy", "data, training"),
    Prerequisite("pytest", "pytest", "the Triton tests"),
    Prerequisite("yaml", "pyyaml", "configs"),
    Prerequisite("sentencepiece", "sentencepiece", "the default config's BPE tokenizer"),
    Prerequisite(
        "deepspeed",
        "deepspeed==0.19.8 (pure Python; needs hjson, pydantic, msgpack, py-cpuinfo, einops, ninja, psutil)",
        "the training engine",
    ),
    Prerequisite("datasets", "datasets (needs dill, multiprocess)", "reading the text file (data.dataset=text)"),
    Prerequisite("tqdm", "tqdm", "training"),
    Prerequisite("tensorboard", "tensorboard", "training logs (torch.utils.tensorboard)"),
    Prerequisite("matplotlib", "matplotlib", "the expert-load heat-map in TensorBoard"),
]


WHEELS_HINT = (
    "Offline, pure-Python packages can come as wheels: `bash benchmarks/gpu_check_wheels.sh DIR` where "
    "PyPI is reachable, then `WHEELS=DIR bash benchmarks/gpu_check.sh` here."
)


@dataclass
class Check:
    name: str
    status: str  # PASS | FAIL | SKIP | INFO
    seconds: float | None = None
    figures: str = ""
    data: dict = field(default_factory=dict)


def missing_prerequisites(prereqs: list[Prerequisite], *, gpu: bool) -> list[str]:
    """One line per module that does not import, with the package that provides it and why it failed
    (a module whose own dependency is missing fails on that one: the message names it)."""
    problems = []
    for p in prereqs:
        if p.gpu_only and not gpu:
            continue
        try:
            importlib.import_module(p.module)
        except Exception as e:  # noqa: BLE001 - an import can fail in many ways; report each
            problems.append(
                f"{p.module}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                f"(install {p.pip}; needed by {p.used_by})"
            )
    return problems


def prerequisites(args: argparse.Namespace) -> Check:
    gpu = not args.cpu_smoke
    t0 = time.perf_counter()
    problems = missing_prerequisites(PREREQUISITES, gpu=gpu)
    versions = []
    for mod in ("torch", "triton", "deepspeed"):
        m = sys.modules.get(mod)
        if m is not None:
            versions.append(f"{mod} {getattr(m, '__version__', '?')}")
    device = "cpu (smoke)"
    if "torch" in sys.modules:
        import torch

        if gpu and not torch.cuda.is_available():
            problems.append(
                "no CUDA device visible to torch (a CPU build of torch, or no GPU): this check needs "
                "a GPU; --cpu-smoke checks the scripts on the CPU"
            )
        elif gpu:
            device = f"{torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).multi_processor_count} SMs"
    figures = f"python {sys.version.split()[0]}, {', '.join(versions)}; {device}"
    (args.out / "env.txt").write_text(figures + "\n" + "".join(f"MISSING {p}\n" for p in problems))
    print(figures)
    for p in problems:
        print(f"MISSING {p}", file=sys.stderr)
    if problems:
        print(WHEELS_HINT, file=sys.stderr)
        figures = "missing: " + "; ".join(problems)
    return Check("prerequisites", "FAIL" if problems else "PASS", time.perf_counter() - t0, figures)


def run_step(
    args: argparse.Namespace, name: str, cmd: list[str], log: str, env: dict | None = None
) -> tuple[int | None, float]:
    """Run ``cmd`` from the repo root, its output both printed and written to ``out/log``; returns
    (exit status or None on timeout, seconds)."""
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(args.out / log, "w") as f:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )

        def copy_output() -> None:
            for line in proc.stdout:
                sys.stdout.write(line)
                f.write(line)

        reader = threading.Thread(target=copy_output, daemon=True)
        reader.start()
        timeout = step_timeout(args)
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the step and whatever it started
            proc.wait()
            status = None
        reader.join(timeout=10)
        sys.stdout.flush()
        if status is None:
            f.write(f"\ntimed out after {timeout:.0f} s\n")
    seconds = time.perf_counter() - t0
    print(f"=== {name}: {'timed out' if status is None else f'exit {status}'} after {seconds:.0f} s", flush=True)
    return status, seconds


def step_timeout(args: argparse.Namespace) -> float:
    """A step's limit: --step-timeout, or what is left of --total-timeout if that is less (the summary
    must still be written when the whole check runs under a limit of its own)."""
    left = args.total_timeout - (time.perf_counter() - args.started) - 10
    return max(1.0, min(args.step_timeout, left))


def _failed_run(name: str, status: int | None, seconds: float, log: str, args: argparse.Namespace) -> Check:
    why = f"timed out after {seconds:.0f} s" if status is None else f"exit status {status}"
    return Check(name, "FAIL", seconds, f"{why}; see {log}")


def tests_step(args: argparse.Namespace) -> list[Check]:
    files = [t for t in (SMOKE_TESTS if args.cpu_smoke else GPU_TESTS) if (ROOT / t).is_file()]
    xml = args.out / "tests.xml"
    env = {} if args.cpu_smoke else {"TRITON_INTERPRET": "0"}  # compiled kernels, not the interpreter
    status, seconds = run_step(
        args,
        "tests",
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=10", f"--junitxml={xml}", *files],
        "tests.log",
        env,
    )
    name = "CPU tests (smoke)" if args.cpu_smoke else "compiled Triton tests"
    if not xml.is_file():
        return [_failed_run(name, status, seconds, "tests.log", args)]
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in ET.parse(xml).getroot().iter("testsuite"):
        for k in counts:
            counts[k] += int(suite.get(k, 0))
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    ok = status == 0 and passed > 0 and not counts["failures"] and not counts["errors"]
    figures = (
        f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped "
        f"({', '.join(files)})"
    )
    return [Check(name, "PASS" if ok else "FAIL", seconds, figures, {**counts, "passed": passed})]


def bench_step(args: argparse.Namespace) -> list[Check]:
    out = args.out / "bench.json"
    cmd = [
        sys.executable,
        "benchmarks/bench_triton_gpu.py",
        "--json",
        str(out),
        *(("--smoke", "--backend", "torch") if args.cpu_smoke else GPU_BENCH),
    ]
    status, seconds = run_step(args, "benchmark", cmd, "bench.log")
    if status != 0 or not out.is_file():
        return [_failed_run("kernel benchmark", status, seconds, "bench.log", args)]
    return bench_checks(json.loads(out.read_text()), seconds)


def bench_checks(bench: dict, seconds: float) -> list[Check]:
    """A PASS row for the benchmark (it ran, its figures are finite, grouped_mm computed what σ-MoE
    does), then one INFO row of TFLOP/s per expert count at the table's d_model. The speed targets are
    figures, not pass/fail: they are what the GPU check is for finding out."""
    rows = [s for s in bench["summary"] if isinstance(s.get("n_experts"), int)]
    finite = all(math.isfinite(r["tflops"]) and r["tflops"] > 0 for r in bench["results"])
    met = sum(r["experts_vs_dense_active_tflops"] >= 0.7 for r in rows)
    ok = finite and not bench.get("mismatches") and rows
    figures = (
        f"{len(bench['results'])} timings; σ-MoE experts >= 70% of dense TFLOP/s at {met} of {len(rows)} "
        f"sizes"
        + ("" if finite else "; NON-FINITE or zero timings")
        + "".join(f"; {m}" for m in bench.get("mismatches", []))
    )
    checks = [Check("kernel benchmark", "PASS" if ok else "FAIL", seconds, figures)]
    table_d = (
        TABLE_D_MODEL if any(r["d_model"] == TABLE_D_MODEL for r in rows) else rows[0]["d_model"] if rows else None
    )
    for r in rows:
        if r["d_model"] != table_d:
            continue
        gm = r.get("grouped_mm_tflops")
        checks.append(
            Check(
                f"TFLOP/s d={r['d_model']} N_E={r['n_experts']}",
                "INFO",
                None,
                f"σ-MoE experts {r['experts_tflops']:.3g} (layer {r['layer_tflops']:.3g}) vs dense d_ff=K·G "
                f"{r['dense_active_tflops']:.3g}: {r['experts_vs_dense_active_tflops']:.2f}x; vs grouped_mm "
                + (f"{gm:.3g}: {r['experts_vs_grouped_mm_tflops']:.2f}x" if gm else "absent in this torch"),
                r,
            )
        )
    return checks


def train_step(args: argparse.Namespace) -> list[Check]:
    out = args.out / "train_check.json"
    cmd = [
        sys.executable,
        "benchmarks/gpu_train_check.py",
        "--json",
        str(out),
        "--work",
        str(args.scratch / "train"),
        *(("--cpu-smoke",) if args.cpu_smoke else ()),
    ]
    status, seconds = run_step(args, "training", cmd, "train.log")
    if not out.is_file():
        return [_failed_run("training", status, seconds, "train.log", args)]
    checks = [
        Check(c["name"], "PASS" if c["ok"] else "FAIL", c["figures"].get("seconds"), c["message"], c["figures"])
        for c in json.loads(out.read_text())["checks"]
    ]
    if status != 0 and all(c.status == "PASS" for c in checks):  # a crash after the checks were written
        checks.append(_failed_run("training", status, seconds, "train.log", args))
    return checks


def summarise(checks: list[Check], out: Path, *, title: str) -> int:
    """Print the table, write it to out/summary.txt (and out/summary.json); the exit status: 1 if any
    check failed."""
    failed = [c for c in checks if c.status == "FAIL"]
    lines = [title, "", "| check | result | seconds | figures |", "|---|---|---:|---|"]
    for c in checks:
        secs = "" if c.seconds is None else f"{c.seconds:.0f}"
        lines.append(f"| {c.name} | {c.status} | {secs} | {c.figures.replace('|', '/')} |")
    lines += ["", f"{'FAILED: ' + ', '.join(c.name for c in failed) if failed else 'all checks passed'}"]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    (out / "summary.txt").write_text(text)
    (out / "summary.json").write_text(
        json.dumps({"title": title, "ok": not failed, "checks": [vars(c) for c in checks]}, indent=1, default=str)
    )
    return 1 if failed else 0


def pack(out: Path) -> None:
    """Everything but the summaries into out/gpu_check_files.tar.gz (the originals removed, scratch/
    deleted)."""
    shutil.rmtree(out / "scratch", ignore_errors=True)  # checkpoints and caches: too big to send back
    keep = {"summary.txt", "summary.json", "gpu_check_files.tar.gz"}
    members = sorted(p for p in out.iterdir() if p.name not in keep)
    with tarfile.open(out / "gpu_check_files.tar.gz", "w:gz") as tar:
        for p in members:
            tar.add(p, arcname=p.name)
    for p in members:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for every log, result and the summary")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, torch backend")
    p.add_argument("--step-timeout", type=float, default=300.0, help="seconds after which a step is stopped")
    p.add_argument(
        "--total-timeout",
        type=float,
        default=570.0,
        help="seconds for the whole check; a step is stopped when they run out (default: under the "
        "10 minutes a command gets on the lent GPU machines)",
    )
    p.add_argument("--keep-scratch", action="store_true", help="keep out/scratch (runs, checkpoints) after a pass")
    p.add_argument("--pack", action="store_true", help="at the end, pack all but the summaries into one tarball")
    args = p.parse_args(argv)
    args.out = Path(args.out).resolve()
    args.scratch = args.out / "scratch"
    args.started = time.perf_counter()
    return args


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    title = f"sigma-moe GPU check{' (CPU smoke: tiny sizes, torch backend)' if args.cpu_smoke else ''}"
    checks = [prerequisites(args)]
    if checks[0].status == "FAIL":
        summarise(checks, args.out, title=title)
        return 2
    for step in (tests_step, bench_step, train_step):
        checks += step(args)
    status = summarise(checks, args.out, title=f"{title}, {time.perf_counter() - args.started:.0f} s in all")
    if status == 0 and not args.keep_scratch:
        shutil.rmtree(args.scratch, ignore_errors=True)
    if args.pack:
        pack(args.out)
    return status


if __name__ == "__main__":
    sys.exit(main())
