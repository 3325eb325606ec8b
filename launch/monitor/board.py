"""``sigma-moe board [LOGDIR] [TENSORBOARD ARGS...]``: TensorBoard on the run folders, with the loader
that keeps every tag's description (the meaning and unit shown beside each chart).

TensorBoard's default fast loader (its Rust data server, ``--load_fast=auto``) drops the summary
descriptions the event files hold; ``--load_fast=false`` reads them with the Python loader, which
shows them. Any further arguments go to TensorBoard as they are (e.g. ``--port 6007``,
``--samples_per_plugin images=0`` to step through every image snapshot).
"""

from __future__ import annotations

import os
import sys

LOADER_FLAG = "--load_fast=false"


def board_command(logdir: str, extra: list[str]) -> list[str]:
    """The TensorBoard command line: ``python -m tensorboard.main --logdir LOGDIR --load_fast=false ...``."""
    return [sys.executable, "-m", "tensorboard.main", "--logdir", logdir, LOADER_FLAG, *extra]


def board_main(logdir: str, extra: list[str]) -> int:
    if not os.path.isdir(logdir):
        print(
            f"sigma-moe board: error: no folder {logdir!r}; give the run_dir (or a compare --out folder) to show",
            file=sys.stderr,
        )
        return 2
    cmd = board_command(logdir, extra)
    print(" ".join(cmd[1:]), flush=True)
    os.execv(cmd[0], cmd)  # TensorBoard takes over the process (Ctrl-C stops it)
