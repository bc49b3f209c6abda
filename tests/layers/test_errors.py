"""Every bad configuration raises a ValueError that names the field or argument and the values."""

import re

import pytest
import torch
import torch.nn.functional as F

from qla_megatron.layers import gdn_sizes, get_gdn_layer_spec, linear_attention_pattern

from .mcore_setup import build_ours, gdn_config, set_model_parallel


class Cfg:
    """Stand-in config: only the fields gdn_sizes reads (TransformerConfig asserts some of these
    itself, so bad values cannot reach the layer through it)."""

    def __init__(self, **kw):
        self.linear_num_key_heads, self.linear_num_value_heads = 2, 4
        self.linear_key_head_dim = self.linear_value_head_dim = 8
        self.linear_conv_kernel_dim = 4
        self.activation_func = F.silu
        self.__dict__.update(kw)


@pytest.mark.parametrize("kw, tp, cp, match", [
    pytest.param(dict(linear_num_value_heads=6, linear_num_key_heads=4), 1, 1,
                 r"linear_num_value_heads \(6\) must be a multiple of config.linear_num_key_heads \(4\)", id="hv-not-multiple"),
    pytest.param(dict(linear_num_key_heads=2, linear_num_value_heads=6), 4, 1,
                 r"linear_num_key_heads \(2\) must be divisible by the tensor-parallel size \(tp_size=4\)", id="hk-tp"),
    pytest.param(dict(), 1, 0, r"cp_size must be a positive int, got 0", id="cp0"),
    pytest.param(dict(linear_conv_kernel_dim=None), 1, 1, r"config.linear_conv_kernel_dim must be a positive int", id="no-conv"),
    pytest.param(dict(linear_key_head_dim=0), 1, 1, r"config.linear_key_head_dim must be a positive int for GatedDeltaNet, got 0", id="K0"),
    pytest.param(dict(activation_func=F.gelu), 1, 1, r"config.activation_func must be torch.nn.functional.silu.*got gelu", id="gelu"),
])
def test_bad_config(kw, tp, cp, match):
    with pytest.raises(ValueError, match=match):
        gdn_sizes(Cfg(**kw), tp_size=tp, cp_size=cp)


def test_bad_layer_arguments(single_rank):
    pg = set_model_parallel(tp=1)
    config = gdn_config()
    with pytest.raises(ValueError, match=r"pg_collection must be a ProcessGroupCollection"):
        build_ours(config, None)
    with pytest.raises(ValueError, match=r"A_init_range must satisfy 0 <= low <= high, got \(4, 2\)"):
        build_ours(config, pg, A_init_range=(4, 2))
    with pytest.raises(ValueError, match=r"config.activation_func must be torch.nn.functional.silu"):
        build_ours(gdn_config(activation_func=F.gelu), pg)


def _thd(**fields):
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(qkv_format="thd", **fields)


I32 = dict(dtype=torch.int32)
PACKED_CASES = [
    pytest.param(12, dict(cu_seqlens_q=torch.tensor([0, 5, 10], **I32)),
                 r"packed_seq_params.cu_seqlens_q must end at the token count 12 \(sequence length 12 x cp_size 1\), got 10",
                 id="short"),
    pytest.param(10, dict(cu_seqlens_q=torch.tensor([0, 7, 4, 10], **I32)),
                 r"packed_seq_params.cu_seqlens_q must be sorted, strictly increasing .*got \[0, 7, 4, 10\]",
                 id="unsorted"),
    pytest.param(10, dict(cu_seqlens_q=torch.tensor([0, 4, 4, 10], **I32)),
                 r"packed_seq_params.cu_seqlens_q must be sorted, strictly increasing", id="empty-sequence"),
    pytest.param(10, dict(cu_seqlens_q=torch.tensor([2, 5, 10], **I32)),
                 r"packed_seq_params.cu_seqlens_q must start at 0, got \[2, 5, 10\]", id="not-from-0"),
    pytest.param(10, dict(cu_seqlens_q=torch.tensor([0.0, 5.0, 10.0])),
                 r"packed_seq_params.cu_seqlens_q must be an integer tensor \(int32 or int64\), got torch.float32",
                 id="float"),
    pytest.param(10, dict(cu_seqlens_q=[0, 5, 10]),
                 r"packed_seq_params.cu_seqlens_q must be a torch.Tensor, got list", id="list"),
    pytest.param(10, dict(cu_seqlens_q=torch.tensor([[0, 10]], **I32)),
                 r"packed_seq_params.cu_seqlens_q must be 1-D \[N \+ 1\] with N >= 1 sequences, got shape \(1, 2\)",
                 id="2d"),
    pytest.param(10, dict(cu_seqlens_q=None), r"packed_seq_params.cu_seqlens_q is None", id="none"),
    pytest.param(10, dict(cu_seqlens_q=torch.tensor([0, 5, 10], **I32), cu_seqlens_kv=torch.tensor([0, 4, 10], **I32)),
                 r"cu_seqlens_q \(\[0, 5, 10\]\) must equal cu_seqlens_kv \(\[0, 4, 10\]\)", id="q-kv"),
    pytest.param(10, dict(cu_seqlens_q=torch.tensor([0, 5, 10], **I32), cu_seqlens_kv=torch.tensor([0, 10], **I32)),
                 r"cu_seqlens_q \(shape \(3,\)\) must equal cu_seqlens_kv \(shape \(2,\)\)", id="q-kv-shape"),
    pytest.param(10, dict(cu_seqlens_q=torch.tensor([0, 5, 10], **I32), cu_seqlens_kv=torch.tensor([0, 5, 10], **I32),
                          cu_seqlens_q_padded=torch.tensor([0, 6, 12], **I32)),
                 r"packed_seq_params.cu_seqlens_q_padded must end at the token count 10", id="padded"),
    pytest.param(10, dict(cu_seqlens_q=torch.tensor([0, 5, 10], **I32), cu_seqlens_kv=torch.tensor([0, 5, 10.0])),
                 r"packed_seq_params.cu_seqlens_kv must be an integer tensor", id="kv-float"),
]


@pytest.mark.parametrize("tokens, fields, match", PACKED_CASES)
def test_bad_packed_sequences(single_rank, tokens, fields, match):
    """Bad packed_seq_params raise ValueError naming the field, before the conv sees them (it used to
    fail with "repeats can not be negative"). Offsets on the CPU are checked with the default options."""
    layer = build_ours(gdn_config(), set_model_parallel(tp=1))
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(tokens, 1, 32), None, packed_seq_params=_thd(**fields))


def test_packed_sequences_accepted(single_rank):
    """int32 or int64 offsets, equal kv offsets, padded offsets: the same output as int64 cu_seqlens."""
    layer = build_ours(gdn_config(), set_model_parallel(tp=1))
    x = torch.randn(10, 1, 32)
    ref, _ = layer(x, None, packed_seq_params=_thd(cu_seqlens_q=torch.tensor([0, 3, 10])))
    for fields in (dict(cu_seqlens_q=torch.tensor([0, 3, 10], **I32), cu_seqlens_kv=torch.tensor([0, 3, 10], **I32)),
                   dict(cu_seqlens_q=torch.tensor([0, 2, 10], **I32), cu_seqlens_q_padded=torch.tensor([0, 3, 10], **I32))):
        out, _ = layer(x, None, packed_seq_params=_thd(**fields))
        assert torch.equal(out, ref)
    with pytest.raises(ValueError, match=r"need batch size 1.*batch=2"):
        layer(torch.randn(10, 2, 32), None, packed_seq_params=_thd(cu_seqlens_q=torch.tensor([0, 5, 10], **I32)))


@pytest.mark.parametrize("shape", [(12, 1, 31), (12, 32), (12, 1, 1, 32)], ids=["h31", "2d", "4d"])
def test_bad_hidden_states(single_rank, shape):
    layer = build_ours(gdn_config(hidden=32), set_model_parallel(tp=1))
    with pytest.raises(ValueError, match=r"hidden_states must be \[s, b, hidden_size\] with hidden_size=32 "
                                         r"\(config.hidden_size\), got shape " + re.escape(str(shape))):
        layer(torch.randn(*shape), None)


def test_bad_spec_arguments():
    with pytest.raises(ValueError, match=r"backend must be one of \('transformer_engine', 'local'\) or None, got 'te'"):
        get_gdn_layer_spec(backend="te")
    with pytest.raises(ValueError, match=r"normalization must be 'RMSNorm' or 'LayerNorm', got 'L2Norm'"):
        get_gdn_layer_spec(backend="local", normalization="L2Norm")
    with pytest.raises(ValueError, match=r"linear_attention_freq must be >= 1, got 0"):
        linear_attention_pattern(4, 0)
    with pytest.raises(ValueError, match=r"num_layers=4 entries of 0 or 1, got \[1, 0\]"):
        linear_attention_pattern(4, [1, 0])
    with pytest.raises(ValueError, match=r"linear_attention_freq must be a positive int or a list"):
        linear_attention_pattern(4, None)
