"""``sigma-moe plan CONFIG --gpus N``: memory, expert all-to-all traffic, FLOPs and step time per rank
of a run config on N GPUs, before anything runs, and the expert-parallel size (with micro-batch, ZeRO
stage and activation checkpointing) that fits and is fastest.

Every figure comes from the code the run itself uses, never a second copy:
    memory          launch/guards/memory_estimate.py (the estimate whose lower bound the run checks)
    all-to-all      distributed/exchange_volume.py (what the exchange meter counts, under uniform
                    routing: TensorBoard's routing/a2a_mb_per_step)
    FLOPs           layers/flops.py (the model FLOPs behind train/tflops_per_s and train/mfu)
    peak TFLOP/s    launch/monitor/throughput.py's data-sheet table
Step time = compute at an assumed MFU (× 4/3 with activation checkpointing: one more forward)
+ the expert all-to-alls at the intra- and inter-node bandwidths + the gradient all-reduce (ring,
2·(n−1)/n of the gradients over each data-parallel group), nothing overlapped. Expert-parallel groups
are P consecutive ranks, nodes ``--gpus-per-node`` consecutive ranks; uniform routing sends the same
bytes to every other rank of a group, so (min(P, M) − 1)/(P − 1) of them stay in the node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass

from sigma_moe.config_check import Checked, Checks, ConfigError
from sigma_moe.config_schema import build_config, field_docs
from sigma_moe.distributed.exchange_volume import a2a_bytes_per_token
from sigma_moe.launch.config import RunConfig, apply_override, load_config
from sigma_moe.launch.config_checks import check_world_or_raise
from sigma_moe.launch.guards.memory_estimate import GIB, STATE_BYTES, ParameterCounts, parameter_counts, step_memory
from sigma_moe.launch.monitor.throughput import table_peak_tflops
from sigma_moe.layers.flops import training_flops_per_token
from sigma_moe.layers.routed import RoutedConfig

# Data-sheet figures per GPU: memory (GiB), NVLink per direction (GB/s), the node's InfiniBand per
# GPU per direction (GB/s: 8 × 400 Gb/s NDR for H100/H200 nodes, 8 × 200 Gb/s HDR for A100).
GPUS = {"h100": (80.0, 450.0, 50.0), "h200": (141.0, 450.0, 50.0), "a100": (80.0, 300.0, 25.0)}


@dataclass
class PlanAssumptions(Checked):
    """What the plan assumes of the cluster (``--set plan.KEY=VALUE``); null: the named GPU's figure."""

    mfu: float = 0.4
    """Fraction of the peak FLOP/s the model's matmuls reach (compute time = FLOPs / (peak × mfu))."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one GPU at training.precision; null: the data sheet's dense figure."""
    device_memory_gib: float | None = None
    """Memory of one GPU in GiB; null: the data sheet's."""
    usable_memory: float = 0.9
    """Fraction of the device memory a step may fill (CUDA context, NCCL buffers, fragmentation)."""
    intra_node_gb_per_s: float | None = None
    """GB/s one GPU sends to the others of its node (NVLink, one direction); null: the data sheet's."""
    inter_node_gb_per_s: float | None = None
    """GB/s one GPU sends to other nodes (its share of the node's network, one direction); null: data sheet."""

    def check(self, c: Checks) -> None:
        c.require(0 < self.mfu <= 1, "mfu", "must lie in (0, 1]")
        c.require(0 < self.usable_memory <= 1, "usable_memory", "must lie in (0, 1]")
        for name in ("peak_tflops", "device_memory_gib", "intra_node_gb_per_s", "inter_node_gb_per_s"):
            if getattr(self, name) is not None:
                c.positive(name)


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpus_per_node: int
    gpu: str
    peak_tflops: float
    memory_bytes: float  # usable per GPU
    intra_bytes_per_s: float
    inter_bytes_per_s: float
    mfu: float
    assumptions: dict[str, tuple[object, str]]  # name -> (value, what it means), printed


def cluster(gpus: int, gpus_per_node: int, gpu: str, precision: str, raw: dict) -> Cluster:
    """The cluster the plan assumes: the named GPU's data sheet under the ``plan.*`` overrides."""
    a = build_config(PlanAssumptions, raw, "plan")
    memory, intra, inter = GPUS[gpu]
    peak = a.peak_tflops or table_peak_tflops(gpu, precision)
    memory, intra, inter = a.device_memory_gib or memory, a.intra_node_gb_per_s or intra, a.inter_node_gb_per_s or inter
    docs = field_docs(PlanAssumptions)
    shown = {"peak_tflops": peak, "device_memory_gib": memory, "intra_node_gb_per_s": intra}
    shown |= {"inter_node_gb_per_s": inter, "mfu": a.mfu, "usable_memory": a.usable_memory}
    return Cluster(
        gpus,
        gpus_per_node,
        gpu,
        peak,
        memory * a.usable_memory * GIB,
        intra * 1e9,
        inter * 1e9,
        a.mfu,
        {f"plan.{k}": (v, docs[k]) for k, v in shown.items()},
    )


@dataclass(frozen=True)
class Candidate:
    """One way to run the config on the cluster, with its figures per rank and step."""

    ep: int
    accumulation: int
    micro_batch: int
    zero_stage: int
    checkpointing: bool
    memory: dict[str, int]
    a2a_intra_bytes: float
    a2a_inter_bytes: float
    flops_per_step: float  # the whole job's model FLOPs
    compute_s: float
    a2a_s: float
    allreduce_s: float
    fits: bool

    @property
    def memory_bytes(self) -> int:
        return sum(self.memory.values())

    @property
    def a2a_mb(self) -> float:
        return (self.a2a_intra_bytes + self.a2a_inter_bytes) / 1e6

    @property
    def step_s(self) -> float:
        return self.compute_s + self.a2a_s + self.allreduce_s

    def settings(self) -> str:
        return (
            f"expert_parallel_size={self.ep} grad_accumulation={self.accumulation} zero_stage={self.zero_stage}"
            f" activation_checkpointing={str(self.checkpointing).lower()}"
        )


def variant(cfg: RunConfig, *, ep: int, accumulation: int, zero_stage: int, checkpointing: bool) -> RunConfig:
    t = dataclasses.replace(
        cfg.training, grad_accumulation=accumulation, zero_stage=zero_stage, activation_checkpointing=checkpointing
    )
    return dataclasses.replace(
        cfg, training=t, distributed=dataclasses.replace(cfg.distributed, expert_parallel_size=ep)
    )


def evaluate(cfg: RunConfig, c: Cluster, params: ParameterCounts, flops_per_token: dict | None = None) -> Candidate:
    """The figures of ``cfg`` as it stands on cluster ``c`` (``flops_per_token``: a cache by micro-batch
    for the model of ``params``)."""
    m, t, w = cfg.model, cfg.training, c.gpus
    p = cfg.distributed.expert_parallel_size
    micro = t.batch_size // (w * t.grad_accumulation)
    memory = step_memory(cfg, w, device_type="cuda", estimate=True, params=params).parts
    tokens_per_rank = t.batch_size * m.context // w
    a2a = 0.0
    if isinstance(m.ff, RoutedConfig) and p > 1:
        per_token = a2a_bytes_per_token(
            d_model=m.d_model,
            k=m.ff.k,
            n_experts=m.ff.n_experts,
            ep_size=p,
            element_size=STATE_BYTES[t.precision][0],
            recompute=t.activation_checkpointing,
        )
        a2a = m.n_layers * tokens_per_rank * per_token
    intra_share = (min(p, c.gpus_per_node) - 1) / (p - 1) if p > 1 else 1.0
    cache = {} if flops_per_token is None else flops_per_token
    if micro not in cache:
        cache[micro] = training_flops_per_token(m, batch_size=micro)
    flops = cache[micro] * t.batch_size * m.context
    compute = flops / w / (c.peak_tflops * 1e12 * c.mfu) * (4 / 3 if t.activation_checkpointing else 1)
    a2a_s = a2a * intra_share / c.intra_bytes_per_s + a2a * (1 - intra_share) / c.inter_bytes_per_s
    grad_bytes = STATE_BYTES[t.precision][1]
    allreduce = ring_seconds(grad_bytes * params.replicated, w, c) + ring_seconds(
        grad_bytes * params.experts // p, w // p, c
    )
    return Candidate(
        p,
        t.grad_accumulation,
        micro,
        t.zero_stage,
        t.activation_checkpointing,
        memory,
        a2a * intra_share,
        a2a * (1 - intra_share),
        flops,
        compute,
        a2a_s,
        allreduce,
        sum(memory.values()) <= c.memory_bytes,
    )


def ring_seconds(nbytes: float, ranks: int, c: Cluster) -> float:
    """A ring all-reduce of ``nbytes`` over ``ranks`` data-parallel ranks (across nodes when the job is)."""
    if ranks <= 1:
        return 0.0
    bandwidth = c.inter_bytes_per_s if c.gpus > c.gpus_per_node else c.intra_bytes_per_s
    return 2 * (ranks - 1) / ranks * nbytes / bandwidth


def candidates(cfg: RunConfig, c: Cluster, params: ParameterCounts) -> list[Candidate]:
    """Every expert-parallel size, accumulation, ZeRO stage and checkpointing choice the config allows."""
    n_experts = cfg.model.ff.n_experts if isinstance(cfg.model.ff, RoutedConfig) else 1
    per_rank = cfg.training.batch_size // c.gpus
    flops: dict[int, float] = {}
    out = []
    for ep in (p for p in range(1, c.gpus + 1) if c.gpus % p == 0 and n_experts % p == 0):
        for acc in (a for a in range(1, per_rank + 1) if per_rank % a == 0):
            for zero in (0, 1, 2):
                for ckpt in (False, True):
                    try:
                        v = variant(cfg, ep=ep, accumulation=acc, zero_stage=zero, checkpointing=ckpt)
                    except ConfigError:  # ruled out by the config's other settings (skipping needs ZeRO 0)
                        continue
                    out.append(evaluate(v, c, params, flops))
    return out


def preference(x: Candidate) -> tuple:
    """Fits first, then fastest; at equal time no recompute, fewer accumulation steps (larger matmuls
    than the MFU assumption credits), the lower ZeRO stage, the smaller expert-parallel size."""
    return (not x.fits, round(x.step_s, 9), x.checkpointing, x.accumulation, x.zero_stage, x.ep)


@dataclass(frozen=True)
class Plan:
    cluster: Cluster
    params: ParameterCounts
    given: Candidate  # the config as it stands
    other_checkpointing: Candidate  # the same with activation checkpointing switched
    best_per_ep: dict[int, Candidate]  # the preferred choice at each expert-parallel size

    @property
    def best(self) -> Candidate:
        return min(self.best_per_ep.values(), key=preference)


def make_plan(cfg: RunConfig, *, gpus: int, gpus_per_node: int = 8, gpu: str = "h100", plan_overrides=None) -> Plan:
    if gpus < 1 or gpus_per_node < 1:
        raise ConfigError(f"--gpus {gpus} / --gpus-per-node {gpus_per_node}: both must be >= 1")
    if gpu not in GPUS:
        raise ConfigError(f"--gpu {gpu!r}: choose one of {', '.join(GPUS)}")
    check_world_or_raise(cfg, gpus, "cuda")
    c = cluster(gpus, gpus_per_node, gpu, cfg.training.precision, plan_overrides or {})
    params = parameter_counts(cfg)
    best: dict[int, Candidate] = {}
    for x in candidates(cfg, c, params):
        if x.ep not in best or preference(x) < preference(best[x.ep]):
            best[x.ep] = x
    t = cfg.training
    flipped = variant(
        cfg,
        ep=cfg.distributed.expert_parallel_size,
        accumulation=t.grad_accumulation,
        zero_stage=t.zero_stage,
        checkpointing=not t.activation_checkpointing,
    )
    return Plan(c, params, evaluate(cfg, c, params), evaluate(flipped, c, params), best)


def plan_command(args) -> int:
    """``sigma-moe plan`` (the parsed command line): print the report or the JSON; 2 on bad input.
    ``--set plan.KEY=VALUE`` sets an assumption, any other key the run config."""
    from sigma_moe.launch.cli import EXIT_BAD_INPUT, one_line
    from sigma_moe.launch.plan_report import plan_json, plan_text

    try:
        mine = [o for o in args.overrides if o.startswith("plan.")]
        raw: dict = {}
        for item in mine:
            apply_override(raw, item)
        with contextlib.redirect_stdout(sys.stderr):  # prints of the config checks stay off the JSON
            rest = [o for o in args.overrides if o not in mine]
            cfg = load_config(args.config, rest, deepspeed_config=args.deepspeed_config)
            plan = make_plan(
                cfg, gpus=args.gpus, gpus_per_node=args.gpus_per_node, gpu=args.gpu, plan_overrides=raw.get("plan", {})
            )
    except ConfigError as e:
        print(f"sigma-moe plan: error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(plan_json(plan, cfg) if args.json else plan_text(plan, cfg, args.config))
    return 0
