"""The GPU path: megatron.training's own `pretrain`, with the recipe's model provider, dataset
provider and forward step, and our log line (qla_megatron.training.progress) printed after
Megatron's own at every --log-interval."""

from __future__ import annotations

import time
from functools import partial

import torch


def _wrap_training_log(print_fn):
    """Megatron's training_log, followed by our line on rank 0 (it keeps Megatron's return value).
    The time per iteration is the wall time between two logged iterations over their distance."""
    import megatron.training.training as mt

    from .progress import IterationLog

    original = mt.training_log
    state = {"log": None, "t": None, "iteration": None}

    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, *rest, **kw):
        args = mt.get_args()
        # Megatron's own log resets its timers: read the optimizer's accumulated time first.
        optimizer_s = mt.get_timers()("optimizer", log_level=1).elapsed(reset=False) if args.time_breakdown else 0.0
        out = original(loss_dict, total_loss_dict, learning_rate, iteration, *rest, **kw)
        now = time.perf_counter()
        if state["log"] is None:
            state["log"] = IterationLog(args, torch.distributed.get_world_size(), "cuda",
                                        start_iteration=iteration - 1)
            if torch.distributed.get_rank() == 0:
                print_fn(state["log"].header(), flush=True)
        if state["t"] is not None and iteration % args.log_interval == 0:
            dt = (now - state["t"]) / max(iteration - state["iteration"], 1)
            loss = loss_dict.get("lm loss")
            if torch.distributed.get_rank() == 0 and loss is not None:
                print_fn(state["log"].line(iteration, float(loss), dt, learning_rate or 0.0), flush=True)
            if args.time_breakdown:
                from . import breakdown

                n = max(iteration - state["iteration"], 1)
                parts = {k: v / n for k, v in breakdown.TIMER.collect().items()}
                if torch.distributed.get_rank() == 0:
                    print_fn(breakdown.format_breakdown(parts, optimizer_s / n, dt), flush=True)
        if state["t"] is None or iteration % args.log_interval == 0:
            state["t"], state["iteration"] = now, iteration
        return out

    mt.training_log = training_log


def train_with_megatron(args, forward_step, datasets_provider, print_fn=print) -> None:
    from megatron.core.enums import ModelType
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.training import pretrain

    from .model import model_provider

    _wrap_training_log(print_fn)
    cfg = pretrain_cfg_container_from_args(args)
    pretrain(cfg, datasets_provider, ModelType.encoder_or_decoder, partial(forward_step, device="cuda"),
             model_provider=model_provider)
