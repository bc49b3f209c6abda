"""qla_megatron.layers: the Megatron-core Gated DeltaNet layer and its ModuleSpecs."""
