"""Causal core attention through torch's scaled_dot_product_attention, for megatron-core's local
layer spec (no Transformer Engine, as on our GPU host).

Megatron's local DotProductAttention writes the whole score matrix ([b, heads, s, s]: at 32k tokens
and 16 heads 32 GiB a layer in bf16) and runs an unfused softmax; SDPA takes the flash /
memory-efficient kernels on the GPU and never forms it. Same contract as DotProductAttention
(query/key/value [s, b, heads, d] in, context [s, b, heads * d] out), causal only, no context
parallelism (Megatron's local attention has none either; with CP > 1 use Transformer Engine's).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPACoreAttention(MegatronModule):
    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPACoreAttention is causal only, got attn_mask_type={attn_mask_type}")
        if config.context_parallel_size != 1:
            raise ValueError(f"SDPACoreAttention has no context parallelism (context_parallel_size="
                             f"{config.context_parallel_size}): use Transformer Engine's attention")
        tp = pg_collection.tp.size() if pg_collection is not None else 1
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPACoreAttention takes no attention_mask, attention_bias or packed_seq_params "
                             "(causal over the whole sequence)")
        s, b = query.shape[0], query.shape[1]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                             dropout_p=self.dropout if self.training else 0.0,
                                             enable_gqa=self.heads != self.groups)
        return out.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.head_dim)
