"""qla_megatron.ops: the chunked gated delta rule, its references, backends, segment algebra and
options (GDNOptions)."""

from .gated_delta_rule import (
    GDNOptions,
    IntraCPConfig,
    chunk_gated_delta_rule,
    compose_segments,
    default_options,
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
    "GDNOptions",
    "IntraCPConfig",
    "default_options",
]
