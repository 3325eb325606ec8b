"""Which rank held a multi-process run up: heartbeats, and the message when a collective times out.

When one rank stops (SIGSTOP, a debugger, a node swapping, a wedged GPU), the others wait in their
next collective until ``distributed.timeout_s`` and then fail with the transport's message ("Timed out
waiting 15000ms for recv operation"); the launcher reports the first rank that failed, which is a
healthy one. So every rank writes a heartbeat file (``<run_dir>/.ranks/rank_NNNNN.json``: pid, host,
step, time) every few seconds from a daemon thread, and a rank whose collective timed out reads them
all and names the culprit: a rank whose heartbeat went stale (its whole process stopped), else the
ranks behind the others' step (a process alive but stuck before the collective).

Not every collective honours the timeout (gloo's all-to-all waits for ever), so the heartbeat thread
is also the watchdog: when the next rank's heartbeat (rank r watches rank r + 1 mod W, so each rank
reads one file per beat, not W) has been stale for ``distributed.timeout_s``, it prints the same
one-line error, from every rank's heartbeat, and ends this process with exit status 2, whatever the
main thread is blocked in; the launcher then ends the others. Heartbeat times are compared across
hosts: their clocks must agree to well within the timeout (NTP does).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sigma_moe.atomic_io import atomic_write_bytes

INTERVAL_S = 2.0
STALE_AFTER_S = 5 * INTERVAL_S


class CollectiveTimeout(RuntimeError):
    """A collective timed out; the message names the rank that held the others up, where it can tell."""


class RankHeartbeat:
    """This rank's heartbeat file, rewritten every ``interval`` seconds until :meth:`stop`, and the
    watchdog over the other ranks' (see the module docstring). The training loop sets :attr:`step`."""

    def __init__(
        self,
        directory: Path,
        rank: int,
        world_size: int,
        *,
        timeout_s: float,
        interval: float = INTERVAL_S,
        on_peer_lost: Callable[[str], None] | None = None,
    ):
        self.directory = Path(directory)
        self.path = self.directory / f"rank_{rank:05d}.json"
        self.rank, self.world_size, self.timeout_s, self.interval = rank, world_size, timeout_s, interval
        self._step = 0
        self.on_peer_lost = on_peer_lost or _exit_with_error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sigma-moe-heartbeat", daemon=True)

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        """The training loop's step, written at once (not at the next beat): a rank stopped a second
        into a step is named at that step."""
        self._step = value
        self.beat()

    def start(self) -> RankHeartbeat:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.beat()
        self._thread.start()
        return self

    def beat(self, *, done: bool = False) -> None:
        record = {
            "rank": self.rank,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "step": self._step,
            "time": time.time(),
            "done": done,
        }
        try:
            atomic_write_bytes(self.path, json.dumps(record).encode())
        except OSError:
            pass  # a full or read-only disk must not fail the run from a side thread

    def _run(self) -> None:
        neighbour = self.directory / f"rank_{(self.rank + 1) % self.world_size:05d}.json"
        while not self._stop.wait(self.interval):
            self.beat()
            beat = _read(neighbour)
            lost = (
                beat is not None
                and not beat.get("done")
                and time.time() - beat["time"] > max(self.timeout_s, STALE_AFTER_S)
            )
            if lost and not self._stop.is_set():
                self.on_peer_lost(self.give_up())
                return

    def give_up(self, error: BaseException | None = None) -> str:
        """This rank stops waiting (``error``: the transport's timed-out collective, or None: the
        watchdog's own): ends the stopped ranks on this host, which the launcher cannot end, and returns
        the one-line message that names the rank that held the others up."""
        message = blame(
            self.directory, rank=self.rank, world_size=self.world_size, timeout_s=self.timeout_s, error=error
        )
        end_stopped_ranks(self.directory, rank=self.rank)
        return message

    def stop(self) -> None:
        """The run ended here (success or error): say so, so no other rank's watchdog waits on this one."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.beat(done=True)


def _exit_with_error(message: str) -> None:
    print(f"sigma-moe train: error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2)  # the main thread may be blocked in a collective that never returns


def end_stopped_ranks(directory: Path, *, rank: int, now: float | None = None) -> list[int]:
    """SIGKILL the stale ranks on this host whose process is stopped (state T): a stopped process
    ignores the launcher's SIGTERM, which then waits its grace period before the job can end. Returns
    their pids. Called when this rank gives up on them, just before it exits."""
    now = time.time() if now is None else now
    host, ended = socket.gethostname(), []
    for r, beat in read_heartbeats(directory).items():
        if r == rank or beat.get("done") or now - beat["time"] <= STALE_AFTER_S or beat.get("host") != host:
            continue
        try:
            state = Path(f"/proc/{int(beat['pid'])}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state in ("T", "t"):
                os.kill(int(beat["pid"]), signal.SIGKILL)
                ended.append(int(beat["pid"]))
        except (OSError, ValueError, IndexError):
            pass  # gone already, or not ours to end
    return ended


def is_collective_timeout(error: BaseException) -> bool:
    """gloo's and NCCL's timeout errors (RuntimeError, DistBackendError) say "timed out" or "timeout"."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("timed out" in text or "timeout" in text)


def _read(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
        return record if "rank" in record and "time" in record else None
    except (OSError, ValueError):
        return None


def read_heartbeats(directory: Path) -> dict[int, dict]:
    records = (_read(path) for path in Path(directory).glob("rank_*.json"))
    return {int(r["rank"]): r for r in records if r is not None}


def blame(
    directory: Path,
    *,
    rank: int,
    world_size: int,
    timeout_s: float,
    error: BaseException | None = None,
    now: float | None = None,
) -> str:
    """The one-line explanation of a timed-out collective on ``rank`` (``error``: the transport's), or
    of the watchdog giving up (no ``error``), from every rank's heartbeat."""
    now = time.time() if now is None else now
    beats = read_heartbeats(directory)
    head = (
        f"a collective timed out after {timeout_s:g} s on rank {rank}"
        if error is not None
        else f"rank {rank} stopped waiting after {timeout_s:g} s (distributed.timeout_s)"
    )
    missing = [r for r in range(world_size) if r not in beats]
    stale = sorted(r for r, b in beats.items() if now - b["time"] > STALE_AFTER_S and r != rank and not b.get("done"))
    if stale:
        who = "; ".join(
            f"rank {r} (pid {beats[r]['pid']} on {beats[r]['host']}) last answered "
            f"{now - beats[r]['time']:.0f} s ago, at step {beats[r]['step']}"
            for r in stale
        )
        return (
            f"{head}: {who}. That process is stopped or frozen (SIGSTOP, a debugger, swapping, a hung "
            f"device), not this one; resume from the newest checkpoint once it is fixed "
            f"(distributed.timeout_s sets how long ranks wait)"
        )
    steps = {r: b["step"] for r, b in beats.items()}
    if steps and min(steps.values()) < max(steps.values()):
        ahead = max(steps.values())
        behind = sorted(r for r, s in steps.items() if s < ahead)
        who = ", ".join(f"rank {r} (pid {beats[r]['pid']} on {beats[r]['host']}) at step {steps[r]}" for r in behind)
        return (
            f"{head}: {who} while the others reached step {ahead}: it is alive but stuck before this "
            f"step's collective (distributed.timeout_s sets how long ranks wait)"
        )
    unknown = f"; no heartbeat from rank(s) {missing}" if missing else ""
    said = f" ({str(error).strip().splitlines()[0][:160]})" if error is not None else ""
    return (
        f"{head}{said}; every rank is alive at the same step"
        f"{unknown}: a rank is slow or stuck inside the collective itself (distributed.timeout_s sets "
        f"how long ranks wait)"
    )
