"""Parameter counts of the hybrid GPT we build, and a lower bound on the memory one GPU needs.

Counts follow the modules of `qla_megatron.layers.get_hybrid_block_spec` with megatron-core's local
modules (tests/recipe/test_sizes.py checks them against a built model): per GDN layer the input
norm, in_proj, conv1d (no bias), A_log, dt_bias, out_norm (one weight per value-head channel),
out_proj; per attention layer the input norm, linear_qkv (with the output gate when
--attention-output-gate), q/k norms (--qk-layernorm), linear_proj; every layer a pre-MLP norm and
the MLP; the embedding, the final norm and (untied) the output layer. No biases (--disable-bias-linear).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2 ** 30


def padded_vocab_size(args) -> int:
    """args.padded_vocab_size when the tokenizer set it, else --vocab-size padded as Megatron pads
    it: up to a multiple of --make-vocab-size-divisible-by x TP (0 when neither is known)."""
    if getattr(args, "padded_vocab_size", None):
        return args.padded_vocab_size
    if not args.vocab_size:
        return 0
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return -(-args.vocab_size // multiple) * multiple


def linear_pattern(args) -> list[int]:
    """1 for a GDN layer, 0 for attention (as qla_megatron.layers.linear_attention_pattern)."""
    from qla_megatron.layers import linear_attention_pattern

    return linear_attention_pattern(args.num_layers, args.linear_attention_freq)


def _attention_dims(args):
    d = args.kv_channels or args.hidden_size // args.num_attention_heads
    groups = args.num_query_groups if args.group_query_attention else args.num_attention_heads
    return d, args.num_attention_heads, groups


def parameter_counts(args) -> dict[str, int]:
    """Parameters of the whole model (all TP ranks together), by part."""
    h, tp_vocab = args.hidden_size, padded_vocab_size(args)
    ffn = args.ffn_hidden_size
    mlp = h * ffn * (2 if args.swiglu else 1) + ffn * h + h  # fc1, fc2, pre-MLP norm
    qk, v = args.linear_num_key_heads * args.linear_key_head_dim, args.linear_num_value_heads * args.linear_value_head_dim
    hv = args.linear_num_value_heads
    gdn = (h + h * (2 * qk + 2 * v + 2 * hv) + args.linear_conv_kernel_dim * (2 * qk + v)
           + 2 * hv + args.linear_value_head_dim + v * h)
    d, nq, ng = _attention_dims(args)
    q_width = nq * d * (2 if getattr(args, "attention_output_gate", False) else 1)
    attn = h + h * (q_width + 2 * ng * d) + (2 * d if args.qk_layernorm else 0) + nq * d * h
    pattern = linear_pattern(args)
    n_gdn = sum(pattern)
    counts = {"embedding": tp_vocab * h, "gdn_layers": n_gdn * gdn,
              "attention_layers": (len(pattern) - n_gdn) * attn, "mlp": len(pattern) * mlp,
              "final_norm": h, "output_layer": 0 if not args.untie_embeddings_and_output_weights else tp_vocab * h}
    return counts


@dataclass(frozen=True)
class MemoryBound:
    """Bytes one GPU holds at least: weights, gradients, optimizer state, one logits tensor."""

    weights: float
    grads: float
    optimizer: float
    logits: float

    @property
    def total_gib(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.logits) / GIB

    def __str__(self):
        return (f"weights {self.weights / GIB:.1f} + grads {self.grads / GIB:.1f} + optimizer "
                f"{self.optimizer / GIB:.1f} + logits {self.logits / GIB:.1f} GiB, before activations")


def memory_lower_bound(args) -> MemoryBound:
    """A lower bound (activations other than one logits tensor left out), so a config refused by it
    cannot fit; one that passes may still not fit."""
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    world = max(getattr(args, "world_size", 1), tp * pp * cp)
    dp = max(world // (tp * pp * cp), 1)
    params = sum(parameter_counts(args).values()) / (tp * pp)
    half = args.bf16 or args.fp16
    w_bytes = 2 if half else 4
    g_bytes = 4 if (not half or args.accumulate_allreduce_grads_in_fp32) else 2
    # Adam: exp_avg and exp_avg_sq, plus an fp32 main copy of half-precision weights.
    o_bytes = 8 + (4 if half else 0)
    if args.use_distributed_optimizer:
        o_bytes /= dp
    logits = args.micro_batch_size * (args.seq_length // cp) * (padded_vocab_size(args) // tp) * w_bytes
    return MemoryBound(weights=params * w_bytes, grads=params * g_bytes, optimizer=params * o_bytes,
                       logits=logits)
