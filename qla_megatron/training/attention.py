"""Causal core attention through torch's scaled_dot_product_attention, for megatron-core's local
layer spec (no Transformer Engine, as on our GPU host), with context parallelism.

Megatron's local DotProductAttention writes the whole score matrix ([b, heads, s, s]: at 32k tokens
and 16 heads 32 GiB a layer in bf16), runs an unfused softmax and refuses context parallelism;
SDPA takes the flash / memory-efficient kernels on the GPU and never forms it. Same contract as
DotProductAttention: query/key/value [s, b, heads, d] in, context [s, b, heads * d] out; causal.

Context parallelism (CP ranks hold Megatron's zigzag shard: rank r the chunks r and 2 cp - 1 - r
of 2 cp): keys and values are all-gathered (`_AllGather`, differentiable), put in global order,
and each local query chunk j attends to the keys of chunks 0..j with the causal mask aligned to
its last row (`causal_lower_right`). This moves the K/V of the whole sequence to every CP rank
(ring attention would not); at 256k tokens and 4 KV heads of 256 that is 1 GiB a layer in bf16.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch.nn.attention.bias import causal_lower_right


class _AllGather(torch.autograd.Function):
    """[x_0 | ... | x_{n-1}] along `dim` from every rank of `group`; backward sums the gradient over
    the ranks (all-reduce: every backend has it) and keeps this rank's part."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim, ctx.rank, ctx.size = group, dim, group.rank(), x.shape[dim]
        parts = [torch.empty_like(x) for _ in range(group.size())]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size), None, None


def zigzag_to_global(x, cp: int, dim: int):
    """The all-gathered zigzag shards ([rank 0: chunks 0, 2cp-1 | rank 1: 1, 2cp-2 | ...]) in global
    chunk order 0 .. 2 cp - 1."""
    chunks = x.chunk(2 * cp, dim=dim)  # rank r's two chunks sit at 2 r and 2 r + 1
    order = [2 * j if j < cp else 2 * (2 * cp - 1 - j) + 1 for j in range(2 * cp)]
    return torch.cat([chunks[i] for i in order], dim=dim)


class SDPACoreAttention(MegatronModule):
    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPACoreAttention is causal only, got attn_mask_type={attn_mask_type}")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        tp = pg_collection.tp.size()
        self.cp_group = pg_collection.cp if config.context_parallel_size > 1 else None
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def _sdpa(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                              dropout_p=self.dropout if self.training else 0.0,
                                              enable_gqa=self.heads != self.groups)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPACoreAttention takes no attention_mask, attention_bias or packed_seq_params "
                             "(causal over the whole sequence)")
        s, b = query.shape[0], query.shape[1]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        if self.cp_group is None:
            out = self._sdpa(q, k, v)
        else:
            cp, r = self.cp_group.size(), self.cp_group.rank()
            if s % 2:
                raise ValueError(f"context parallelism: the local sequence ({s}) must be two zigzag chunks")
            c = s // 2
            k_all = zigzag_to_global(_AllGather.apply(k, self.cp_group, 2), cp, dim=2)
            v_all = zigzag_to_global(_AllGather.apply(v, self.cp_group, 2), cp, dim=2)
            outs = []
            for half, j in ((0, r), (1, 2 * cp - 1 - r)):  # this rank's chunks, global indices j
                keys = (j + 1) * c
                outs.append(self._sdpa(q[:, :, half * c:(half + 1) * c], k_all[:, :, :keys], v_all[:, :, :keys],
                                       mask=causal_lower_right(c, keys)))
            out = torch.cat(outs, dim=2)
        return out.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.head_dim)
