"""``sigma-moe``: the command line.

    sigma-moe train CONFIG [--set key=value ...]                  train (or resume) a run
    sigma-moe eval  CONFIG --checkpoint DIR [--split valid,test]  evaluate a checkpoint's (or export's) weights
    sigma-moe size  CONFIG [--set key=value ...]                  parameters, MLP FLOPs, parity d_ff
    sigma-moe plan  CONFIG --gpus N [--gpus-per-node M] [--gpu h100|h200|a100] [--set ...] [--json]
                                                                  memory, all-to-all, FLOPs, step time on N GPUs
    sigma-moe prepare CONFIG [--set key=value ...]                the token shards of the data, ahead of a job
    sigma-moe generate CONFIG --checkpoint DIR --prompt TEXT      sample a continuation (one process)
    sigma-moe export CONFIG --checkpoint DIR --out DIR            one model.safetensors + config + tokenizer
    sigma-moe config [PREFIX]                                     every config key: type, default, doc
    sigma-moe compare SPEC [--out DIR] [--set key=value ...] [--only GLOB ...] [--report-only | --dry-run]
                                                                  a parameter-equal grid of runs + report

Every command accepts ``--local_rank=N`` anywhere on the line: the deepspeed launcher puts it before
the script's own arguments (``deepspeed $(which sigma-moe) train CONFIG`` runs ``sigma-moe
--local_rank=0 train CONFIG``). Config and checkpoint problems, a diverged run and a rank that held the
others up print one line naming the problem and the fix, and exit with status 2.

train, eval and size also take DeepSpeed's ``--deepspeed_config ds.json`` (the YAML's ``deepspeed.config``:
a JSON merged with the DeepSpeed config the YAML generates) and its bare ``--deepspeed`` (no effect).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from sigma_moe.config_check import ConfigError
from sigma_moe.launch.config import RunConfig, load_config

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sigma-moe", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, *, optional_config: bool = False) -> None:
        if optional_config:  # generate: an export carries its own model and tokenizer
            p.add_argument("config", nargs="?", help="YAML run config of the checkpoint's run (none for an export)")
        else:
            p.add_argument("config", help="YAML run config (see configs/)")
        p.add_argument(
            "--deepspeed_config",
            "--deepspeed-config",
            default=None,
            metavar="JSON",
            help="your DeepSpeed JSON, merged with the config's (same as --set deepspeed.config=JSON)",
        )
        p.add_argument(
            "--deepspeed",
            action="store_true",
            help="accepted as DeepSpeed's examples pass it; every run uses DeepSpeed",
        )
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set model.ff.n_experts=32 (repeatable; YAML values)",
        )

    common(
        sub.add_parser(
            "train",
            help="train (or resume) the run a config describes",
            epilog="Every config key, with its type, default and documentation: sigma-moe config",
        )
    )
    p_eval = sub.add_parser("eval", help="evaluate a checkpoint on the validation and test splits")
    common(p_eval)
    p_eval.add_argument(
        "--checkpoint", required=True, help="a checkpoint folder (uses its 'latest'), one step_* folder, or an export"
    )
    p_eval.add_argument("--split", default="valid,test", help="comma-separated splits (default valid,test)")
    p_eval.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches")
    common(sub.add_parser("size", help="print parameters, MLP FLOPs per token and the parameter-equal dense d_ff"))
    p_plan = sub.add_parser(
        "plan", help="memory, all-to-all MB, FLOPs and step time per rank on N GPUs; the best EP size"
    )
    common(p_plan)
    p_plan.add_argument("--gpus", type=int, required=True, help="GPUs of the job (ranks)")
    p_plan.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p_plan.add_argument("--gpu", default="h100", choices=("h100", "h200", "a100"), help="the GPU's data sheet")
    p_plan.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    common(sub.add_parser("prepare", help="tokenise the config's corpus into token shards (resumes; reused by train)"))
    add_generate_parser(sub, common)
    p_export = sub.add_parser("export", help="write a checkpoint as one model.safetensors, its config and tokenizer")
    common(p_export)
    p_export.add_argument("--checkpoint", required=True, help="a checkpoint folder or one step_* folder")
    p_export.add_argument("--out", required=True, help="the export folder (created; an earlier export is replaced)")
    p_cfg = sub.add_parser("config", help="print every config key with its type, default and documentation")
    p_cfg.add_argument("prefix", nargs="?", default="", help="only the keys that start with this, e.g. training")
    p_cmp = sub.add_parser(
        "compare",
        help="train a parameter-equal grid of runs (configs/compare/) and "
        "write its report (tables, plots) under the output folder",
    )
    p_cmp.add_argument("spec", help="comparison spec YAML (see configs/compare/README.md)")
    p_cmp.add_argument("--out", default=None, help="output folder (default: the spec's 'out')")
    p_cmp.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a run config key of every run, e.g. --set training.steps=5",
    )
    p_cmp.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="GLOB",
        help="train only the runs whose key matches, e.g. 'r1/sigma_moe/seed0' or 'r3/*' (repeatable); "
        "the report covers every finished run",
    )
    p_board = sub.add_parser("board", help="start TensorBoard on run folders, with every tag's description shown")
    p_board.add_argument("logdir", nargs="?", default="runs", help="runs' folder (default runs/)")
    p_board.add_argument("tensorboard_args", nargs=argparse.REMAINDER, help="passed to tensorboard, e.g. --port 6007")
    mode = p_cmp.add_mutually_exclusive_group()
    mode.add_argument("--report-only", action="store_true", help="only (re)write the report from finished runs")
    mode.add_argument("--dry-run", action="store_true", help="print the grid and each run's sizing; train nothing")
    return parser


def add_generate_parser(sub, common) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a checkpoint's or an export's model (one process)")
    common(p, optional_config=True)
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder, one step_* folder, or an export")
    p.add_argument("--prompt", required=True, help="the text to continue (cut to the model's context)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0: greedy (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0: all (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1: off (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when torch sees a GPU)")


LOCAL_RANK_FLAGS = ("--local_rank", "--local-rank")


def take_local_rank(argv: list[str]) -> tuple[list[str], int | None]:
    """``argv`` without the launcher's ``--local_rank=N`` / ``--local_rank N`` (or ``--local-rank``),
    wherever it stands, and N (None when absent). A flag whose value is not an integer stays, so the
    parser reports it."""
    rest, local_rank, i = [], None, 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag in LOCAL_RANK_FLAGS:
            if not eq:  # --local_rank N
                value = argv[i + 1] if i + 1 < len(argv) else ""
            if value.isdigit():
                local_rank = int(value)
                i += 1 if eq else 2
                continue
        rest.append(argv[i])
        i += 1
    return rest, local_rank


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line, with the launcher's local rank (``args.local_rank``) taken from anywhere."""
    rest, local_rank = take_local_rank(argv)
    args = build_parser().parse_args(rest)
    args.local_rank = local_rank
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if args.command == "plan":
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout as it loads; --json owns it
            from sigma_moe.launch.plan import plan_command
        return plan_command(args)
    try:
        if args.command == "config":
            print(config_reference(args.prefix))
            return 0
        if args.command == "board":
            from sigma_moe.launch.monitor.board import board_main

            return board_main(args.logdir, args.tensorboard_args)
        if args.command == "compare":
            from sigma_moe.launch.compare.grid import compare_main

            return compare_main(
                args.spec,
                out=args.out,
                overrides=args.overrides,
                only=args.only,
                report_only=args.report_only,
                dry_run=args.dry_run,
            )
        cfg = (  # only generate may leave it out (an export carries its model and tokenizer)
            load_config(args.config, args.overrides, deepspeed_config=args.deepspeed_config) if args.config else None
        )
        if args.command == "size":
            print(size_report(cfg))
        elif args.command == "prepare":
            from sigma_moe.launch.data.splits import describe_token_splits
            from sigma_moe.launch.session import load_data

            print(describe_token_splits(load_data(cfg, progress=True)))
        elif args.command == "train":
            from sigma_moe.launch.train import train

            train(cfg)
        elif args.command == "generate":
            from sigma_moe.launch.generate import generate_main

            generate_main(cfg, args)
        elif args.command == "export":
            from sigma_moe.launch.export import export_main

            export_main(cfg, args.checkpoint, args.out)
        else:
            _eval(cfg, args)
    except Exception as e:
        if not isinstance(e, bad_input_errors()):
            raise
        print(f"sigma-moe {args.command}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def bad_input_errors() -> tuple[type[Exception], ...]:
    """The errors printed as one line with exit 2: a config problem (an unsupported DeepSpeed too), and
    those of a run (checkpoint, divergence, a rank that held the others up) once their modules are
    loaded: importing them here would load DeepSpeed for ``size`` and ``config``, which need none."""
    loaded = {
        "sigma_moe.distributed.safe_load": "CheckpointError",
        "sigma_moe.launch.guards.divergence": "TrainingDiverged",
        "sigma_moe.launch.guards.rank_watch": "CollectiveTimeout",
    }
    return (ConfigError, *(getattr(sys.modules[m], name) for m, name in loaded.items() if m in sys.modules))


def one_line(error: BaseException) -> str:
    """The error's message on one line: a list of problems (``header:`` then ``  - item`` lines) becomes
    ``header: item; item``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(error).__name__
    head, items = lines[0], [line.removeprefix("- ") for line in lines[1:]]
    return f"{head} {'; '.join(items)}" if head.endswith(":") else "; ".join([head, *items])


def config_reference(prefix: str = "") -> str:
    """``sigma-moe config``: one entry per key (``model.ff`` once per variant), as in the YAML."""
    import textwrap

    from sigma_moe.config_schema import config_keys

    out = []
    for k in config_keys(RunConfig):
        if not k.key.startswith(prefix):
            continue
        default = "required" if k.default == "(required)" else f"default {k.default}" if k.default else ""
        head = f"{k.key}: {k.type}" + (f", {default}" if default else "") + (f"  [{k.when}]" if k.when else "")
        out.append(head + "".join(f"\n    {line}" for line in textwrap.wrap(k.doc, 96)))
    return "\n".join(out) if out else f"no config key starts with {prefix!r}"


def process_main(argv: list[str] | None = None) -> int:
    """The process's entry point (the ``sigma-moe`` script, ``python -m``): ``main``, then leave the
    process group."""
    import torch.distributed as dist

    status = main(argv)
    if dist.is_available() and dist.is_initialized():  # (size and config never join one, nor import DeepSpeed)
        from sigma_moe.launch.world import leave_world_after

        status = leave_world_after(status)
        if status == 0:
            end_process_now(status)
    return status


def end_process_now(status: int) -> None:
    """Exit at once after a successful run that had a process group: flush what was written, then skip
    the interpreter's teardown. A rank could still abort there now and then ("terminate called without
    an active exception": a communication thread destroyed while joinable, even after the group was
    left), and its launcher then fails the whole job though every rank had finished."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")  # under mpirun: finalize as mpi4py's exit hook would
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(status)


def _eval(cfg: RunConfig, args: argparse.Namespace) -> None:
    from sigma_moe.launch.evaluate import checkpoint_session, evaluate_split

    splits = tuple(s.strip() for s in args.split.split(",") if s.strip())
    bad = [s for s in splits if s not in ("train", "valid", "test")]
    if bad or not splits:
        raise ConfigError(f"--split {args.split!r}: choose from train, valid, test (comma-separated)")
    session = checkpoint_session(cfg, args.checkpoint)
    for name in splits:
        res = evaluate_split(session, name, max_batches=args.max_batches)
        if session.world.rank == 0:
            print(f"{name}: {res.describe()}")


def size_report(cfg: RunConfig) -> str:
    """Model size figures, computed on the meta device (no memory, no data)."""
    import torch

    from sigma_moe.layers.feedforward import build_feedforward, feedforward_config_class
    from sigma_moe.layers.sizing import count_parameters, mlp_flops_per_token, parameter_equal_dense_d_ff
    from sigma_moe.layers.transformer import TransformerLM

    m = cfg.model
    with torch.device("meta"):
        model = TransformerLM(m)
        ff_layers = model.feedforward_layers()
        dense_d_ff = parameter_equal_dense_d_ff(m.ff, m.d_model)
        dense = build_feedforward(
            feedforward_config_class("dense")(d_ff=dense_d_ff), d_model=m.d_model, n_layers=m.n_layers
        )
    total = count_parameters(model)
    ff_params = sum(count_parameters(ff) for ff in ff_layers)
    embed = m.vocab_size * m.d_model * 2  # input embedding + untied output projection
    flops = mlp_flops_per_token(model)
    dense_flops = mlp_flops_per_token(dense) * m.n_layers
    lines = [
        f"model: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads, context {m.context}, "
        f"vocab {m.vocab_size}, ff {m.ff.kind}",
        f"parameters: {total:,} total, {total - embed:,} without embeddings, "
        f"{ff_params:,} in feedforward layers ({ff_params // m.n_layers:,} per layer)",
        f"MLP FLOPs per token: {flops:,} ({flops // m.n_layers:,} per layer)",
        f"parameter-equal dense d_ff: {dense_d_ff}",
        f"MLP FLOPs vs that dense model: {flops / dense_flops:.1%}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(process_main())
