"""The gated delta rule (Gated DeltaNet): chunked op, token-by-token reference, segment algebra."""

from . import fla_peer  # noqa: F401  (registers the optional "fla" backend)
from . import tilelang_backend  # noqa: F401  (registers the Hopper "tilelang" backend)
from .chunk import chunk_gated_delta_rule, which_backend
from .intra_cp import IntraCPConfig
from .naive import recurrent_gated_delta_rule
from .options import GDNOptions, default_options
from .segments import compose_segments, segment_summary, segmented_chunk_gated_delta_rule

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
