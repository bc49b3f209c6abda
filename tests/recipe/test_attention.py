"""SDPACoreAttention against megatron-core's local DotProductAttention: same context for the same
query / key / value (grouped heads, TP = 1), outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from .conftest import recipe_args


@pytest.mark.parametrize("heads,groups,seq", [pytest.param(4, 2, 67, id="GQA-T67"), pytest.param(4, 4, 64, id="MHA-T64")])
def test_sdpa_matches_megatron_local_attention(heads, groups, seq):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.training.arguments import core_transformer_config_from_args

    from qla_megatron.training.attention import SDPACoreAttention
    from tests.layers.mcore_setup import init_single_process

    init_single_process()
    args = recipe_args("--num-attention-heads", str(heads), "--num-query-groups", str(groups))
    config = core_transformer_config_from_args(args)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    ref = DotProductAttention(config, 1, AttnMaskType.causal, "self", pg_collection=pg)
    ours = SDPACoreAttention(config, 1, AttnMaskType.causal, "self", pg_collection=pg)
    b, d = 2, args.kv_channels
    q = torch.randn(seq, b, heads, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(seq, b, groups, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(seq, b, groups, d, dtype=torch.float64, requires_grad=True)
    out_ref = ref(q, k, v, None, attn_mask_type=AttnMaskType.causal)
    grads_ref = torch.autograd.grad(out_ref, (q, k, v), torch.ones_like(out_ref))
    out = ours(q, k, v, None)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert out.shape == out_ref.shape == (seq, b, heads * d)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)
