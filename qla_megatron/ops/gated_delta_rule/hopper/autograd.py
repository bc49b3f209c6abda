"""The autograd Function of the Hopper path: forward and backward both on the TileLang kernels.

Forward: chunk.chunk_gated_delta_rule_fwd, keeping its ForwardSaved (chunk factors, segment starts).
Backward: backward.chunk_gated_delta_rule_bwd on the same plan (kept in ForwardSaved). Plans come
from shapes only (chunk.plan_for): batch rows' built once per shape on the host and cached, packed
sequences' built on the device from cu_seqlens in the forward; so a forward + backward of fixed
shapes makes no host synchronisation, with or without cu_seqlens (tests/ops/test_packed_plan.py runs
it on meta tensors, where any read of a value fails).
"""

from __future__ import annotations

import torch

from .backward import chunk_gated_delta_rule_bwd
from .chunk import chunk_gated_delta_rule_fwd


class HopperGatedDeltaRule(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, scale, output_final_state, cu_seqlens, l2norm, intra_cp):
        o, ht, saved = chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state, output_final_state,
                                                  cu_seqlens, l2norm, intra_cp=intra_cp, save_for_backward=True)
        ctx.save_for_backward(q, k, v, g, beta)
        ctx.saved = saved
        ctx.l2norm = l2norm
        ctx.initial_dtype = initial_state.dtype if initial_state is not None else None   # None: no h0 grad
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta = ctx.saved_tensors
        if do is None:
            do = torch.zeros(*v.shape, dtype=q.dtype, device=q.device)
        dq, dk, dv, dg, db, dh0 = chunk_gated_delta_rule_bwd(ctx.saved, q, k, v, g, beta, do, dht, ctx.l2norm)
        ctx.saved = None
        dh0 = dh0.to(ctx.initial_dtype) if ctx.initial_dtype is not None else None
        return (dq, dk, dv, dg, db, dh0) + (None,) * 5


def run(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel,
        intra_cp=None):
    """The tilelang backend's entry: the Function when a backward will follow, else the forward alone."""
    tensors = (q, k, v, g, beta, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return HopperGatedDeltaRule.apply(q, k, v, g, beta, initial_state, scale, output_final_state, cu_seqlens,
                                          bool(use_qk_l2norm_in_kernel), intra_cp)
    return chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                      use_qk_l2norm_in_kernel, intra_cp=intra_cp)
