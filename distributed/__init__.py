"""Expert parallelism from outside the model: process groups, differentiable collectives, the
all-to-all expert dispatcher, ``parallelize(model, cfg)`` which applies them before
``deepspeed.initialize``, and expert-sharded checkpoint files."""

from .all_to_all import GlobalTokenSum, all_reduce_sum, all_to_all, exchange_counts
from .checkpoint import CheckpointMismatch, load_weights, save_experts
from .deepspeed_compat import DEEPSPEED_RANGE
from .deepspeed_moe import DeepSpeedMoEAdapter, is_expert_param, moe_param_groups
from .dispatcher import AllToAllDispatcher, DispatchPlan
from .exchange_meter import ExchangeMeter, ExchangeTotals
from .exchange_stats import exchange_figures, exchange_meters, expert_parallel_layers, remote_rows
from .expert_shard import ExpertShard, expert_shard, is_expert_parallel, local_experts
from .grad_norm import clip_grad_norm_, global_grad_norm, use_exact_clipping
from .groups import ExpertParallelGroups, ExpertParallelLayout, check_experts_divisible, expert_parallel_groups
from .parallelize import parallelize

__all__ = [
    "AllToAllDispatcher",
    "CheckpointMismatch",
    "DeepSpeedMoEAdapter",
    "DispatchPlan",
    "ExchangeMeter",
    "ExchangeTotals",
    "ExpertParallelGroups",
    "ExpertParallelLayout",
    "ExpertShard",
    "DEEPSPEED_RANGE",
    "GlobalTokenSum",
    "all_reduce_sum",
    "all_to_all",
    "check_experts_divisible",
    "clip_grad_norm_",
    "exchange_counts",
    "exchange_figures",
    "exchange_meters",
    "expert_parallel_layers",
    "expert_parallel_groups",
    "expert_shard",
    "global_grad_norm",
    "is_expert_param",
    "is_expert_parallel",
    "load_weights",
    "local_experts",
    "moe_param_groups",
    "parallelize",
    "remote_rows",
    "save_experts",
    "use_exact_clipping",
]
