"""Token-by-token gated delta rule: the ground truth every kernel and parallel path is tested against.

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        S: [K, V] per v-head
    o_t = S_t^T (scale * q_t)

Same argument order and conventions as `chunk_gated_delta_rule` (chunk.py).
"""

from __future__ import annotations

import torch

from .inputs import check_inputs, compute_dtype, default_scale, packed_stream, sequence_bounds


def recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
                               output_final_state=False, cu_seqlens=None,
                               use_qk_l2norm_in_kernel=False):
    """Reference gated delta rule, one token at a time (O(T) sequential steps: tests and small inputs).

    Args:
        q, k: [B, T, H, K]. v: [B, T, HV, V], HV a multiple of H (v-head h reads qk-head h // (HV // H)).
        g: [B, T, HV] per-token log decay (not cumulated). beta: [B, T, HV].
        scale: defaults to K ** -0.5.
        initial_state: [N, HV, K, V], N = B, or the number of sequences with cu_seqlens.
        output_final_state: also return the [N, HV, K, V] end states.
        cu_seqlens: int64 [N + 1] offsets of packed sequences (B must be 1).
        use_qk_l2norm_in_kernel: L2-normalise q and k over K first.

    Returns:
        o [B, T, HV, V] in q's dtype, and the final state (float32; float64 for float64 inputs) or None.
        Computes in float32 for half inputs and in float64 for float64 inputs; differentiable.
        As the ground truth (never on a hot path) it always scans its inputs for NaN/Inf.
    """
    N = check_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens, check_finite=True)
    B, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    G = HV // H
    out_dtype, cdt = q.dtype, compute_dtype(q.dtype)
    scale = default_scale(scale, K)
    qf, kf, vf, gf, bf = packed_stream(q, k, v, g, beta, use_qk_l2norm_in_kernel)
    # v-head h uses qk-head h // G: index, never materialise the repeat in the caller's tensors.
    head_of = torch.arange(HV, device=k.device) // G
    qf, kf = qf[:, head_of], kf[:, head_of]

    bounds = sequence_bounds(B, T, cu_seqlens)
    outs, finals = [], []
    for n in range(N):
        S = (initial_state[n].to(cdt) if initial_state is not None
             else k.new_zeros(HV, K, V, dtype=cdt))
        for t in range(bounds[n], bounds[n + 1]):
            kt, bt = kf[t], bf[t]
            # S <- exp(g)(S - beta k (k^T S)) + beta k v^T
            kS = torch.einsum("hk,hkv->hv", kt, S)
            S = torch.exp(gf[t])[:, None, None] * (S - bt[:, None, None] * kt[:, :, None] * kS[:, None, :]) \
                + bt[:, None, None] * kt[:, :, None] * vf[t][:, None, :]
            outs.append(torch.einsum("hk,hkv->hv", qf[t] * scale, S))
        finals.append(S)
    o = torch.stack(outs).reshape(B, T, HV, V).to(out_dtype)
    return o, (torch.stack(finals) if output_final_state else None)
