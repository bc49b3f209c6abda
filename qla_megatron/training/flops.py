"""FLOPs of one training iteration (one global batch), counted two ways.

1. `megatron_flops`: megatron-core 0.19's own formula, `megatron.training.training.
   num_floating_point_operations` (called, not re-typed), so that our TFLOP/s compare with published
   Megatron figures. For a GPT with `experimental_attention_variant="gated_delta_net"` it counts, per
   token and x3 (forward, backward data, backward weights) x2 (multiply-add):
     GDN layer:  h (2 qk_dim + 2 v_dim + 2 HV)  in_proj
               + conv_k (2 qk_dim + v_dim)       short conv
               + 4 HV V^2                        the rule ("KK^T, VK^T, S(a(I-bKK^T)), SQ")
               + h v_dim                         out_proj
     attention:  h (q + gate + k + v widths) + q_width h   projections, plus the causal core
                 s/2 x 2 (QK^T and PV) x q_width per token (the causal half of the square)
     MLP:        h ffn (3 with SwiGLU, else 2);   logits: h vocab_padded
2. `kernel_flops`: the work our chunked kernels do, at chunk C = 64, x3 for training (the same
   convention as Megatron's; the backward recomputes more, that is not counted). Per sequence of
   s tokens, NC = ceil(s / C) chunks (a partial chunk is computed as a full one):
     GDN rule, per chunk and qk-head:  K K^T and Q K^T              2 x 2 C^2 K
               per chunk and v-head:   (I + StrictLower(diag(beta) K K^T))^-1 by substitution
                                       against the identity          C^2 (C - 1)
                                       K S, Q S (state reads)        2 x 2 C K V
                                       (Gamma.A) X, (Gamma.Q K^T) Vd 2 x 2 C^2 V
                                       K^T Vd (state update)         2 C K V
     projections, conv, MLP and logits as in 1 (they are the same matmuls);
     causal attention: the unmasked pairs, s (s + 1) / 2 per sequence and head, x 2 (QK^T, PV)
     x 2 d (multiply-add over the head dim).
   Element-wise work (norms, gates, exp, softmax, SiLU) is left out of both counts.

tests/recipe/test_flops.py checks both against torch's FlopCounterMode on a tiny model (the
matmuls actually executed, module by module).
"""

from __future__ import annotations

import math

from .sizes import _attention_dims, linear_pattern

CHUNK = 64
TRAINING_FACTOR = 3  # forward + backward (data) + backward (weights)


def megatron_flops(args, batch_size: int) -> float:
    """megatron.training's formula for one iteration of `batch_size` sequences of args.seq_length."""
    from megatron.training.training import num_floating_point_operations

    return float(num_floating_point_operations(args, batch_size))


def gdn_rule_flops(seq_len: int, qk_heads: int, v_heads: int, K: int, V: int, C: int = CHUNK) -> float:
    """Forward FLOPs of the chunked gated delta rule on one sequence (all heads)."""
    nc = math.ceil(seq_len / C)
    per_qk_head = 2 * 2 * C * C * K
    per_v_head = C * C * (C - 1) + 2 * 2 * C * K * V + 2 * 2 * C * C * V + 2 * C * K * V
    return nc * (qk_heads * per_qk_head + v_heads * per_v_head)


def causal_attention_flops(seq_len: int, heads: int, head_dim: int) -> float:
    """Forward FLOPs of QK^T and PV over the unmasked (causal) pairs of one sequence."""
    return 2 * 2 * head_dim * heads * seq_len * (seq_len + 1) / 2


def kernel_flops_breakdown(args, batch_size: int) -> dict[str, float]:
    """Forward FLOPs of one iteration by part (multiply by TRAINING_FACTOR for training)."""
    h, s = args.hidden_size, args.seq_length
    tokens = batch_size * s
    qk = args.linear_num_key_heads * args.linear_key_head_dim
    v = args.linear_num_value_heads * args.linear_value_head_dim
    hv = args.linear_num_value_heads
    d, nq, ng = _attention_dims(args)
    q_width = nq * d * (2 if getattr(args, "attention_output_gate", False) else 1)
    pattern = linear_pattern(args)
    n_gdn, n_attn = sum(pattern), len(pattern) - sum(pattern)
    ffn_mult = 3 if args.swiglu else 2
    return {
        "gdn_projections": n_gdn * 2 * tokens * (h * (2 * qk + 2 * v + 2 * hv) + v * h),
        "gdn_conv": n_gdn * 2 * tokens * args.linear_conv_kernel_dim * (2 * qk + v),
        "gdn_rule": n_gdn * batch_size * gdn_rule_flops(s, args.linear_num_key_heads, hv,
                                                        args.linear_key_head_dim, args.linear_value_head_dim),
        "attention_projections": n_attn * 2 * tokens * (h * (q_width + 2 * ng * d) + nq * d * h),
        "attention_core": n_attn * batch_size * causal_attention_flops(s, nq, d),
        "mlp": len(pattern) * 2 * tokens * h * args.ffn_hidden_size * ffn_mult,
        "logits": 2 * tokens * h * args.padded_vocab_size,
    }


def kernel_flops(args, batch_size: int) -> float:
    """Our count for one training iteration of `batch_size` sequences."""
    return TRAINING_FACTOR * sum(kernel_flops_breakdown(args, batch_size).values())
