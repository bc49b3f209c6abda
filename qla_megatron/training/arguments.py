"""The recipe's command line: Megatron's own parser plus our arguments, config files, and the checks
that refuse a bad run before any work (DESIGN: name the argument and the limit).

A config file (`--config examples/configs/qwen35_4b.args`) holds Megatron flags, one or more a line,
`#` starts a comment. Its flags go before the command line's, so a flag given on the command line
wins (argparse keeps the last value).
"""

from __future__ import annotations

import argparse
import os
import shlex
from typing import Optional, Sequence

GDN_IMPLS = ("qla", "megatron")
OP_BACKENDS = ("auto", "torch", "tilelang", "fla")
SPEC_BACKENDS = ("auto", "local", "transformer_engine")
H100_BF16_DENSE_TFLOPS = 989.0   # NVIDIA's H100 / H200 SXM dense bf16 tensor-core peak
CHUNK = 64                        # the chunk of our GDN kernels (and of the torch backend)


def read_config_file(path: str) -> list[str]:
    """The flags of a config file, in order (comments and blank lines dropped)."""
    if not os.path.isfile(path):
        raise ValueError(f"--config {path!r}: no such file")
    flags = []
    with open(path) as f:
        for line in f:
            flags.extend(shlex.split(line, comments=True))
    return flags


def expand_config(argv: Sequence[str]) -> list[str]:
    """argv with every `--config FILE` replaced by the file's flags, placed first."""
    argv, head, rest, i = list(argv), [], [], 0
    while i < len(argv):
        if argv[i] == "--config" or argv[i].startswith("--config="):
            if argv[i] == "--config":
                if i + 1 >= len(argv):
                    raise ValueError("--config needs a file name")
                path, i = argv[i + 1], i + 2
            else:
                path, i = argv[i].split("=", 1)[1], i + 1
            head.extend(read_config_file(path))
        else:
            rest.append(argv[i])
            i += 1
    return head + rest


def add_recipe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Our arguments, next to Megatron's (Megatron's `extra_args_provider`)."""
    g = parser.add_argument_group("qla_megatron recipe")
    g.add_argument("--config", default=None, help="file of Megatron flags (examples/configs/*.args); "
                   "flags on the command line override it")
    g.add_argument("--gdn-impl", choices=GDN_IMPLS, default="qla",
                   help="GDN layer: qla (ours) or megatron (megatron-core's GatedDeltaNet, FLA kernels)")
    g.add_argument("--gdn-backend", choices=OP_BACKENDS, default="auto",
                   help="backend of our chunk_gated_delta_rule (--gdn-impl qla)")
    g.add_argument("--spec-backend", choices=SPEC_BACKENDS, default="auto",
                   help="module backend of the layer specs: auto = Transformer Engine when it imports")
    g.add_argument("--core-attention", choices=("auto", "sdpa", "megatron"), default="auto",
                   help="core attention of the attention layers: sdpa (torch's flash / memory-efficient "
                        "kernels), megatron (the spec's own: TE's, or the local one that forms the s x s "
                        "scores); auto = sdpa on local modules, TE's with Transformer Engine")
    g.add_argument("--intra-cp", choices=("on", "off"), default="on",
                   help="intra-card context parallelism of the Hopper kernels")
    g.add_argument("--intra-cp-segment", type=int, default=None,
                   help="force the intra-card segment length in tokens (default: planned per call)")
    g.add_argument("--intra-cp-mode", choices=("gate", "exact"), default="gate",
                   help="intra-card summaries: gate-driven (default) or exact (DESIGN section 2)")
    g.add_argument("--gdn-check-finite", action="store_true",
                   help="debug: scan every GDN op input for NaN/Inf (a host sync per call)")
    g.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                   help="peak TFLOP/s per GPU that MFU is measured against "
                        "(default 989: H100/H200 SXM dense bf16)")
    g.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="memory per GPU for the fit check (default: the device's; on CPU no check)")
    g.add_argument("--time-breakdown", action="store_true",
                   help="log where each iteration's time goes: GDN op, rest of the GDN layers, attention, "
                        "MLP, optimizer, other (qla_megatron/training/breakdown.py; slightly slower)")
    g.add_argument("--cpu-loop", action="store_true",
                   help="use the recipe's own loop (the CPU default) instead of megatron.training's "
                        "pretrain; implied on a machine without CUDA")
    # one_logger is NVIDIA-internal (not on PyPI): without this Megatron asks every run to install it.
    parser.set_defaults(enable_one_logger=False)
    return parser


def gdn_options(args):
    """The op options of our GDN layers (qla_megatron.ops.GDNOptions) from --intra-cp,
    --intra-cp-segment, --intra-cp-mode and --gdn-check-finite; ValueError names the flag."""
    from qla_megatron.ops import GDNOptions
    from qla_megatron.ops.gated_delta_rule.intra_cp import IntraCPConfig

    try:
        intra_cp = IntraCPConfig(enabled=args.intra_cp == "on", segment_len=args.intra_cp_segment,
                                 mode=args.intra_cp_mode)
    except ValueError as e:
        raise ValueError(f"--intra-cp-segment / --intra-cp-mode: {e}") from None
    return GDNOptions(intra_cp=intra_cp, check_finite=args.gdn_check_finite)


def check_recipe_args(args, gpu_memory_gib: Optional[float] = None) -> None:
    """Refuse, with the argument and the limit named, what would fail (or mislead) later.

    `args` is Megatron's parsed namespace (ours included); `gpu_memory_gib` the memory of one
    device when --gpu-memory-gib is not given (None: no fit check)."""
    from .sizes import memory_lower_bound

    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    gdn_options(args)  # the intra-CP flags
    if args.experimental_attention_variant != "gated_delta_net":
        raise ValueError(f"--experimental-attention-variant must be gated_delta_net for this recipe, "
                         f"got {args.experimental_attention_variant!r}")
    if args.linear_attention_freq is None:
        raise ValueError("--linear-attention-freq is required (4: three GDN layers, then attention)")
    heads = [("--num-attention-heads", args.num_attention_heads),
             ("--linear-num-key-heads", args.linear_num_key_heads),
             ("--linear-num-value-heads", args.linear_num_value_heads)]
    if args.group_query_attention:
        heads.append(("--num-query-groups", args.num_query_groups))
    for flag, n in heads:
        if n is None or n % tp != 0:
            raise ValueError(f"{flag} ({n}) must be divisible by --tensor-model-parallel-size ({tp}): "
                             f"tensor-parallel ranks own whole heads")
    if args.linear_num_value_heads % args.linear_num_key_heads != 0:
        raise ValueError(f"--linear-num-value-heads ({args.linear_num_value_heads}) must be a multiple of "
                         f"--linear-num-key-heads ({args.linear_num_key_heads})")
    if cp > 1:
        # Megatron's batch split (get_batch_on_this_cp_rank) gives each CP rank two of 2 CP chunks
        # (zigzag); the GDN layers and the SDPA attention take that layout.
        if args.seq_length % (2 * cp) != 0:
            raise ValueError(f"--seq-length ({args.seq_length}) must be divisible by {2 * cp} "
                             f"(= 2 x --context-parallel-size {cp}: two zigzag chunks per CP rank)")
        from .model import uses_sdpa

        if not uses_sdpa(args) and not _have_te():
            raise ValueError(f"--context-parallel-size {cp} with --core-attention megatron needs Transformer "
                             f"Engine's attention (megatron-core's local attention has no context "
                             f"parallelism), and transformer_engine does not import: use --core-attention sdpa")
    if args.gdn_impl == "megatron" and not _have_fla():
        raise ValueError("--gdn-impl megatron needs fla-core (megatron-core's GatedDeltaNet runs FLA's "
                         "kernels), and fla does not import here")
    if args.spec_backend == "transformer_engine" and not _have_te():
        raise ValueError("--spec-backend transformer_engine: transformer_engine does not import here "
                         "(use --spec-backend local or auto)")
    if args.sequence_parallel and tp > 1 and (args.seq_length // cp) % tp != 0:
        raise ValueError(f"--sequence-parallel splits each rank's {args.seq_length // cp} tokens over "
                         f"--tensor-model-parallel-size ({tp}): --seq-length / CP must be divisible by TP")
    if not args.mock_data:
        paths = args.data_path or []
        if not paths:
            raise ValueError("--data-path is required (or --mock-data): the prefix of an indexed "
                             "dataset, e.g. build/recipe/corpus_text_document (make run builds one)")
        for prefix in paths:
            if _is_number(prefix):  # blend weights sit between the prefixes
                continue
            missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
            if missing:
                raise ValueError(f"--data-path {prefix!r}: missing {', '.join(missing)} "
                                 f"(build one with examples/build_corpus.py)")
    if args.save is not None and not args.save_interval:
        raise ValueError(f"--save ({args.save}) needs --save-interval (iterations between checkpoints)")
    decay = args.lr_decay_iters or args.train_iters
    if args.train_iters is not None and args.lr_warmup_iters and args.lr_warmup_iters >= decay:
        raise ValueError(f"--lr-warmup-iters ({args.lr_warmup_iters}) must be below --lr-decay-iters "
                         f"(or --train-iters when unset: {decay})")
    limit = args.gpu_memory_gib if args.gpu_memory_gib is not None else gpu_memory_gib
    if limit is not None:
        bound = memory_lower_bound(args)
        if bound.total_gib > limit:
            raise ValueError(f"this config needs at least {bound.total_gib:.1f} GiB per GPU ({bound}), "
                             f"more than --gpu-memory-gib {limit:g}: raise --tensor-model-parallel-size "
                             f"(now {tp}), --context-parallel-size (now {cp}) or lower --micro-batch-size")


def _have_te() -> bool:
    from qla_megatron.layers.specs import have_transformer_engine

    return have_transformer_engine()


def _have_fla() -> bool:
    try:
        import fla  # noqa: F401
    except ImportError:
        return False
    return True


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
