"""qla_megatron.ops: the chunked gated delta rule, its references, backends and segment algebra."""

from .gated_delta_rule import (
    chunk_gated_delta_rule,
    compose_segments,
    recurrent_gated_delta_rule,
    segment_summary,
    segmented_chunk_gated_delta_rule,
    which_backend,
)

__all__ = [
    "chunk_gated_delta_rule",
    "recurrent_gated_delta_rule",
    "segment_summary",
    "compose_segments",
    "segmented_chunk_gated_delta_rule",
    "which_backend",
]
