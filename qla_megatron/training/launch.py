"""The recipe's main(): command line -> checks -> megatron.training's pretrain (GPU) or the CPU loop."""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import torch

from .arguments import add_recipe_args, check_recipe_args, expand_config
from .quiet import quiet_known_warnings
from .sizes import padded_vocab_size


def _quiet_megatron(args_file: Optional[str]) -> None:
    """Megatron prints its ~600 arguments at start-up: they go to `args_file` instead (or nowhere),
    and known harmless warnings are kept off the terminal."""
    import megatron.training.arguments as margs

    def write_args(title, args):
        if args_file is None or args.rank != 0:
            return
        os.makedirs(os.path.dirname(args_file), exist_ok=True)
        with open(args_file, "w") as f:
            for name in sorted(vars(args)):
                f.write(f"{name} = {getattr(args, name)!r}\n")

    margs._print_args = write_args


def parse_recipe_args(argv: Sequence[str], gpu_memory_gib: Optional[float] = None, set_globals: bool = True):
    """Megatron's parse + our checks + Megatron's validation and (set_globals) its global state
    (args, tokenizer, timers: once per process); returns the namespace. Raises ValueError (ours)
    before Megatron builds anything. Without set_globals, padded_vocab_size is computed here."""
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_global_variables

    old_argv = sys.argv
    sys.argv = [old_argv[0] if old_argv else "pretrain_gdn.py", *expand_config(argv)]
    try:
        args = parse_args(extra_args_provider=add_recipe_args)
    finally:
        sys.argv = old_argv
    check_recipe_args(args, gpu_memory_gib)
    if args.time_breakdown:  # the optimizer's time comes from Megatron's level-1 timers
        args.timing_log_level = max(args.timing_log_level, 1)
    _quiet_megatron(os.path.join(args.save, "arguments.txt") if args.save else None)
    validate_args(args, {})
    if set_globals:
        set_global_variables(args)
    else:
        args.padded_vocab_size = padded_vocab_size(args)
    return args


def main(argv: Sequence[str]) -> int:
    quiet_known_warnings()
    cuda = torch.cuda.is_available()
    if not cuda:
        from .compat import enable_megatron_training_on_cpu

        enable_megatron_training_on_cpu()
    memory = None
    if cuda:
        memory = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory / 2 ** 30
    try:
        args = parse_recipe_args(argv, gpu_memory_gib=memory)
    except ValueError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"pretrain_gdn: error: {e}", file=sys.stderr)
        return 2
    from .data import forward_step, train_valid_test_datasets_provider

    if cuda and not args.cpu_loop:
        from .megatron_loop import train_with_megatron

        train_with_megatron(args, forward_step, train_valid_test_datasets_provider)
    else:
        from .cpu_loop import train_on_cpu

        train_on_cpu(args, forward_step, train_valid_test_datasets_provider)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0
