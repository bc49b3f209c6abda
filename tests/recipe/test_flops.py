"""Both FLOP counts of qla_megatron.training.flops against a brute-force count: torch's
FlopCounterMode on the tiny hybrid's forward (every matmul, bmm, conv and triangular solve that
actually runs, module by module), on awkward sizes (T not a multiple of the chunk, batch 2)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from qla_megatron.training.flops import CHUNK, TRAINING_FACTOR, kernel_flops, kernel_flops_breakdown, megatron_flops
from qla_megatron.training.sizes import linear_pattern

from .conftest import build_tiny_model, recipe_args


def _solve_triangular_flops(a_shape, b_shape, *rest, unitriangular=False, **kw):
    """Substitution with an n x n triangular matrix for m right-hand sides: a multiply-add per
    strictly-lower entry and column (the unit diagonal costs nothing), n (n - 1) m FLOPs."""
    assert unitriangular, "the chunked rule solves with a unit lower-triangular matrix"
    n, m = b_shape[-2], b_shape[-1]
    return math.prod(b_shape[:-2]) * n * (n - 1) * m


def _counted(model, batch, seq):
    tokens = torch.randint(0, 257, (batch, seq))
    pos = torch.arange(seq).expand(batch, seq)
    mapping = {torch.ops.aten.linalg_solve_triangular: _solve_triangular_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(tokens, pos, None, labels=tokens)
    return {name: {str(op): c for op, c in ops.items()} for name, ops in counter.get_flop_counts().items()}


@pytest.mark.parametrize("seq,batch", [pytest.param(200, 2, id="T200-B2"), pytest.param(128, 1, id="T128-B1")])
def test_flop_counts_match_brute_force(seq, batch):
    # Megatron's local core attention: its matmuls are explicit (baddbmm, bmm), where SDPA's CPU
    # kernel is one op that FlopCounterMode does not count (test_attention.py: same outputs).
    args = recipe_args("--seq-length", str(seq), "--max-position-embeddings", str(seq),
                       "--micro-batch-size", str(batch), "--global-batch-size", str(batch),
                       "--core-attention", "megatron")
    model = build_tiny_model(args)
    counts = _counted(model, batch, seq)
    mm = lambda name: counts.get(f"GPTModel.{name}", {}).get("aten.mm", 0)  # noqa: E731
    brute = dict.fromkeys(["gdn_projections", "gdn_conv", "gdn_rule", "attention_projections",
                           "attention_full_square", "mlp"], 0)
    for i, is_gdn in enumerate(linear_pattern(args)):
        layer = f"decoder.layers.{i}"
        sa = counts[f"GPTModel.{layer}.self_attention"]
        brute["mlp"] += mm(f"{layer}.mlp")
        if is_gdn:
            brute["gdn_projections"] += mm(f"{layer}.self_attention.in_proj") + mm(f"{layer}.self_attention.out_proj")
            brute["gdn_conv"] += sa["aten.convolution"]
            brute["gdn_rule"] += sa["aten.bmm"] + sa["aten.linalg_solve_triangular"]
            assert sa["aten.mm"] == mm(f"{layer}.self_attention.in_proj") + mm(f"{layer}.self_attention.out_proj")
        else:
            core = counts[f"GPTModel.{layer}.self_attention.core_attention"]
            brute["attention_projections"] += (mm(f"{layer}.self_attention.linear_qkv")
                                               + mm(f"{layer}.self_attention.linear_proj"))
            brute["attention_full_square"] += core["aten.baddbmm"] + core["aten.bmm"]
    brute["logits"] = mm("output_layer")
    total = sum(counts["Global"].values())
    assert total == sum(brute.values()), "every counted FLOP belongs to one of the parts"

    ours = kernel_flops_breakdown(args, batch)
    for part in ("gdn_projections", "gdn_rule", "attention_projections", "mlp", "logits"):
        assert ours[part] == brute[part], part
    # The torch conv computes kernel - 1 padded outputs per sequence more than the tokens.
    k = args.linear_conv_kernel_dim
    assert ours["gdn_conv"] * (seq + k - 1) == brute["gdn_conv"] * seq
    # Megatron's local attention computes the whole s x s square; the causal part is s (s + 1) / 2.
    assert ours["attention_core"] * 2 * seq == brute["attention_full_square"] * (seq + 1)
    assert kernel_flops(args, batch) == TRAINING_FACTOR * sum(ours.values())

    # Megatron's formula: the same projections, conv, MLP and logits, the causal half of the
    # square, and its own rule term 4 HV V^2 (x2 multiply-add) per token of each GDN layer.
    n_gdn = sum(linear_pattern(args))
    rule = n_gdn * 2 * 4 * args.linear_num_value_heads * args.linear_value_head_dim ** 2 * batch * seq
    expected = TRAINING_FACTOR * (brute["gdn_projections"] + ours["gdn_conv"] + rule + brute["attention_projections"]
                                  + brute["attention_full_square"] / 2 + brute["mlp"] + brute["logits"])
    assert megatron_flops(args, batch) == pytest.approx(expected, rel=1e-12)


def test_rule_count_is_per_chunk():
    # One token more than a chunk costs a whole chunk more (the kernel computes full tiles).
    from qla_megatron.training.flops import gdn_rule_flops

    one = gdn_rule_flops(CHUNK, 2, 4, 32, 32)
    assert gdn_rule_flops(CHUNK + 1, 2, 4, 32, 32) == 2 * one
    assert gdn_rule_flops(1, 2, 4, 32, 32) == one
