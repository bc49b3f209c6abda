"""The recipe's CPU training loop: the steps of megatron.training's `train_step` on a machine
without CUDA, where `pretrain` itself cannot run (it makes "cuda" tensors at start-up, in its
logging and in its timers).

Everything but the loop is Megatron's or the recipe's shared code: the argument namespace,
initialize_megatron (gloo), our model provider, megatron-core's DDP wrapper and optimizer
(`get_megatron_optimizer`), the LR scheduler, the forward-backward schedule, the GPTDataset with
Megatron's pretraining sampler (resumed at `consumed_train_samples`), and megatron.training's
`save_checkpoint` / `load_checkpoint`, so a checkpoint written here loads in a GPU run and back.
A checkpoint's tracker file (`latest_checkpointed_iteration.txt`) is written only after every rank
has finished writing, so a run killed during a save resumes from the last complete checkpoint.
"""

from __future__ import annotations

import os
import random
import socket
import time
from datetime import timedelta
from functools import partial

import numpy as np
import torch


def _setup(args):
    """Distributed groups, model (DDP-wrapped), optimizer, scheduler, on the CPU."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import set_defaults_if_not_set_tensor_model_parallel_attributes
    from megatron.training.arguments import core_transformer_config_from_args
    from megatron.training.training import (get_megatron_ddp_config, get_megatron_optimizer_config,
                                            get_optimizer_param_scheduler)

    from qla_megatron.layers.cpu_compat import seed_model_parallel_rng

    from .model import build_model

    # initialize_megatron skips the model-parallel groups and CUDA seeds without a GPU: same steps here.
    if not torch.distributed.is_initialized():
        init = None
        if "MASTER_ADDR" not in os.environ and args.world_size == 1:  # plain `python`, no torchrun
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        torch.distributed.init_process_group("gloo", init_method=init, rank=args.rank, world_size=args.world_size,
                                             timeout=timedelta(minutes=args.distributed_timeout_minutes))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size)
    random.seed(args.seed)
    np.random.seed(args.seed)
    seed_model_parallel_rng(args.seed, parallel_state.get_tensor_model_parallel_rank())
    pg = ProcessGroupCollection.use_mpu_process_groups()
    config = core_transformer_config_from_args(args)
    model = build_model(args, config, pg_collection=pg)
    if args.time_breakdown:
        from .breakdown import RegionTimer, attach

        attach(model, RegionTimer("cpu"))
    for p in model.parameters():
        set_defaults_if_not_set_tensor_model_parallel_attributes(p)
    model = DistributedDataParallel(config, get_megatron_ddp_config(args), model)
    opt_config, overrides = get_megatron_optimizer_config(args)
    optimizer = get_megatron_optimizer(opt_config, [model], config_overrides=overrides)
    scheduler = get_optimizer_param_scheduler(optimizer)
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model.no_sync
    from megatron.core.distributed import finalize_model_grads

    config.finalize_model_grads_func = finalize_model_grads
    return model, optimizer, scheduler, pg


def _mean_loss(losses_reduced, dp_cp_group) -> float:
    """The iteration's mean token loss over micro-batches and data(-and-context)-parallel ranks."""
    total = torch.zeros(2)
    for report in losses_reduced:
        total += report["lm loss"].detach().float().cpu()
    torch.distributed.all_reduce(total, group=dp_cp_group)
    return float(total[0] / total[1])


def train_on_cpu(args, forward_step, datasets_provider, print_fn=print) -> list[float]:
    """Train for args.train_iters (from --load's checkpoint when there is one); returns the losses
    of the iterations run here. Saves every --save-interval, at --exit-interval and at the end."""
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.training.checkpointing import load_checkpoint, save_checkpoint
    from megatron.training.datasets.data_samplers import build_pretraining_data_loader
    from megatron.training.dist_signal_handler import DistributedSignalHandler

    from .progress import IterationLog

    model, optimizer, scheduler, pg = _setup(args)
    rank0 = torch.distributed.get_rank() == 0
    iteration, flops_so_far = 0, 0.0
    if args.load is not None:
        iteration, flops_so_far = load_checkpoint([model], optimizer, scheduler)
        if rank0 and iteration:
            print_fn(f"resumed from {args.load} at iteration {iteration}")
    args.iteration = iteration
    args.consumed_train_samples = iteration * args.global_batch_size
    train_ds, _, _ = datasets_provider([args.train_iters * args.global_batch_size, 0, 0])
    data = iter(build_pretraining_data_loader(train_ds, args.consumed_train_samples))
    step = get_forward_backward_func()
    log = IterationLog(args, torch.distributed.get_world_size(), "cpu", start_iteration=iteration)
    if rank0:
        print_fn(log.header())
    dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
    losses = []
    # --exit-signal-handler (Megatron's flag): on --exit-signal (SIGTERM) every rank finishes the
    # iteration, the checkpoint is saved, and the run exits.
    signals = DistributedSignalHandler(args.exit_signal).__enter__() if args.exit_signal_handler else None
    while iteration < args.train_iters:
        t0 = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reports = step(forward_step_func=partial(forward_step, device="cpu"), data_iterator=data,
                       model=[model], num_microbatches=get_num_microbatches(), seq_length=args.seq_length,
                       micro_batch_size=args.micro_batch_size, decoder_seq_length=args.seq_length,
                       forward_only=False)
        t_opt = time.perf_counter()
        ok, grad_norm, _ = optimizer.step()
        t_opt = time.perf_counter() - t_opt
        if ok:
            scheduler.step(increment=args.global_batch_size)
        iteration += 1
        args.iteration = iteration
        args.consumed_train_samples += args.global_batch_size
        flops_so_far += log.flops_megatron
        loss = _mean_loss(reports, dp_cp)
        losses.append(loss)
        dt = time.perf_counter() - t0
        if rank0 and (iteration % args.log_interval == 0 or iteration == args.train_iters):
            print_fn(log.line(iteration, loss, dt, scheduler.get_lr(optimizer.param_groups[0])), flush=True)
        if args.time_breakdown:
            from . import breakdown

            parts = breakdown.TIMER.collect()
            if rank0 and (iteration % args.log_interval == 0 or iteration == args.train_iters):
                print_fn(breakdown.format_breakdown(parts, t_opt, dt), flush=True)
        signalled = signals is not None and any(signals.signals_received())
        exiting = signalled or (bool(args.exit_interval) and iteration % args.exit_interval == 0)
        if args.save and (exiting or iteration == args.train_iters
                          or (args.save_interval and iteration % args.save_interval == 0)):
            t_save = time.perf_counter()
            save_checkpoint(iteration, [model], optimizer, scheduler, flops_so_far)
            if rank0:
                print_fn(f"checkpoint of iteration {iteration} written in {time.perf_counter() - t_save:.1f} s",
                         flush=True)
        if exiting:
            if rank0:
                why = f"signal {args.exit_signal.name}" if signalled else f"--exit-interval {args.exit_interval}"
                print_fn(f"exiting at iteration {iteration} ({why})")
            break
    if signals is not None:
        signals.release()
    if rank0 and losses:
        k = min(5, len(losses))
        print_fn(f"done: iterations {iteration - len(losses) + 1}-{iteration} in {time.perf_counter() - log.t_start:.0f} s; "
                 f"mean loss of the first {k} {sum(losses[:k]) / k:.3f}, of the last {k} {sum(losses[-k:]) / k:.3f}",
                 flush=True)
    return losses
