"""The version matrix: install sigma-moe into environments that already hold a given torch, triton and
DeepSpeed, from plain PyPI, and check that it works there. Not in CI: each venv is several GB (torch's
CUDA build) and takes minutes to build; run it before changing a range in pyproject.toml.

For each setup: a fresh venv under ``--venvs`` gets the setup's packages first (as a GPU image holds
its own torch), then ``pip install -e '.[test]'`` of a fresh clone of this repository's HEAD. Then:
- install: whether that kept the venv's torch and triton (``kept``) or replaced them;
- kernel tests: ``tests/kernels/test_triton_cvmm.py`` and ``tests/kernels/test_cvmm.py`` (Triton in its interpreter);
- tiny run: ``sigma-moe train configs/tiny.yaml``, its final validation perplexity;
- 2-rank EP run: the same under ``torchrun --nproc_per_node 2`` with expert_parallel_size 2;
and again the two runs after ``pip install deepspeed==V`` for each of the setup's other DeepSpeeds.
Prints one markdown table (the README's, "Versions"); exits 1 when a cell failed.

    python tools/version_matrix.py                     # every setup below, venvs in /tmp/sigma-moe-matrix
    python tools/version_matrix.py --only oldest --venvs /work/venvs --keep

pip runs with no configuration (no local wheel folders, indexes or constraints) and a fresh HOME;
``--venvs DIR/pip-cache`` keeps the downloads between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAIN_PYPI_UNSET = ("PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL")


@dataclass(frozen=True)
class Setup:
    name: str
    packages: tuple[str, ...]  # what the environment holds before sigma-moe is installed
    other_deepspeeds: tuple[str, ...] = ()  # then each of these, the two runs again


SETUPS = (
    # the oldest torch: a GPU image we know (torch 2.11 pins triton 3.6.0; its interpreter needs numpy < 2.4)
    Setup("oldest", ("torch==2.11.0", "triton==3.6.0", "numpy<2.4", "deepspeed==0.19.8"), ("0.18.9",)),
    # the newest torch the range allows, with whatever triton and numpy it brings
    Setup("newest", ("torch==2.15.0", "deepspeed==0.19.8")),
)


@dataclass
class Row:
    setup: str
    versions: dict[str, str] = field(default_factory=dict)
    install: str = "-"
    kernel_tests: str = "-"
    tiny: str = "-"
    ep: str = "-"
    failed: bool = False

    def cells(self) -> list[str]:
        v = self.versions
        return [
            v.get("torch", "-"),
            v.get("triton", "-"),
            v.get("numpy", "-"),
            v.get("deepspeed", "-"),
            self.install,
            self.kernel_tests,
            self.tiny,
            self.ep,
        ]


HEADER = ["torch", "triton", "numpy", "deepspeed", "install", "kernel tests", "tiny run (ppl)", "2-rank EP (ppl)"]


def plain_pypi_env(home: Path, cache: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PLAIN_PYPI_UNSET}
    env.update(HOME=str(home), PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    if cache is not None:
        env["PIP_CACHE_DIR"] = str(cache)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "TRITON_INTERPRET"):
        env.pop(k, None)
    return env


def run(cmd: list[str], *, cwd: Path, env: dict[str, str], log: Path, timeout: int = 3600) -> tuple[int, str]:
    """Run ``cmd``; its output is appended to ``log`` and returned."""
    print(f"  $ {' '.join(cmd)}", flush=True)
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        out, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, code = f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout} s", 124
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n{out}\n[exit {code}]\n")
    return code, out


def versions(python: Path, env: dict[str, str]) -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m\n"
        "out = {}\n"
        "for n in ('torch', 'triton', 'numpy', 'deepspeed'):\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    return json.loads(subprocess.run([str(python), "-c", code], env=env, capture_output=True, text=True).stdout)


def final_perplexity(output: str) -> str | None:
    m = re.search(r"done: .*\n\s+valid loss [\d.]+, perplexity ([\d.]+)", output)
    return m.group(1) if m else None


def tests_summary(code: int, output: str) -> str:
    m = re.findall(r"(\d+) (passed|failed|error)", output)
    counts = {kind: int(n) for n, kind in m}
    if code == 0 and counts.get("passed"):
        return f"{counts['passed']} passed"
    return f"FAILED ({', '.join(f'{n} {k}' for k, n in counts.items()) or f'exit {code}'})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_runs(row: Row, venv: Path, src: Path, env: dict[str, str], log: Path, work: Path) -> None:
    bin_dir = venv / "bin"
    run_env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    tag = row.versions.get("deepspeed", "ds")
    code, out = run(
        [str(bin_dir / "sigma-moe"), "train", "configs/tiny.yaml", "--set", f"logging.run_dir={work}/tiny-{tag}"],
        cwd=src,
        env=run_env,
        log=log,
    )
    ppl = final_perplexity(out) if code == 0 else None
    row.tiny = ppl or f"FAILED (exit {code})"
    code, out = run(
        [
            str(bin_dir / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),  # not torchrun's default 29500: another job on the machine may hold it
            "-m",
            "sigma_moe.launch.train",
            "configs/tiny.yaml",
            "--set",
            "distributed.expert_parallel_size=2",
            "--set",
            f"logging.run_dir={work}/ep2-{tag}",
        ],
        cwd=src,
        env=run_env,
        log=log,
    )
    ep_ppl = final_perplexity(out) if code == 0 else None
    row.ep = ep_ppl or f"FAILED (exit {code})"
    row.failed |= ppl is None or ep_ppl is None


def check_setup(setup: Setup, root: Path, cache: Path | None, keep: bool) -> list[Row]:
    venv, src, work = root / setup.name, root / f"{setup.name}-src", root / f"{setup.name}-runs"
    log = root / f"{setup.name}.log"
    print(f"{setup.name}: {' '.join(setup.packages)} (log {log})", flush=True)
    home = Path(tempfile.mkdtemp(prefix="matrix-home-"))
    env = plain_pypi_env(home, cache)
    for path in (src, work):
        shutil.rmtree(path, ignore_errors=True)
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(src)], check=True)
    python, pip = venv / "bin" / "python", [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    row = Row(setup.name)
    rows = [row]
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    code, _ = run([*pip, *setup.packages], cwd=src, env=env, log=log)
    if code:
        row.install, row.failed = f"FAILED: pip install {' '.join(setup.packages)}", True
        return rows
    before = versions(python, env)
    code, _ = run([*pip, "-e", ".[test]"], cwd=src, env=env, log=log)
    row.versions = after = versions(python, env)
    changed = [f"{n} {before.get(n)} -> {after.get(n)}" for n in ("torch", "triton") if before.get(n) != after.get(n)]
    row.install = "FAILED" if code else ("replaced " + ", ".join(changed) if changed else "kept")
    row.failed |= bool(code or changed)
    if code:
        return rows
    code, out = run(
        [
            str(python),
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/kernels/test_triton_cvmm.py",
            "tests/kernels/test_cvmm.py",
        ],
        cwd=src,
        env={**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"},
        log=log,
    )
    row.kernel_tests = tests_summary(code, out)
    row.failed |= code != 0
    train_runs(row, venv, src, env, log, work)
    for ds in setup.other_deepspeeds:
        code, _ = run([*pip, f"deepspeed=={ds}"], cwd=src, env=env, log=log)
        other = Row(setup.name, versions(python, env), install="kept" if code == 0 else "FAILED")
        rows.append(other)
        if code == 0:
            train_runs(other, venv, src, env, log, work)
        other.failed |= code != 0
    if not keep:
        for path in (venv, src, work):
            shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venvs", type=Path, default=Path(tempfile.gettempdir()) / "sigma-moe-matrix")
    parser.add_argument("--only", action="append", choices=[s.name for s in SETUPS], help="these setups (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep each venv (reused by the next run), clone and runs")
    parser.add_argument("--no-cache", action="store_true", help="no pip cache under --venvs")
    args = parser.parse_args(argv)
    args.venvs.mkdir(parents=True, exist_ok=True)
    cache = None if args.no_cache else args.venvs / "pip-cache"
    rows: list[Row] = []
    for setup in SETUPS:
        if not args.only or setup.name in args.only:
            rows += check_setup(setup, args.venvs.resolve(), cache, args.keep)
    print(table(rows))
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
