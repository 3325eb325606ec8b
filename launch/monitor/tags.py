"""Every TensorBoard tag the training run writes, with its meaning and unit: written into each tag's
summary metadata (TensorBoard shows it beside the chart) and the source of the README's tag list.

Tags with a layer carry ``layer_XX`` (two digits: the feedforward layer's position, 00 = nearest the
input); :func:`describe` finds a tag's description from its pattern.
"""

from __future__ import annotations

import re

INTERVAL = "over the logging interval (every training forward of every micro-batch since the last log step, all ranks)"

TAGS: dict[str, str] = {
    # ---- training (the log step's values, mean over ranks)
    "train/loss": "Loss the model optimises: cross-entropy + train/aux_loss (nats per token), the log step's "
    "micro-batch mean, mean over ranks.",
    "train/ce": "Cross-entropy of the next token (nats per token), the log step's, mean over ranks.",
    "train/aux_loss": "Sum of the routed layers' auxiliary losses as optimised (σ-MoE: γ·Σ p log p, negative "
    "by the paper's definition; Switch: coef·E·Σ f·P; S-BASE: 0). See routing/*/balance_loss "
    "for a non-negative balance figure.",
    "train/perplexity": "exp(train/ce).",
    "train/lr": "Learning rate of the step.",
    "train/grad_norm": "Global gradient norm before clipping.",
    "train/tokens_per_s": "Tokens of the global batch over the step's wall time (whole job).",
    "train/tflops_per_s": "Model FLOPs per second of the whole job (3 × forward matmul FLOPs, routed layers "
    "at their active FLOPs), in TFLOP/s.",
    "train/skipped_steps": "Steps whose update the divergence guard dropped so far in the run (training."
    "on_divergence: skip). Count.",
    "train/mfu": "train/tflops_per_s over (peak TFLOP/s per device × ranks); only with a known peak.",
    "valid/loss": "Validation cross-entropy (nats per token).",
    "valid/perplexity": "exp(valid/loss).",
    "valid/bits_per_byte": "Validation loss in bits per byte of text.",
    "test/loss": "Test cross-entropy (nats per token), at the end.",
    "test/perplexity": "exp(test/loss).",
    "test/bits_per_byte": "Test loss in bits per byte of text.",
    # ---- routing per layer (the interval's, all ranks)
    "routing/layer_XX/load_share": "Exact bars, one bucket per expert id (edges id ± 0.5): the fraction of "
    f"the layer's routed (token, slot) assignments each expert got {INTERVAL}. "
    "Sums to 1; the fair share is 1/E.",
    "routing/layer_XX/selection_entropy": "Entropy of the layer's load share over log E, 0..1: 1 = every "
    f"expert got the same number of slots {INTERVAL}; 0 = one expert got all.",
    "routing/layer_XX/max_mean_load": f"Busiest expert's load ÷ the mean load {INTERVAL}; 1 = balanced, E = "
    "one expert got everything.",
    "routing/layer_XX/min_mean_load": f"Least-used expert's load ÷ the mean load {INTERVAL}; 1 = balanced, "
    "0 = an expert got nothing.",
    "routing/layer_XX/starved_experts": "Experts whose load is below logging.starved_below (default ¼) × the "
    f"mean load {INTERVAL}, dead ones included. Count.",
    "routing/layer_XX/dead_experts": f"Experts that got no assignment at all {INTERVAL}. Count.",
    "routing/layer_XX/balance_loss": "log E − H(p̄) in nats, ≥ 0, 0 = balanced: the KL divergence from uniform "
    "of the router's selection distribution (softmax of the router logits) "
    "averaged over the whole batch of every rank, as the regulariser's p̄ (the "
    "same at every world size), mean over the interval's forwards. σ-MoE's "
    "regulariser is γ·(balance_loss − log E) per layer.",
    "routing/layer_XX/load_cv": "Spread of the load over experts: coefficient of variation (std ÷ mean of the "
    f"per-expert assignments) {INTERVAL}; 0 = even, √(E−1) = one expert got all.",
    "routing/layer_XX/units_used_min": "Hidden units: of the experts that got tokens, the one with the fewest "
    f"hidden units that fired (ReLU > 0 for at least one of its tokens) {INTERVAL}, as a share of its units, "
    "0..1. An expert can get its share of tokens and still be mostly dead inside.",
    "routing/layer_XX/units_used_mean": "Hidden units: share of an expert's hidden units that fired (ReLU > 0 "
    f"for at least one of its tokens) {INTERVAL}, mean over the experts that got tokens, 0..1.",
    "routing/layer_XX/units_used": "Exact bars, one bucket per expert id: the share of the expert's hidden units "
    f"that fired (ReLU > 0 for at least one of its tokens) {INTERVAL}.",
    "routing/layer_XX/units_over_time": "Image: expert (rows) × logged step (columns), colour = share of the "
    "expert's hidden units that fired in the interval (0..1: dark blue = few, yellow = "
    "all; black = the expert got no assignment); right: the latest interval's shares.",
    "routing/layer_XX/balance_over_time": "Image: expert (rows) × logged step (columns, growing with training), "
    "colour = load ÷ mean load on the fixed log2 scale ¼..4 (white = fair "
    "share, blue = under-used, red = overloaded, black = no assignment at "
    "all: dead); right: the latest interval's exact load share per expert, "
    "with the fair share and the starved threshold. Under expert parallelism "
    "white lines separate the ranks' blocks of experts.",
    "routing/layer_XX/a2a_remote_share": "Expert parallelism: share of the layer's (token, slot) assignments "
    f"whose expert is on another rank {INTERVAL}, 0..1.",
    "routing/layer_XX/ep_max_mean_load": "Expert parallelism: (token, slot) assignments of the busiest expert-"
    f"parallel rank's experts ÷ the mean over ranks {INTERVAL}; 1 = every rank's experts get the same work.",
    # ---- routing, the whole model
    "routing/load_heatmap": "Image: routed layer (rows) × expert (columns) for the latest interval, colour = "
    "load ÷ mean load on the same fixed log2 scale ¼..4 as balance_over_time (black = no assignment).",
    "routing/sorted_load": "Image: routed layer (rows) × its experts sorted by load, busiest first (columns), "
    "latest interval, colour = load ÷ mean load (scale of balance_over_time): the load spread of every layer.",
    "routing/model/load_cv": "Largest routing/layer_XX/load_cv over layers (the worst layer).",
    "routing/model/units_used_min": "Smallest routing/layer_XX/units_used_min over layers (0..1).",
    "routing/model/units_used_mean": "Mean over routed layers of routing/layer_XX/units_used_mean (0..1).",
    "routing/model/selection_entropy": "Mean over routed layers of routing/layer_XX/selection_entropy (0..1).",
    "routing/model/max_mean_load": "Largest routing/layer_XX/max_mean_load over layers (the worst layer).",
    "routing/model/min_mean_load": "Smallest routing/layer_XX/min_mean_load over layers (the worst layer).",
    "routing/model/starved_experts": "Starved experts summed over routed layers. Count.",
    "routing/model/dead_experts": "Dead experts summed over routed layers. Count.",
    "routing/model/balance_loss": "routing/layer_XX/balance_loss summed over routed layers (nats).",
    "routing/model/routed_slots_per_layer": f"(token, slot) assignments per routed layer {INTERVAL} "
    "(tokens × K): load_share × this = assignments per expert.",
    # ---- expert parallelism (per rank and training step, over the interval)
    "routing/a2a_mb_per_step": "Expert all-to-all: MB a rank sends to other ranks per training step (forward "
    "and backward, all layers), mean over ranks.",
    "routing/a2a_mb_per_step_max": "As a2a_mb_per_step, the rank that sends the most.",
    "routing/a2a_ms_per_step": "Expert all-to-all: ms a rank spends inside the all-to-alls per training step "
    "(waiting for slower ranks included), mean over ranks.",
    "routing/a2a_ms_per_step_max": "As a2a_ms_per_step, the rank that spends the most.",
    "routing/tokens_received_per_step": "Tokens a rank receives for its experts from other ranks per training "
    "step (forward dispatches, all layers; a token comes once per rank however many of its "
    "experts live there), mean over ranks.",
    "routing/tokens_received_per_step_max": "As tokens_received_per_step, the rank that receives the most.",
    "routing/a2a_share_of_step": "Fraction of a training step's wall time spent inside the expert all-to-alls, "
    "mean over ranks, 0..1.",
    "routing/ep_max_mean_assignments": "(Token, slot) assignments the busiest rank's experts computed ÷ the mean "
    "over ranks, per training step over the interval; 1 = even.",
    "routing/ep_rank_XX/assignments_per_step": "Expert parallelism, rank XX: (token, slot) assignments its "
    "experts computed per training step (its own tokens' and received ones; forward), "
    "the interval's mean. The highest line is the rank the others wait for.",
    "routing/ep_rank_XX/a2a_ms_per_step": "Expert parallelism, rank XX: ms inside the all-to-alls per training "
    "step (waiting for slower ranks included), the interval's mean.",
    # ---- the run
    "run/config": "The resolved run config (YAML), as the run started.",
    # ---- written by `sigma-moe compare` into each finished run (one point, at its last step)
    "result/valid_perplexity": "The run's final full validation perplexity (the HParams tab's metric).",
    "result/test_perplexity": "The run's test perplexity (the HParams tab's metric).",
    "result/tokens_per_s": "The run's median training tokens/s, first log step left out (HParams metric).",
    "result/peak_mem_mib": "The run's peak memory, MiB: GPU allocator peak on CUDA, else the process tree's "
    "peak RSS (HParams metric).",
    "result/max_mean_load": "The run's routing/model/max_mean_load at its last log step: the busiest expert ÷ "
    "the mean load, worst layer (HParams metric; routed variants only).",
    "compare/spec": "The comparison spec the grid was run from.",
    "compare/results": "The comparison's results table (results.md).",
}

_NUMBERED = re.compile(r"(layer|rank)_\d+")
VALID = "over the evaluation of the validation split (every forward, all ranks)"


def describe(tag: str) -> str:
    """The description of ``tag`` ("" for a tag not listed); ``routing_valid/...``: the training tag's,
    over a validation evaluation instead of the logging interval."""
    if tag.startswith("routing_valid/"):
        base = describe("routing/" + tag.removeprefix("routing_valid/"))
        return base and "Validation split, at each evaluation: " + base.replace(INTERVAL, VALID)
    return TAGS.get(tag) or TAGS.get(_NUMBERED.sub(lambda m: m.group(1) + "_XX", tag), "")
