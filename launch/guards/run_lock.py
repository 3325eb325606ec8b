"""One training run per folder it writes at a time.

Rank 0 of a training job holds an exclusive lock on ``.run.lock`` in each folder the run writes
(``logging.run_dir`` and ``checkpoint.dir``, once if they are one) (``filelock``: an OS file lock, so
it goes away with the process, crash or kill included: no stale locks) for the run's life, and writes
who holds it (pid, host, start time) to ``.run.lock.json`` beside it. A second run in the same folder,
or with another run directory but the same checkpoint folder, fails at once, before writing anything,
with the holder named; a folder that cannot be written is a one-line error too.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from sigma_moe.config_check import ConfigError
from sigma_moe.distributed.collectives import world_all_reduce_

LOCK_FILE = ".run.lock"
HOLDER_FILE = ".run.lock.json"


class RunLock:
    def __init__(self, run_dir: str | os.PathLike, *, key: str = "logging.run_dir"):
        self.run_dir = Path(run_dir)
        self.key = key  # the config key that names the folder, for the messages
        self._lock: FileLock | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`ConfigError` naming the run that holds it."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"{self.key}: cannot create {self.run_dir} ({e.strerror}); choose a writable folder"
            ) from None
        lock = FileLock(self.run_dir / LOCK_FILE)
        try:
            lock.acquire(timeout=0)
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            (self.run_dir / HOLDER_FILE).write_text(json.dumps(holder))
        except Timeout:
            raise ConfigError(
                f"{self.key}: {self.run_dir} is in use by another training run "
                f"({self._holder()}); wait for it to finish, or give this run another {self.key}"
            ) from None
        except OSError as e:  # read-only, no permission, quota
            lock.release()
            raise ConfigError(
                f"{self.key}: cannot write in {self.run_dir} ({e.strerror or e}); choose a writable folder"
            ) from None
        self._lock = lock

    def _holder(self) -> str:
        try:
            h = json.loads((self.run_dir / HOLDER_FILE).read_text())
            return f"pid {h['pid']} on {h['host']}, since {h['since']}"
        except (OSError, ValueError, KeyError):
            return "holder unknown"

    def release(self) -> None:
        if self._lock is not None:
            (self.run_dir / HOLDER_FILE).unlink(missing_ok=True)
            self._lock.release()
            self._lock = None


def take_run_locks(folders: dict[str, str | os.PathLike], *, rank: int) -> list[RunLock]:
    """Collective: rank 0 locks each folder of ``folders`` (config key -> folder; one lock per real
    folder); every rank raises the same error when it cannot (so no rank goes on into a collective
    alone)."""
    locks: list[RunLock] = []
    error = None
    failed = torch.zeros(1, dtype=torch.int64)
    if rank == 0:
        seen = set()
        try:
            for key, folder in folders.items():
                if (real := os.path.realpath(folder)) not in seen:
                    seen.add(real)
                    locks.append(RunLock(folder, key=key))
                    locks[-1].acquire()
        except ConfigError as e:
            error, failed[0] = e, 1
            for lock in locks:
                lock.release()
    world_all_reduce_(failed)
    if error is not None:
        raise error
    if failed[0]:
        raise ConfigError(f"rank 0 could not lock {', '.join(map(str, folders.values()))} (its message says why)")
    return locks
