"""One run of a comparison grid, in its own process: ``python -m sigma_moe.launch.compare.worker
RUN_DIR/run.yaml`` (under any launcher). Trains (or resumes) the run with :func:`train`, then rank 0
writes ``train_result.json`` beside the config (atomically); the parent process adds what only it can
measure (peak RSS of the process tree, exit status) and writes the run's ``result.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sigma_moe.atomic_io import atomic_write_text

TRAIN_RESULT = "train_result.json"


def eval_dict(res) -> dict | None:
    if res is None:
        return None
    return {
        "loss": res.loss,
        "perplexity": res.perplexity,
        "bits_per_byte": res.bits_per_byte,
        "n_tokens": res.n_tokens,
    }


def write_json_atomic(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    from sigma_moe.launch.cli import take_local_rank

    args, _ = take_local_rank(sys.argv[1:] if argv is None else argv)  # the deepspeed launcher's
    if len(args) != 1:
        print("usage: python -m sigma_moe.launch.compare.worker RUN_DIR/run.yaml", file=sys.stderr)
        return 2
    import torch

    from sigma_moe.launch.config import load_config
    from sigma_moe.launch.train import train

    path = Path(args[0])
    cfg = load_config(path)
    result = train(cfg)
    if result.rank != 0:
        return 0
    write_json_atomic(
        path.parent / TRAIN_RESULT,
        {
            "start_step": result.start_step,
            "steps": result.steps,
            "seconds": result.seconds,
            "valid": eval_dict(result.valid),
            "test": eval_dict(result.test),
            "unigram_perplexity": result.unigram_perplexity,
            "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        },
    )
    return 0


if __name__ == "__main__":
    from sigma_moe.launch.world import leave_world_after

    sys.exit(leave_world_after(main()))
