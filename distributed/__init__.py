"""Expert parallelism from outside the model: process groups, differentiable collectives, the
all-to-all expert dispatcher, and ``parallelize(model, cfg)`` which applies them before
``deepspeed.initialize``."""
from .all_to_all import GlobalTokenSum, all_reduce_sum, all_to_all, exchange_counts
from .deepspeed_moe import DeepSpeedMoEAdapter, is_expert_param, moe_param_groups
from .dispatcher import AllToAllDispatcher, DispatchPlan
from .groups import ExpertParallelGroups, ExpertParallelLayout, check_experts_divisible, expert_parallel_groups
from .parallelize import parallelize

__all__ = [
    "AllToAllDispatcher",
    "DeepSpeedMoEAdapter",
    "DispatchPlan",
    "ExpertParallelGroups",
    "ExpertParallelLayout",
    "GlobalTokenSum",
    "all_reduce_sum",
    "all_to_all",
    "check_experts_divisible",
    "exchange_counts",
    "expert_parallel_groups",
    "is_expert_param",
    "moe_param_groups",
    "parallelize",
]
