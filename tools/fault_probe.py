"""Fault-injection probe of "never lose a run silently" (issue 23): one tiny 6-step run (checkpoints at
2, 4, 6) as the source, then per fault a copy of it, damaged, and a real ``sigma-moe`` process on it.

Each outcome is classed: recovered (exit 0, resumed from the step expected), one-line error (exit 2,
the error the last line of stderr, no traceback), traceback, or silent loss (exit 0 where the fault
must stop the run, or a resume from another step than the intact one). Prints one line per fault and
the totals. About 20 processes: a few minutes on an idle laptop.

    .venv/bin/python tools/fault_probe.py [--out /tmp/fault-probe] [--only NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SLICE = ROOT / "tests" / "data" / "shakespeare_slice.txt"
SIX = ["training.steps=6", "checkpoint.every=2", "checkpoint.keep_last=3", "training.eval_every=0"]
EXPLODE = [
    "training.steps=12",
    "checkpoint.every=1",
    "optimizer.lr=1e3",
    "training.grad_clip=0",
    "training.eval_every=0",
]
BUILD = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00}q\x01X\x05\x00\x00\x00pwnedq\x02K\x01sb."


def sigma_moe(command: str, run_dir: Path, *sets: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    base = [f"logging.run_dir={run_dir}", f"data.path={SLICE}", f"data.cache_dir={run_dir.parent / 'cache'}"]
    argv = [str(Path(sys.executable).with_name("sigma-moe")), command, str(TINY), *extra]
    argv += [a for s in [*base, "logging.progress_bar=false", *sets] for a in ("--set", s)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return subprocess.run(argv, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)


def _torch_zip(path: Path, pickle_bytes: bytes) -> None:
    path.unlink(missing_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/version", "3\n")


def _payload(path: Path, kind: str) -> None:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from test_safe_load import _craft, _Reduce, _StorageRef, _tensor

    if kind == "bytearray":
        _craft(path, {"step": 6, "x": _Reduce(bytearray, 2**31)})
    elif kind == "ndarray":
        _craft(path, {"x": _Reduce(np.zeros(1).__reduce__()[0], np.ndarray, (256,) * 4, b"b")})
    elif kind == "storage":
        _craft(path, {"w": _tensor(_StorageRef("0", 2**28), (4,), (1,))}, {"0": b"\0" * 16})
    elif kind == "sizes":
        _craft(path, {"w": _tensor(_StorageRef("0", 4), (3, 3), (3, 1))}, {"0": b"\0" * 16})
    elif kind == "build":
        _torch_zip(path, BUILD)
    elif kind == "code":
        _craft(path, {"x": _Reduce(os.system, "touch pwned")})
    del torch


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-200:-168] = bytes(b ^ 0xFF for b in data[-200:-168])
    path.write_bytes(bytes(data))


def _earlier_format(tag: Path) -> None:
    (tag / "manifest.json").unlink()
    meta = json.loads((tag / "meta.json").read_text())
    for key in ("format", "run", "optimizer_params", "zero_stage"):
        meta.pop(key, None)
    (tag / "meta.json").write_text(json.dumps(meta))


def faults(run: Path):
    """(name, damage(run), command args, expected: 'resume N' or 'error')."""
    ck = run / "checkpoints"
    s6 = ck / "step_00000006"
    rewrite = lambda: __import__("sigma_moe.launch.checkpoint.manifest", fromlist=["x"]).write_manifest(s6)  # noqa: E731
    resume = ("train", ["training.steps=7", "checkpoint.every=2", "training.eval_every=0"])
    yield "latest deleted", lambda: (ck / "latest").unlink(), resume, "resume 6"
    yield "latest names a missing folder", lambda: (ck / "latest").write_text("step_00000008"), resume, "resume 6"
    yield "moved aside by a crashed save", lambda: os.replace(s6, ck / ".old-step_00000006"), resume, "resume 6"
    yield "leftover .tmp save", lambda: shutil.copytree(s6, ck / ".tmp-step_00000008"), resume, "resume 6"
    yield (
        "expert file bit-flipped",
        lambda: _flip(s6 / "layer_1_expert_2_mp_rank_00_model_states.pt"),
        resume,
        "resume 4",
    )
    yield (
        "model file truncated",
        lambda: (s6 / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04"),
        resume,
        "resume 4",
    )
    yield "rank file zeroed", lambda: (s6 / "rank_00000.pt").write_bytes(b"\0" * 100), resume, "resume 4"
    yield (
        "manifest deleted + 32 bytes flipped",
        lambda: ((s6 / "manifest.json").unlink(), _flip(s6 / "layer_1_expert_2_mp_rank_00_model_states.pt")),
        resume,
        "resume 4",
    )
    yield (
        "earlier format, a file missing",
        lambda: (_earlier_format(s6), (s6 / "rank_00000.pt").unlink()),
        resume,
        "resume 4",
    )
    yield "eval of a manifest-less tag", lambda: (s6 / "manifest.json").unlink(), ("eval", [], s6), "error"
    yield "finite divergence (lr 1e3)", lambda: None, ("train", EXPLODE), "error"
    yield "skip policy on a divergence", lambda: None, ("train", [*EXPLODE, "training.on_divergence=skip"]), "error"
    for kind, victim in [
        ("bytearray", "rank_00000.pt"),
        ("ndarray", "rank_00000.pt"),
        ("storage", "layer_0_expert_0_mp_rank_00_model_states.pt"),
        ("sizes", "layer_0_expert_0_mp_rank_00_model_states.pt"),
        ("build", "mp_rank_00_model_states.pt"),
        ("code", "mp_rank_00_model_states.pt"),
    ]:
        yield f"payload {kind} in {victim}", lambda k=kind, v=victim: (_payload(s6 / v, k), rewrite()), resume, "error"
    yield "unwritable run_dir", lambda: (run / ".run.lock").mkdir(), resume, "error"
    yield (
        "latest lost among two runs",
        lambda: (
            sigma_moe("train", run, "checkpoint.resume=none", "training.steps=4", "checkpoint.every=2"),
            (ck / "latest").unlink(),
        ),
        resume,
        "error",
    )


def classify(out: subprocess.CompletedProcess, expected: str, command: str) -> str:
    if "Traceback" in out.stderr:
        return "traceback"
    if expected == "error":
        lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
        one_line = out.returncode == 2 and lines and lines[-1].startswith(f"sigma-moe {command}: error: ")
        return "one-line error" if one_line else ("silent loss" if out.returncode == 0 else "other failure")
    if out.returncode != 0:
        return "other failure"
    resumed = re.search(r"resumed from step (\d+)", out.stdout)
    return "recovered" if resumed and f"resume {resumed.group(1)}" == expected else "silent loss"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/fault-probe"))
    parser.add_argument("--only", default=None, help="run only the faults whose name contains this")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    source = args.out / "source"
    first = sigma_moe("train", source, *SIX)
    if first.returncode != 0:
        print(first.stderr[-2000:])
        return 1
    totals = Counter()
    names = [f[0] for f in faults(args.out / "unused")]
    for i, name in enumerate(names):
        if args.only and args.only not in name:
            continue
        run = args.out / f"fault{i:02d}"
        shutil.copytree(source, run, ignore=shutil.ignore_patterns(".run.lock*"))
        _, damage, (cmd, sets, *tag), expected = list(faults(run))[i]  # bound to this copy's paths
        damage()
        out = sigma_moe(cmd, run, *sets, extra=("--checkpoint", str(tag[0])) if tag else ())
        verdict = classify(out, expected, cmd)
        totals[verdict] += 1
        last = (out.stderr.strip().splitlines() or [""])[-1][:150]
        print(f"{name:45s} exit {out.returncode}  {verdict:15s} {last}", flush=True)
    faults_n = sum(totals.values())
    print(
        f"faults {faults_n}, recovered {totals['recovered']}, one-line errors {totals['one-line error']}, "
        f"tracebacks {totals['traceback']}, silent losses {totals['silent loss']}, other {totals['other failure']}"
    )
    return 0 if totals["silent loss"] == totals["traceback"] == totals["other failure"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
