"""Known megatron-core messages that every run of the recipe would print, kept off the terminal:
import-time notes about optional packages we run without, INFO chatter, and warnings that hold
for every run (each named below). Anything else still prints."""

from __future__ import annotations

import logging
import warnings

KNOWN_WARNINGS = (  # megatron-core's import-time notes about optional packages we run without
    r"Apex is not installed", r"Transformer Engine and Apex are not installed",
    r"Only transformer-engine>=1.7.0 supports MoE", r"absl.logging is not installed",
    r"Could not determine rank from torch.distributed", r"MimoModelConfig is experimental",
    r"'pin_memory' argument is set as true but no accelerator",
    r"It is recommended to use a ModelConfig")  # pretrain's note: we give it a model provider on purpose
QUIET_LOGGERS = {  # logger -> level: INFO chatter, and warnings that hold for every run of the recipe
    "megatron": logging.WARNING,
    "megatron.core.rerun_state_machine": logging.ERROR,           # "Implicit initialization ..."
    "megatron.core.datasets.gpt_dataset": logging.ERROR,          # "Unable to save ... indexes" (mock)
    "megatron.core.dist_checkpointing.strategies.torch": logging.ERROR,  # "async save is deprecated"
    "megatron.core.models.gpt.gpt_model": logging.ERROR,  # "GPTModel IS DEPRECATED": we plug our
                                                          # hybrid block spec into it on purpose
}


class _ArgsOnlyMismatch(logging.Filter):
    """Drops dist-checkpointing's note that the ranks' common state differs when the only
    difference is the saved `args` namespace (it holds each rank's own rank and local_rank)."""

    def filter(self, record):
        msg = record.getMessage()
        return not ("common state dict differs" in msg
                    and "Mismatched keys: [(('args',)" in msg and msg.count("((") == 1
                    and "Keys only on rank 0: []" in msg)


def quiet_known_warnings() -> None:
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    validation = logging.getLogger("megatron.core.dist_checkpointing.validation")
    if not any(isinstance(f, _ArgsOnlyMismatch) for f in validation.filters):
        validation.addFilter(_ArgsOnlyMismatch())
