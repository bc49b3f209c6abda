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


def _cp_rank(rank, world_size, heads, groups, seq, seed):
    from qla_megatron.training.compat import enable_megatron_training_on_cpu

    enable_megatron_training_on_cpu()
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType

    from qla_megatron.training.attention import SDPACoreAttention
    from tests.layers.mcore_setup import gdn_config

    parallel_state.initialize_model_parallel(context_parallel_size=world_size)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    kw = dict(num_attention_heads=heads, num_query_groups=groups, kv_channels=16)
    full = SDPACoreAttention(gdn_config(**kw), 1, AttnMaskType.causal, "self", pg_collection=pg)
    full.cp_group = None  # the single-GPU reference on the whole sequence
    sharded = SDPACoreAttention(gdn_config(context_parallel_size=world_size, **kw), 1, AttnMaskType.causal,
                                "self", pg_collection=pg)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(seq, 2, n, 16, generator=gen, dtype=torch.float64) for n in (heads, groups, groups))
    dout = torch.randn(seq, 2, heads * 16, generator=gen, dtype=torch.float64)

    def zigzag(x):  # this rank's chunks r and 2 cp - 1 - r, as Megatron's get_batch_on_this_cp_rank
        c = x.chunk(2 * world_size)
        return torch.cat([c[rank], c[2 * world_size - 1 - rank]])

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = full(*leaves, None)
    out.backward(dout)
    local = [zigzag(t).clone().requires_grad_() for t in (q, k, v)]
    out_cp = sharded(*local, None)
    out_cp.backward(zigzag(dout))
    torch.testing.assert_close(out_cp, zigzag(out), rtol=1e-10, atol=1e-10)
    for g, ref in zip((t.grad for t in local), (zigzag(t.grad) for t in leaves)):
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-10)
    parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("heads,groups,seq", [pytest.param(4, 2, 36, id="GQA-T36")])
def test_sdpa_context_parallel_matches_whole_sequence(heads, groups, seq, fresh_seed):
    from tests.layers.spawn import run_on_ranks

    run_on_ranks(2, _cp_rank, heads, groups, seq, fresh_seed)
