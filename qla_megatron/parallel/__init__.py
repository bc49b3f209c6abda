"""qla_megatron.parallel: cross-GPU context parallelism by passing segment states between ranks."""
