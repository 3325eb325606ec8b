"""Rank 0's progress on the console: a tqdm bar on a terminal, plain lines in a log file.

A bar redraws itself with carriage returns: in a file (``> log.txt``, a batch job's output, a pipe)
that is thousands of partial lines an hour and no line a reader can grep. So the bar is drawn only
when its stream is a terminal and ``logging.progress_bar`` is on; otherwise one plain line per
logging interval (``training.log_every``) and at the last step:

    step 40/200 | loss 4.8123 | 12,345 tokens/s | elapsed 1m02s | ETA 4m08s

The ETA is the remaining steps at the mean wall time per step since this process started training
(evaluations and checkpoints included, so it also covers the ones still to come).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


def duration(seconds: float) -> str:
    """``1h02m``, ``4m08s``, ``12s``."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Where :meth:`step` and :meth:`write` go: the bar (terminal) or plain lines (anything else)."""

    def __init__(
        self, *, total_steps: int, start_step: int, log_every: int, bar: bool = True, stream: TextIO | None = None
    ):
        stream = sys.stderr if stream is None else stream
        self.total_steps, self.start_step, self.log_every = total_steps, start_step, max(1, log_every)
        self.started = time.perf_counter()
        self.bar = None
        if bar and stream.isatty():
            self.bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True, file=stream
            )

    def step(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        elif step % self.log_every == 0 or step == self.total_steps:
            print(self.line(step, loss, tokens_per_s, time.perf_counter() - self.started), flush=True)

    def line(self, step: int, loss: float, tokens_per_s: float, elapsed: float) -> str:
        done = step - self.start_step
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        return (
            f"step {step}/{self.total_steps} | loss {loss:.4f} | {tokens_per_s:,.0f} tokens/s | "
            f"elapsed {duration(elapsed)} | ETA {duration(eta) if eta == eta else '?'}"
        )

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
