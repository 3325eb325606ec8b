"""The training loop. ``python -m sigma_moe.launch.train CONFIG [--set key=value ...]``, under any
launcher (deepspeed, torchrun, mpirun, or none), is the same as ``sigma-moe train CONFIG``.

Per optimizer step: ``grad_accumulation`` micro-batches, each ``loss = mean CE + Σ layers' aux loss``
through ``engine.backward``; ``engine.step`` applies the optimizer and the schedule at the boundary.
Routing and all-to-all figures accumulate over every training forward of the logging interval
(:class:`IntervalMetrics`); every ``log_every`` steps one all-reduce brings them and the step's figures
together and the monitor writes them; every ``eval_every`` steps a
validation estimate; every ``checkpoint.every`` steps a checkpoint; at the end a final checkpoint, a
full validation and test evaluation, and the unigram perplexity of the validation split beside it.

Batches come from :class:`WindowSampler` (random windows) or :class:`StreamSampler` (contiguous
columns), by ``training.batching``. With ``model.attention: xl`` each micro-batch slot carries its
segment memory from step to step (detached; reset when the stream starts a new epoch); checkpoints
save each rank's memory beside its sampler state, so a resumed run continues bit-exactly.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from sigma_moe.distributed import is_expert_parallel
from sigma_moe.launch.checkpoint.manager import CheckpointError, CheckpointManager, resolve_checkpoint, set_rng_state
from sigma_moe.launch.config import RunConfig, config_to_dict
from sigma_moe.launch.data.sampling import Sampler, StreamSampler, WindowSampler
from sigma_moe.launch.evaluate import EvalResult, evaluate_split, perplexity, unigram_perplexity
from sigma_moe.launch.guards.divergence import FIX, DivergenceGuard, TrainingDiverged, stop_if_weights_diverged
from sigma_moe.launch.guards.rank_watch import (
    CollectiveTimeout,
    RankHeartbeat,
    is_collective_timeout,
)
from sigma_moe.launch.monitor.routing import IntervalMetrics
from sigma_moe.launch.monitor.run_monitor import Monitor
from sigma_moe.launch.monitor.throughput import Throughput
from sigma_moe.launch.optim import follow_config_schedule
from sigma_moe.launch.session import Session, save_resolved_config, seed_everything, start_session
from sigma_moe.layers import LMOutput

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    rank: int  # the rank this result is from (its losses are this rank's)
    start_step: int  # 0, or the step the run resumed from
    steps: int  # last step trained
    losses: list[float] = field(default_factory=list)  # this rank's loss of each step trained here
    valid: EvalResult | None = None
    test: EvalResult | None = None
    unigram_perplexity: float | None = None
    checkpoint: Path | None = None
    seconds: float = 0.0


def train(cfg: RunConfig) -> TrainResult:
    """Run (or resume) the training ``cfg`` describes; collective over all ranks."""
    t_start = time.perf_counter()
    s = start_session(cfg, lock_run_dir=True)
    heartbeat = (
        RankHeartbeat(
            s.run_dir / ".ranks", s.world.rank, s.world.world_size, timeout_s=cfg.distributed.timeout_s
        ).start()
        if s.world.world_size > 1
        else None
    )
    try:
        return _train(cfg, s, t_start, heartbeat)
    except RuntimeError as e:  # a timed-out collective
        if heartbeat is None or not is_collective_timeout(e):
            raise
        raise CollectiveTimeout(heartbeat.give_up(e)) from None  # names the rank that held the others up
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        s.close()


def _train(cfg: RunConfig, s: Session, t_start: float, heartbeat: RankHeartbeat | None) -> TrainResult:
    t = cfg.training
    ckpt = CheckpointManager.from_config(
        cfg.checkpoint,
        directory=cfg.checkpoint_dir,
        model_config=s.model_config,
        expert_parallel_size=s.expert_parallel_size,
        rank=s.world.rank,
        world_size=s.world.world_size,
    )
    sampler = _sampler(cfg, s)
    memory = Memory(s.engine.module, slots=t.grad_accumulation, batch_size=s.micro_batch)
    seed_everything(t.seed + 1 + s.world.rank)  # dropout masks differ between ranks
    guard = DivergenceGuard(
        policy=t.on_divergence,
        max_skipped_steps=t.max_skipped_steps,
        loss_factor=t.spike_loss_factor,
        grad_factor=t.spike_grad_factor,
        window=t.spike_window,
    )
    start = _resume(cfg, s, ckpt, sampler, memory, guard)
    save_resolved_config(s)  # only now: a refused resume leaves the run's config.yaml as it was
    result = TrainResult(rank=s.world.rank, start_step=start, steps=start)
    monitor = Monitor.from_config(
        cfg.logging,
        rank=s.world.rank,
        total_steps=t.steps,
        start_step=start,
        log_every=t.log_every,
        config_text=yaml.safe_dump(config_to_dict(cfg), sort_keys=False),
    )
    if start >= t.steps:  # e.g. the same command again: say so, then evaluate the checkpoint as a finished run does
        monitor.write(
            f"already finished: {cfg.checkpoint_dir} holds step {start} of training.steps {t.steps}, nothing to "
            f"train (to train on: --set training.steps=N above {start}; to start over: another logging.run_dir or "
            "--set checkpoint.resume=none)"
        )
    elif start:
        monitor.write(f"resumed from step {start} ({cfg.checkpoint_dir})")
    ff_layers = s.engine.module.feedforward_layers()
    dispatchers = [ff.dispatcher for ff in ff_layers if is_expert_parallel(ff)]
    if dispatchers:  # e.g. AllToAllDispatcher(n_experts=8, ep_size=2, ep_rank=0, experts=[0, 4), transport=MPI...)
        monitor.write(f"expert parallelism over {s.world.world_size} ranks, rank 0: {dispatchers[0]!r}")
    metrics = IntervalMetrics(ff_layers, rank=s.world.rank, world_size=s.world.world_size)
    valid_routing = IntervalMetrics(ff_layers, rank=s.world.rank, world_size=s.world.world_size, exchange=False)
    tokens_per_step = t.batch_size * cfg.model.context
    throughput = Throughput.of_run(cfg, world_size=s.world.world_size, micro_batch=s.micro_batch, device=s.world.device)
    monitor.write(throughput.describe())
    train_seconds = 0.0  # in training steps only (no evaluation, no checkpoints): the summary's TFLOP/s
    try:
        for step in range(start + 1, t.steps + 1):
            if heartbeat is not None:
                heartbeat.step = step
            log_now = step % t.log_every == 0 or step == t.steps
            metrics.begin_step()
            step_began = time.perf_counter()
            loss, ce, aux, grad_norm = _train_step(s, sampler, memory, metrics, guard, step, log_now=log_now)
            guard.after_update(step, s.engine.get_global_grad_norm())
            ckpt.weights_passed(guard.healthy_weights_step)  # a checkpoint of them is now known good
            result.losses.append(loss)
            result.steps = step
            step_seconds = time.perf_counter() - step_began
            metrics.end_step(step_seconds)
            train_seconds += step_seconds
            tokens_per_s = tokens_per_step / step_seconds
            monitor.progress(step, loss, tokens_per_s)
            if log_now:  # one all-reduce: the step's figures (mean over ranks) and the interval's routing
                log = metrics.reduce(
                    {"loss": loss, "ce": ce, "aux_loss": aux, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}
                )  # the global batch over the step time
                monitor.scalars(
                    "train",
                    step,
                    {
                        **log.train,
                        "perplexity": perplexity(log.train["ce"]),
                        "lr": s.engine.get_lr()[0],
                        **throughput.scalars(log.train["tokens_per_s"]),  # model TFLOP/s and MFU at that rate
                        **({"skipped_steps": guard.skipped} if t.on_divergence == "skip" else {}),  # over the run
                    },
                )
                monitor.routing(step, log)
            if t.eval_every and step % t.eval_every == 0 and step != t.steps:
                res = evaluate_split(s, "valid", max_batches=t.eval_batches, on_forward=valid_routing.after_forward)
                monitor.scalars("valid", step, res.scalars())
                monitor.routing_scalars("routing_valid", step, valid_routing.reduce({}))
                monitor.write(f"step {step}: valid {res.describe()}")
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                result.checkpoint = _save(s, ckpt, step, sampler, memory, guard)
        if cfg.checkpoint.save_final and result.steps > start:
            result.checkpoint = _save(s, ckpt, result.steps, sampler, memory, guard)
        result.valid = evaluate_split(s, "valid", max_batches=None, on_forward=valid_routing.after_forward)
        monitor.routing_scalars("routing_valid", result.steps, valid_routing.reduce({}))
        guard.check_final(result.steps, result.valid.loss)  # a NaN or diverged model never ends with exit 0
        ckpt.weights_passed(result.steps)
        result.test = evaluate_split(s, "test", max_batches=None)
        monitor.scalars("valid", result.steps, result.valid.scalars())
        monitor.scalars("test", result.steps, result.test.scalars())
        result.unigram_perplexity = unigram_perplexity(s.splits.train, s.splits.valid, s.splits.vocab_size)
        result.seconds = time.perf_counter() - t_start
        monitor.write(
            f"done: {result.steps} steps in {result.seconds:.0f} s "
            f"(training steps: {throughput.summary(result.steps - start, train_seconds)})\n"
            f"  valid {result.valid.describe()}\n  test  {result.test.describe()}\n"
            f"  unigram baseline: valid perplexity {result.unigram_perplexity:.2f}"
            + above_baseline_note(result.valid.perplexity, result.unigram_perplexity, result.steps * tokens_per_step)
            + (f"\n  skipped {guard.skipped} diverged steps (training.on_divergence: skip)" if guard.skipped else "")
        )
    except TrainingDiverged as e:  # point latest back at the known good checkpoint, and the user at it
        raise TrainingDiverged(f"{e}{ckpt.after_divergence()}. {FIX}") from None
    finally:
        monitor.close()
    return result


SMOKE_TOKENS = 1_000_000  # fewer training tokens than this: a smoke run (configs/tiny.yaml trains 7,680)


def above_baseline_note(valid_perplexity: float, unigram: float, tokens: int) -> str:
    """What the result line adds when the model ends above the unigram baseline (else nothing)."""
    if not valid_perplexity > unigram:
        return ""
    if tokens < SMOKE_TOKENS:
        return (
            f" (above it: a smoke run, {tokens:,} training tokens, checks that the pipeline runs; "
            "a model beats the baseline with more steps, e.g. configs/default.yaml)"
        )
    return f" (above it after {tokens:,} training tokens: check optimizer.lr, the schedule and the data)"


class Memory:
    """The segment memory of each micro-batch slot of this rank (attention xl; inert otherwise): a
    list of per-layer [B, M, d] tensors, or None before the first segment of a stream."""

    def __init__(self, model, *, slots: int, batch_size: int):
        self.enabled = bool(getattr(model, "uses_memory", False))
        self.model, self.batch_size = model, batch_size
        self.slots: list[list[torch.Tensor] | None] = [None] * slots

    def reset(self) -> None:
        self.slots = [None] * len(self.slots)

    def forward(self, engine, slot: int, x: torch.Tensor) -> LMOutput:
        """engine(x), carrying slot ``slot``'s memory when enabled."""
        if not self.enabled:
            return engine(x)
        mem = self.slots[slot]
        out = engine(x, self.model.empty_memory(self.batch_size) if mem is None else mem)
        self.slots[slot] = out.memory
        return out

    def state_dict(self) -> dict:
        return {"slots": [None if m is None else [t.cpu() for t in m] for m in self.slots]}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        slots = state["slots"]
        if len(slots) != len(self.slots):
            raise ValueError(f"memory was saved for {len(slots)} micro-batch slots, this run has {len(self.slots)}")
        self.slots = [None if m is None else [t.to(device) for t in m] for m in slots]


def _sampler(cfg: RunConfig, s: Session) -> Sampler:
    t = cfg.training
    kw = dict(
        batch_size=s.micro_batch,
        seq_len=cfg.model.context,
        seed=t.seed,
        rank=s.world.rank,
        world_size=s.world.world_size,
    )
    if batching(cfg) == "stream":
        return StreamSampler(s.splits.train, accumulation=t.grad_accumulation, **kw)
    return WindowSampler(s.splits.train, **kw)


def batching(cfg: RunConfig) -> str:
    """training.batching with auto resolved: stream for attention xl (its memory needs it), else random."""
    if cfg.training.batching != "auto":
        return cfg.training.batching
    return "stream" if cfg.model.attention == "xl" else "random"


def _train_step(
    s: Session,
    sampler: Sampler,
    memory: Memory,
    metrics: IntervalMetrics,
    guard: DivergenceGuard,
    step: int,
    *,
    log_now: bool,
):
    """One optimizer step; returns this rank's (loss, ce, aux, grad norm) averaged over micro-batches
    (the grad norm is the guard's, which it computes every step anyway; under ZeRO or bf16 the engine's,
    read when ``log_now``). ``guard`` sees the step before its update (it may stop the run or drop it)."""
    engine, gas = s.engine, s.cfg.training.grad_accumulation
    ce_sum = aux_sum = 0.0
    grad_norm = float("nan")
    if sampler.at_stream_start:
        memory.reset()  # a new epoch of the columns: the last segments are not this one's context
    for slot in range(gas):
        x, y = sampler.next_batch()
        out = memory.forward(engine, slot, x.to(s.world.device))
        logits, aux = out.logits, out.aux_loss
        metrics.after_forward()  # every training forward's routing counts, log step or not
        ce = F.cross_entropy(logits.float().flatten(0, 1), y.to(s.world.device).flatten())
        engine.backward(ce + aux)
        ce_sum += ce.item()
        aux_sum += aux.detach().item()
        if engine.is_gradient_accumulation_boundary():
            guard.before_update(step, engine, loss=ce_sum / gas if math.isfinite(aux_sum) else math.nan)
            grad_norm = guard.grad_norm  # the module's gradients after their reduction, before clipping
        engine.step()
    if log_now and engine.get_global_grad_norm() is not None:
        grad_norm = float(engine.get_global_grad_norm())  # ZeRO / bf16: the engine's own figure
    return (ce_sum + aux_sum) / gas, ce_sum / gas, aux_sum / gas, grad_norm


def _save(
    s: Session,
    ckpt: CheckpointManager,
    step: int,
    sampler: Sampler,
    memory: Memory,
    guard: DivergenceGuard,
) -> Path:
    stop_if_weights_diverged(s.engine.module, step)  # such a checkpoint would push out good ones
    state = {"sampler": sampler.state_dict(), "divergence": guard.state_dict()}
    if memory.enabled:
        state["memory"] = memory.state_dict()
    return ckpt.save(s.engine, step=step, rank_state=state)


def _resume(
    cfg: RunConfig,
    s: Session,
    ckpt: CheckpointManager,
    sampler: Sampler,
    memory: Memory,
    guard: DivergenceGuard,
) -> int:
    """Load the checkpoint ``checkpoint.resume`` names (auto: the latest, if any) into the engine, the
    sampler, the segment memory, the divergence guard's history and the RNGs; return its step (0: none)."""
    mode = cfg.checkpoint.resume
    tag_dir = None if mode == "none" else ckpt.latest() if mode == "auto" else resolve_checkpoint(mode)
    if tag_dir is None:
        return 0
    state = ckpt.load(s.engine, tag_dir)
    ckpt.continue_run(tag_dir)
    guard.load_state_dict(state.get("divergence"))  # the skip count and the history go on
    changed = follow_config_schedule(s.engine, cfg)
    if changed:
        logger.warning("resuming %s: %s", tag_dir, changed)
    try:
        sampler.load_state_dict(state["sampler"])
    except ValueError as e:
        raise CheckpointError(f"cannot resume the data position of {tag_dir}: {e}") from None
    if state.get("other_world"):  # saved by another number of ranks: their RNG streams do not map to ours
        logger.warning(
            "%s was saved by another number of ranks; RNG streams%s restart",
            tag_dir,
            " and segment memories" if memory.enabled else "",
        )
        seed_everything(cfg.training.seed + 1 + s.world.rank + 7919 * int(state["step"]))
    else:
        set_rng_state(state["rng"])
        if memory.enabled and "memory" in state:
            try:
                memory.load_state_dict(state["memory"], s.world.device)
            except ValueError as e:
                logger.warning("%s: %s; segment memories restart", tag_dir, e)
    return int(state["step"])


def main(argv: list[str] | None = None) -> int:
    from sigma_moe.launch.cli import process_main

    return process_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
