"""qla_megatron.parallel: cross-GPU context parallelism by passing segment states between ranks."""

from .collectives import all_gather_stacked
from .cp import cp_chunk_gated_delta_rule
from .layouts import LAYOUTS, global_segments, shard, unshard

__all__ = ["cp_chunk_gated_delta_rule", "all_gather_stacked", "LAYOUTS", "global_segments", "shard", "unshard"]
