"""qla_megatron.training: the pretraining recipe (examples/pretrain_gdn.py) on megatron-core's
training stack: arguments and checks, the model provider (our hybrid block spec), data, FLOP
counts (Megatron's formula and our kernels'), the per-iteration log, and the CPU loop.

Nothing here is imported by qla_megatron.ops or qla_megatron.layers.
"""
