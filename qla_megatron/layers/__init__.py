"""qla_megatron.layers: the Megatron-core Gated DeltaNet layer and its ModuleSpecs.

`cpu_compat` (patches for megatron-core on a CPU-only torch) is deliberately not imported here.
"""

from .config import GDNSizes, gdn_sizes
from .conv import causal_depthwise_conv1d
from .gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
from .norm import LocalHeadNorm
from .specs import (
    get_gdn_layer_spec,
    get_hybrid_block_spec,
    get_hybrid_layer_specs,
    linear_attention_pattern,
)

__all__ = [
    "GatedDeltaNet",
    "GatedDeltaNetSubmodules",
    "GDNSizes",
    "gdn_sizes",
    "LocalHeadNorm",
    "causal_depthwise_conv1d",
    "get_gdn_layer_spec",
    "get_hybrid_block_spec",
    "get_hybrid_layer_specs",
    "linear_attention_pattern",
]
