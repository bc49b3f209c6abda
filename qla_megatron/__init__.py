"""qla_megatron: Gated DeltaNet linear attention for long-sequence pretraining on Megatron-core."""

__version__ = "0.1.0"
