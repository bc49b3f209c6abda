"""qla_megatron.parallel: cross-GPU context parallelism by passing segment states between ranks."""

from .collectives import all_gather_stacked
from .conv_halo import cp_causal_depthwise_conv1d
from .cp import cp_chunk_gated_delta_rule
from .cp_emulation import emulated_cp_chunk_gated_delta_rule
from .layouts import LAYOUTS, global_segments, shard, unshard

__all__ = ["cp_chunk_gated_delta_rule", "emulated_cp_chunk_gated_delta_rule", "cp_causal_depthwise_conv1d",
           "all_gather_stacked", "LAYOUTS", "global_segments", "shard", "unshard"]
