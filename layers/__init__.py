"""Model math on one device: the feedforward variants (registered by name), attention, the LM.

Importing this package imports every variant module, which fills the feedforward registry.
"""

from sigma_moe.config_check import ConfigError

from .attention import CausalSelfAttention
from .attention_xl import RelativeSelfAttention, rel_shift, relative_positions
from .consolidated import consolidated_state_dict, is_export, load_consolidated_state_dict, load_export
from .decoding import DecodeState, KVCache
from .dense import Dense, DenseConfig
from .dispatch import ExpertDispatcher, LocalDispatcher
from .feedforward import (
    FeedForward,
    FeedForwardConfig,
    RoutingStats,
    build_feedforward,
    feedforward_config_class,
    feedforward_config_from_dict,
    feedforward_kinds,
    register_feedforward,
)
from .pkm import PKM, PKMConfig
from .positions import sinusoidal_positions, sinusoids
from .reduction import LocalTokenSum
from .routed import RoutedConfig, RoutedExperts, Routing
from .sbase import SBase, SBaseConfig, sinkhorn_log
from .sigma_moe import SigmaMoE, SigmaMoEConfig
from .sizing import count_parameters, feedforward_parameter_count, mlp_flops_per_token, parameter_equal_dense_d_ff
from .switch import Switch, SwitchConfig
from .topk_mlp import TopKMLP, TopKMLPConfig
from .transformer import LMOutput, TransformerConfig, TransformerLM

__all__ = [
    "PKM",
    "CausalSelfAttention",
    "ConfigError",
    "DecodeState",
    "Dense",
    "DenseConfig",
    "ExpertDispatcher",
    "FeedForward",
    "FeedForwardConfig",
    "KVCache",
    "LMOutput",
    "LocalDispatcher",
    "LocalTokenSum",
    "PKMConfig",
    "RelativeSelfAttention",
    "RoutedConfig",
    "RoutedExperts",
    "Routing",
    "RoutingStats",
    "SBase",
    "SBaseConfig",
    "SigmaMoE",
    "SigmaMoEConfig",
    "Switch",
    "SwitchConfig",
    "TopKMLP",
    "TopKMLPConfig",
    "TransformerConfig",
    "TransformerLM",
    "build_feedforward",
    "consolidated_state_dict",
    "count_parameters",
    "feedforward_config_class",
    "feedforward_config_from_dict",
    "feedforward_kinds",
    "feedforward_parameter_count",
    "is_export",
    "load_consolidated_state_dict",
    "load_export",
    "mlp_flops_per_token",
    "parameter_equal_dense_d_ff",
    "register_feedforward",
    "rel_shift",
    "relative_positions",
    "sinkhorn_log",
    "sinusoidal_positions",
    "sinusoids",
]
