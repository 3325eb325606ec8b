"""``sigma-moe plan``'s output: the text report and the ``--json`` object (the figures: launch/plan.py)."""

from __future__ import annotations

import json

from sigma_moe.launch.config import RunConfig
from sigma_moe.launch.guards.memory_estimate import GIB
from sigma_moe.launch.monitor.throughput import si
from sigma_moe.launch.plan import Candidate, Plan, preference


def why_not(x: Candidate, best: Candidate, usable: float) -> str:
    """Why ``x`` (the best at its expert-parallel size) loses to ``best``."""
    if x is best:
        return "recommended"
    if not x.fits:
        return f"does not fit: {x.memory_bytes / GIB:.1f} GiB > {usable / GIB:.1f} GiB usable"
    slower = x.step_s / best.step_s - 1
    if slower > 1e-6:
        terms = [("compute", x.compute_s - best.compute_s), ("all-to-all", x.a2a_s - best.a2a_s)]
        terms.append(("gradient all-reduce", x.allreduce_s - best.allreduce_s))
        name, extra = max(terms, key=lambda t: t[1])
        return f"{slower:+.1%} step time (mostly {name}, {extra * 1e3:+.2f} ms)"
    return "as fast; " + ("recomputes" if x.checkpointing else "more memory or a larger group than the recommended")


def candidate_json(x: Candidate) -> dict:
    return {
        "expert_parallel_size": x.ep,
        "grad_accumulation": x.accumulation,
        "micro_batch": x.micro_batch,
        "zero_stage": x.zero_stage,
        "activation_checkpointing": x.checkpointing,
        "memory_bytes_per_rank": x.memory_bytes,
        "memory_parts": x.memory,
        "fits": x.fits,
        "a2a_mb_per_step_per_rank": x.a2a_mb,
        "a2a_intra_node_mb": x.a2a_intra_bytes / 1e6,
        "a2a_inter_node_mb": x.a2a_inter_bytes / 1e6,
        "flops_per_step": x.flops_per_step,
        "compute_s": x.compute_s,
        "a2a_s": x.a2a_s,
        "allreduce_s": x.allreduce_s,
        "step_time_s": x.step_s,
    }


def plan_json(plan: Plan, cfg: RunConfig) -> str:
    g, best, c = plan.given, plan.best, plan.cluster
    out = {
        "gpus": c.gpus,
        "gpus_per_node": c.gpus_per_node,
        "gpu": c.gpu,
        "assumptions": {k: v for k, (v, _) in c.assumptions.items()},
        "parameters": {"replicated": plan.params.replicated, "experts": plan.params.experts},
        **candidate_json(g),
        "memory_parts_other_checkpointing": plan.other_checkpointing.memory,
        "device_memory_usable_bytes": c.memory_bytes,
        "flops_per_step_per_rank": g.flops_per_step / c.gpus,
        "best_expert_parallel_size": best.ep,
        "best_grad_accumulation": best.accumulation,
        "best_micro_batch": best.micro_batch,
        "best_zero_stage": best.zero_stage,
        "best_activation_checkpointing": best.checkpointing,
        "best_step_time_s": best.step_s,
        "alternatives": [
            {**candidate_json(x), "why": why_not(x, best, c.memory_bytes)}
            for x in sorted(plan.best_per_ep.values(), key=lambda x: x.ep)
        ],
    }
    return json.dumps(out, indent=1)


def memory_line(parts: dict[str, int]) -> str:
    return ", ".join(f"{name} {b / GIB:.3g} GiB" for name, b in parts.items())


def plan_text(plan: Plan, cfg: RunConfig, config_path: str) -> str:
    g, best, c, m = plan.given, plan.best, plan.cluster, cfg.model
    ff = m.ff
    routed = f", {ff.n_experts} experts × {ff.expert_size}, K {ff.k}" if hasattr(ff, "n_experts") else ""
    lines = [
        f"plan: {config_path} on {c.gpus} × {c.gpu.upper()} ({c.gpus_per_node} per node), "
        f"precision {cfg.training.precision}, batch {cfg.training.batch_size} × context {m.context}",
        f"model: {plan.params.replicated + plan.params.experts:,} parameters ({plan.params.experts:,} in experts, "
        f"{plan.params.replicated:,} replicated), {m.n_layers} layers, d_model {m.d_model}, ff {ff.kind}{routed}",
        "assumptions (override with --set plan.KEY=VALUE):",
        *(f"  {k} = {v:g}  {doc}" for k, (v, doc) in c.assumptions.items()),
        f"as configured: {g.settings()} (micro-batch {g.micro_batch})",
        f"  memory per rank: {g.memory_bytes / GIB:.3g} GiB of {c.memory_bytes / GIB:.3g} GiB usable "
        f"({'fits' if g.fits else 'DOES NOT FIT'}): {memory_line(g.memory)}",
        f"  {'with' if plan.other_checkpointing.checkpointing else 'without'} activation checkpointing: "
        f"{plan.other_checkpointing.memory_bytes / GIB:.3g} GiB",
        f"  expert all-to-all per rank and step: {g.a2a_mb:.4g} MB ({g.a2a_intra_bytes / 1e6:.4g} intra-node, "
        f"{g.a2a_inter_bytes / 1e6:.4g} inter-node), forward and backward, all layers, uniform routing",
        f"  model FLOPs per step: {si(g.flops_per_step)}FLOP ({si(g.flops_per_step / c.gpus)}FLOP per rank)",
        f"  step time: {g.step_s * 1e3:.4g} ms = compute {g.compute_s * 1e3:.4g} + all-to-all "
        f"{g.a2a_s * 1e3:.4g} + gradient all-reduce {g.allreduce_s * 1e3:.4g} ms",
        f"recommended: {best.settings()} (micro-batch {best.micro_batch}): "
        + (
            f"the fastest that fits, {best.step_s * 1e3:.4g} ms per step, {best.memory_bytes / GIB:.3g} GiB per rank"
            if best.fits
            else "nothing fits; raise the number of GPUs or lower model.context or training.batch_size"
        ),
        "alternatives (the best of each expert-parallel size):",
        f"  {'EP':>4} {'micro':>5} {'accum':>5} {'ZeRO':>4} {'ckpt':>4} {'GiB':>7} {'a2a MB':>9} {'ms/step':>9}"
        "  why not",
    ]
    for x in sorted(plan.best_per_ep.values(), key=preference):
        lines.append(
            f"  {x.ep:>4} {x.micro_batch:>5} {x.accumulation:>5} {x.zero_stage:>4} "
            f"{'yes' if x.checkpointing else 'no':>4} "
            f"{x.memory_bytes / GIB:>7.3g} {x.a2a_mb:>9.4g} {x.step_s * 1e3:>9.4g}  {why_not(x, best, c.memory_bytes)}"
        )
    return "\n".join(lines)
