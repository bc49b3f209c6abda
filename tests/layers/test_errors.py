"""Every bad configuration raises a ValueError that names the field or argument and the values."""

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


def test_bad_packed_sequences(single_rank):
    from megatron.core.packed_seq_params import PackedSeqParams

    layer = build_ours(gdn_config(), set_model_parallel(tp=1))
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\]=10 must equal the number of tokens.*12"):
        layer(torch.randn(12, 1, 32), None, packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu))
    with pytest.raises(ValueError, match=r"need batch size 1.*batch=2"):
        layer(torch.randn(10, 2, 32), None, packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu))
    other = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cu_seqlens_q \(\[0, 5, 10\]\) must equal cu_seqlens_kv \(\[0, 4, 10\]\)"):
        layer(torch.randn(10, 1, 32), None,
              packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=other))


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
