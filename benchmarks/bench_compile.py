"""Step time of a config's model compiled (``training.compile``) against eager, and what compiling costs.

    .venv/bin/python benchmarks/bench_compile.py                                   # tiny config, CPU
    .venv/bin/python benchmarks/bench_compile.py --config configs/default.yaml --batch 8
    python benchmarks/bench_compile.py --device cuda --dtype bf16 --config configs/default.yaml --batch 64

The model is the config's ``model`` section (``--set`` overrides as on the CLI), built by the real code
(:class:`TransformerLM`, compiled with ``compile_blocks`` as the training run does). One step: forward
on ``--batch`` random sequences of ``context`` tokens, cross-entropy + the aux losses, backward, AdamW.
Both modes live in this process and take ``--steps`` steps alternately (eager, compiled, eager, ...):
- compile: the first step's time minus the steady step time (Dynamo's trace, AOT autograd and the
  backend's code generation; inductor on a CPU runs a C++ compiler), from a fresh inductor cache
  unless ``--warm-cache``;
- eval compile: the first forward in eval mode (a second graph: the blocks are compiled per mode);
- step: the median of the steps after the first two; ``speedup`` = eager step / compiled step (> 1:
  compiled is faster), and the steps after which compiling has paid for itself (none if it is slower).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if "--warm-cache" not in sys.argv:  # a cold compile, as a new run meets it (read when torch is imported)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-compile-")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sigma_moe.launch.config import load_config  # noqa: E402
from sigma_moe.layers import TransformerLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """One mode's model, optimizer and batch; ``step()`` trains one step and returns its seconds."""

    def __init__(self, cfg, *, compiled: bool, backend: str, batch: int, device: torch.device, dtype) -> None:
        torch.manual_seed(0)
        self.model = TransformerLM(cfg).to(device, dtype).train()
        if compiled:
            self.model.compile_blocks(backend=backend)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(0)
        self.x, self.y = (torch.randint(0, cfg.vocab_size, (batch, cfg.context), generator=g).to(device) for _ in "xy")
        self.device, self.times, self.losses = device, [], []

    def _timed(self, fn) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        fn()
        _sync(self.device)
        return time.perf_counter() - t0

    def step(self) -> None:
        def train_step():
            out = self.model(self.x)
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), self.y.flatten()) + out.aux_loss
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.losses.append(loss.item())

        self.times.append(self._timed(train_step))

    def eval_seconds(self) -> tuple[float, float]:
        """The first and the second eval-mode forward."""
        self.model.eval()
        with torch.no_grad():
            return self._timed(lambda: self.model(self.x)), self._timed(lambda: self.model(self.x))

    def figures(self) -> dict:
        step = statistics.median(self.times[2:])
        eval_first, eval_step = self.eval_seconds()
        return {
            "first_step_s": self.times[0],
            "step_s": step,
            "compile_s": max(self.times[0] - step, 0.0),
            "eval_compile_s": max(eval_first - eval_step, 0.0),
            "losses": self.losses,
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12, help="steps of each mode (>= 3; the first two are warm-up)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (training.compile_backend)")
    p.add_argument("--threads", type=int, default=0, help="torch threads on the CPU; 0: torch's default")
    p.add_argument("--warm-cache", action="store_true", help="use inductor's usual cache (default: a fresh one)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    if args.steps < 3:
        p.error("--steps must be >= 3")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set).model
    device = torch.device(args.device)
    kw = dict(batch=args.batch, device=device, dtype=DTYPES[args.dtype], backend=args.backend)
    modes = [Trainer(cfg, compiled=False, **kw), Trainer(cfg, compiled=True, **kw)]
    for _ in range(args.steps):  # alternately: a busy machine's slow spells hit both modes alike
        for m in modes:
            m.step()
    eager, comp = (m.figures() for m in modes)
    speedup = eager["step_s"] / comp["step_s"]
    saved = eager["step_s"] - comp["step_s"]
    paid_back = comp["compile_s"] / saved if saved > 0 else None
    rel = max(abs(a - b) / abs(a) for a, b in zip(eager["losses"], comp["losses"]))
    print(
        f"{Path(args.config).name} {' '.join(args.set)} batch {args.batch}, {args.device} {args.dtype}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, backend {args.backend}"
    )
    print(f"  eager    step {eager['step_s'] * 1e3:9.2f} ms")
    print(
        f"  compiled step {comp['step_s'] * 1e3:9.2f} ms   compile {comp['compile_s']:.1f} s "
        f"(train graph), {comp['eval_compile_s']:.1f} s (eval graph)"
    )
    verdict = "compiled is faster" if speedup > 1 else "eager is faster"
    print(f"  speedup (eager / compiled step) {speedup:.3f}: {verdict}", end="")
    print(f"; compiling pays for itself after {paid_back:.0f} steps" if paid_back else "; compiling never pays off")
    print(f"  largest relative loss difference over {args.steps} steps: {rel:.2e}")
    if args.json:
        out = {"eager": eager, "compiled": comp, "speedup": speedup, "paid_back_steps": paid_back, "max_rel_loss": rel}
        Path(args.json).write_text(json.dumps({**out, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
