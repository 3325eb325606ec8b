"""``sigma-moe compare SPEC.yaml``: train a parameter-equal grid of runs, then write the report.

Each run (OUT/size/variant/seedN, see :mod:`.spec`) is its own child process
(:mod:`.worker`, under the spec's launcher), so its state is clean and its peak memory is its
own: ``os.wait4`` returns the child's resource usage, whose ``ru_maxrss`` covers the child and the
processes it waited for. The run's folder holds ``run.yaml`` (its resolved config), ``log.txt`` (its
console), ``<variant>-seed<N>/`` (TensorBoard events, the folder named after the run so that
``tensorboard --logdir OUT`` tells the runs apart),
``checkpoints/`` and, once it has finished, ``result.json``: written atomically as the last act, it
marks the run as done. Rerunning the grid skips runs with a result (after checking that the result
belongs to the same config: a changed spec is an error naming the folder, not a silent reuse) and
resumes an interrupted run from its latest checkpoint (``checkpoint.resume: auto``).
"""

from __future__ import annotations

import fnmatch
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sigma_moe.config_check import ConfigError
from sigma_moe.launch.compare.run_spec import RunSpec
from sigma_moe.launch.compare.spec import CompareSpec, worker_command
from sigma_moe.launch.compare.worker import TRAIN_RESULT, write_json_atomic
from sigma_moe.launch.config import config_to_dict, save_config

RESULT = "result.json"
RUN_CONFIG = "run.yaml"
LOG = "log.txt"


@dataclass
class GridOutcome:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # "key: why (log path)"


def read_result(run: RunSpec) -> dict | None:
    """The run's result, or None if it has not finished; a result of another config is an error."""
    path = run.run_dir / RESULT
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    saved = run.run_dir / RUN_CONFIG
    if result.get("fingerprint") != run.fingerprint() and not (
        saved.is_file() and run.same_as_saved(yaml.safe_load(saved.read_text()) or {})
    ):
        raise ConfigError(
            f"{path} holds a finished run of a different config than the spec now gives {run.key} "
            f"(the spec, --set or the base config changed); use another --out, or delete {run.run_dir} to rerun it"
        )
    return result


def run_grid(spec: CompareSpec, runs: list[RunSpec], *, echo=print) -> GridOutcome:
    """Train every run that has no result yet, one after another."""
    outcome = GridOutcome()
    todo = []
    for run in runs:
        if read_result(run) is not None:
            outcome.skipped.append(run.key)
        else:
            todo.append(run)
    if outcome.skipped:
        echo(f"{len(outcome.skipped)} of {len(runs)} runs already finished: skipped")
    for i, run in enumerate(todo, 1):
        echo(
            f"[{i}/{len(todo)}] {run.key}: {run.cfg.training.steps} steps, {run.params:,} parameters "
            f"(log: {run.run_dir / LOG})"
        )
        try:
            result = _run_one(spec, run)
        except RunFailed as e:
            outcome.failed.append(f"{run.key}: {e}")
            echo(f"  FAILED: {e}")
            continue
        outcome.ran.append(run.key)
        echo(
            f"  done in {result['wall_seconds']:.0f} s: valid perplexity {result['valid']['perplexity']:.2f}, "
            f"test perplexity {result['test']['perplexity']:.2f}, {result['tokens_per_s']:,.0f} tokens/s"
        )
    return outcome


class RunFailed(RuntimeError):
    pass


def _run_one(spec: CompareSpec, run: RunSpec) -> dict:
    from sigma_moe.launch.monitor.event_reader import read_run_events, run_tensorboard_dir

    run.run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = save_config(run.cfg, run.run_dir / RUN_CONFIG)
    (run.run_dir / TRAIN_RESULT).unlink(missing_ok=True)  # only this attempt's counts
    cmd = worker_command(spec, cfg_path)
    t0 = time.perf_counter()
    with open(run.run_dir / LOG, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C: stop the run's process group; its checkpoints allow a resume
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    wall = time.perf_counter() - t0
    train_path = run.run_dir / TRAIN_RESULT
    if proc.returncode != 0 or not train_path.is_file():
        raise RunFailed(f"exit status {proc.returncode}; see {run.run_dir / LOG}")
    trained = json.loads(train_path.read_text())
    events = read_run_events(run_tensorboard_dir(run.cfg.logging))
    result = {
        "key": run.key,
        "size": run.size,
        "variant": run.variant,
        "seed": run.seed,
        "fingerprint": run.fingerprint(),
        "ff": config_to_dict(run.cfg.model.ff),
        "params": run.params,
        "ff_params_per_layer": run.ff_params,
        "target_params": run.target_params,
        "mlp_flops_per_token": run.mlp_flops,
        "dense_mlp_flops_per_token": run.dense_mlp_flops,
        "mlp_flops_fraction": run.mlp_flops / run.dense_mlp_flops,
        "tokens_per_s": events.median("train/tokens_per_s"),
        "max_mean_load": events.last("routing/model/max_mean_load"),
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
        "wall_seconds": wall,
        **trained,
    }
    write_json_atomic(run.run_dir / RESULT, result)
    return result


def collect_results(runs: list[RunSpec]) -> dict[str, dict]:
    return {run.key: r for run in runs if (r := read_result(run)) is not None}


def describe_grid(runs: list[RunSpec]) -> str:
    """One line per (size, variant): the sizing, without training anything (``--dry-run``)."""
    lines, seen = [], set()
    for run in runs:
        if (run.size, run.variant) in seen:
            continue
        seen.add((run.size, run.variant))
        seeds = [r.seed for r in runs if (r.size, r.variant) == (run.size, run.variant)]
        ff = {k: v for k, v in config_to_dict(run.cfg.model.ff).items() if k != "kind"}
        lines.append(
            f"{run.size}/{run.variant}: {run.cfg.model.ff.kind} {ff}; {run.params:,} parameters "
            f"({run.params / run.target_params - 1:+.3%} vs match), MLP FLOPs/token {run.mlp_flops:,} "
            f"({run.mlp_flops / run.dense_mlp_flops:.1%} of dense); seeds {seeds}"
        )
    return "\n".join(lines)


def select_runs(runs: list[RunSpec], patterns: list[str] | tuple[str, ...]) -> list[RunSpec]:
    """The runs whose key (size/variant/seedN) matches any of the glob ``patterns``; all when none.
    A pattern that matches no run is an error listing the keys (a typo must not train nothing)."""
    if not patterns:
        return runs
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(r.key, pattern) for r in runs):
            raise ConfigError(
                f"--only {pattern!r} matches no run of this spec; its runs are: {', '.join(r.key for r in runs)}"
            )
    return [r for r in runs if any(fnmatch.fnmatchcase(r.key, p) for p in patterns)]


def compare_main(
    spec_path: str,
    *,
    out: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    only: list[str] | tuple[str, ...] = (),
    report_only: bool = False,
    dry_run: bool = False,
    echo=print,
) -> int:
    """What ``sigma-moe compare`` does; returns the exit status (1 if a run failed). ``only``: train
    just the runs whose keys match these globs; the report still covers every finished run."""
    from sigma_moe.launch.compare.report import MD, write_report
    from sigma_moe.launch.compare.spec import expand_grid, load_spec
    from sigma_moe.launch.compare.tensorboard_export import write_compare_tensorboard

    spec = load_spec(spec_path)
    runs = expand_grid(spec, out, overrides)
    chosen = select_runs(runs, only)
    out_dir = Path(out if out is not None else spec.out)
    if dry_run:
        echo(describe_grid(chosen))
        echo(f"{len(chosen)} runs under {out_dir}")
        return 0
    try:
        outcome = GridOutcome() if report_only else run_grid(spec, chosen, echo=echo)
    except KeyboardInterrupt:
        echo(
            "interrupted: the same command resumes the grid (finished runs are kept, the interrupted "
            "one restarts from its latest checkpoint); the report is not updated"
        )
        return 130
    results = collect_results(runs)
    files = write_report(out_dir, runs, results, baseline=spec.baseline)
    files += write_compare_tensorboard(out_dir, spec, runs, results, (out_dir / MD).read_text())
    echo(f"report ({len(results)} of {len(runs)} runs finished): " + ", ".join(str(f) for f in files))
    echo(f"TensorBoard: sigma-moe board {out_dir}")
    for f in outcome.failed:
        echo(f"failed: {f}")
    return 1 if outcome.failed else 0
