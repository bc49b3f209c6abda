"""Backward of the Hopper path, on the forward's plan (chunk.py): the dual of its forward.

    states    forward.py in states mode from the saved segment starts: every chunk's start state, bf16
    summary   (intra-card CP) per segment with a predecessor: [M^T | dS_ext] (backward_dh.py, summary
              mode), gate-driven where the decay over its first warmup_chunks chunks allows
    compose   each segment's end adjoint, right to left: dS_end[j - 1] = M_j^T dS_end[j] + dS_ext_j,
              from dht (segments.compose on the plan's backward walk, backend "tilelang")
    walk      per (value block, v-head, segment): the adjoint dS chunk by chunk in reverse from the
              segment's end adjoint: dv, every chunk's end adjoint (bf16), d(initial state), and the
              fp32 correction of <S, dS> at each segment's last chunk
    grads     per (chunk, qk-head): dq, dk, dg, dbeta from the chunk's S and dS (backward_grads.py)

What is saved and what recomputed (ForwardSaved, chunk.py): the chunk factors Ai, P, F are saved
(276 bytes per token and v-head, bf16, K = V = 128), so no prepare runs in the backward; the per-chunk
states are recomputed (saving them would cost K V 2 / 64 = 512 bytes per token and v-head, and the
walk that recomputes them is the forward's cheapest pass). The states and adjoints live only during
the backward: 2 x 512 bytes per token and v-head.
"""

from __future__ import annotations

from typing import Optional

import torch

from .backward_dh import backward_dh_kernel
from .backward_grads import backward_grads_kernel
from .. import segments
from .chunk import _DTYPES, ForwardSaved, bv_main, empty, flat_inputs, forward


def backward_dh(q, k, do, Ai, P, F, segs, *, dht=None, n_final=0, summary=False, gate_chunks=0,
                dstates=None, states=None, starts=None):
    """Launch backward_dh_kernel over `segs`. Main mode: returns (dv [Tt, HV, V], dh0 [n_final, HV, K, V]
    or None, sdc [NC, HV, V] fp32) and fills dstates [NC, HV, K, V]; with dht, states (every
    chunk's start state) is read, and starts (the segments' fp32 start states) where given, for the
    end chunks' <S, dS> corrections sdc (backward_dh.py; zero elsewhere, and all zero without dht). Summary mode: returns
    (None, [n_final, HV, K, K + V], None)."""
    Tt, H, K = k.shape
    HV, V = do.shape[1], do.shape[2]
    W = K + V if summary else V
    end_term = not summary and dht is not None
    kern = backward_dh_kernel(H, HV, K, V, _DTYPES[k.dtype], summary=summary, has_terminal=dht is not None,
                              has_initial=end_term and starts is not None, gate_chunks=gate_chunks,
                              BV=bv_main(V))
    dummy = torch.empty(1, HV, K, W, dtype=torch.float32, device=q.device)
    dh0 = empty(n_final, HV, K, W, dtype=torch.float32, device=q.device) if n_final else dummy
    dv = q.new_empty(1, HV, V) if summary else empty(Tt, HV, V, dtype=q.dtype, device=q.device)
    ds = dstates if dstates is not None else q.new_empty(1, HV, K, V)
    if end_term:
        assert states is not None, "backward_dh: a terminal adjoint needs states (every chunk's start state)"
    else:   # not read; shaped as the kernel's symbolic NCs (dstates' rows) requires
        states = ds
    # Zeros, not poison: the walk writes the end chunks' rows only (none without a terminal adjoint),
    # and backward_grads reads every row; in main mode it is returned either way, so that
    # backward_grads needs no second [NC, HV, V] buffer. Summary mode: a one-row placeholder.
    sdc = torch.zeros(ds.shape[0], HV, V, dtype=torch.float32, device=q.device)
    st0 = starts if end_term and starts is not None else dummy.new_empty(1, HV, K, V)   # contiguous
    kern(q, k, do, Ai, P, F, segs, dht if dht is not None else dummy, dv, ds, dh0, states, st0, sdc)
    return (None if summary else dv), (dh0 if n_final else None), (None if summary else sdc)


def backward_summarize(q, k, do, Ai, P, F, plan, *, gate_chunks: int = 0) -> torch.Tensor:
    """The backward summary pass, the dual of chunk.summarize: [M^T | dS_ext] [NSS, HV, K, K + V] fp32
    of every segment with a predecessor (plan.bsum_segs), gate-driven with warm-ups of gate_chunks
    chunks (0: exact)."""
    NSS = plan.bsum_segs.shape[0]
    return backward_dh(q, k, do, Ai, P, F, plan.bsum_segs, n_final=NSS, summary=True, gate_chunks=gate_chunks)[1]


def backward_grads(q, k, v, do, g, beta, chunks, Ai, P, states, dstates, sdc, scale, l2norm):
    """Launch backward_grads_kernel (sdc: the walk's <S, dS> corrections, None: none). Returns dq, dk
    [Tt, H, K] dtype and dg, dbeta [Tt, HV] fp32."""
    Tt, H, K = k.shape
    HV, V = v.shape[1], v.shape[2]
    kern = backward_grads_kernel(H, HV, K, V, _DTYPES[k.dtype], l2norm=l2norm)
    dq = empty(Tt, H, K, dtype=q.dtype, device=q.device)
    dk = empty(Tt, H, K, dtype=q.dtype, device=q.device)
    dg = empty(Tt, HV, dtype=torch.float32, device=q.device)
    db = empty(Tt, HV, dtype=torch.float32, device=q.device)
    if sdc is None:
        sdc = torch.zeros(states.shape[0], HV, V, dtype=torch.float32, device=q.device)
    kern(q, k, v, do, g, beta, chunks, Ai, P, states, dstates, sdc, float(scale), dq, dk, dg, db)
    return dq, dk, dg, db


def chunk_gated_delta_rule_bwd(saved: ForwardSaved, q, k, v, g, beta, do, dht: Optional[torch.Tensor],
                               use_qk_l2norm_in_kernel: bool):
    """Gradients of the Hopper forward that produced `saved`, for the output gradient do [B, T, HV, V]
    and the final-state gradient dht [N, HV, K, V] (None: zero). Returns dq, dk, dv, dg, dbeta in the
    shapes and dtypes of q, k, v, g, beta, and dh0 [N, HV, K, V] fp32."""
    B, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    plan, cfg = saved.plan, saved.config
    qf, kf, vf, gf, bf = flat_inputs(q, k, v, g, beta)
    dof = do.reshape(B * T, HV, V).to(q.dtype).contiguous()
    dht = dht.float().contiguous() if dht is not None else None

    states = empty(plan.NC, HV, K, V, dtype=q.dtype, device=q.device)
    forward(qf, kf, vf, saved.Ai, saved.P, saved.F, plan.segs, h0=saved.starts, states=states, emit_o=False)
    if plan.bsum_segs is not None:
        bsumm = backward_summarize(qf, kf, dof, saved.Ai, saved.P, saved.F, plan, gate_chunks=cfg.gate_chunks)
        dht = segments.compose(plan.bwalk, bsumm, dht, plan.NS, backend="tilelang")
    dstates = empty(plan.NC, HV, K, V, dtype=q.dtype, device=q.device)
    dv, dh0, sdc = backward_dh(qf, kf, dof, saved.Ai, saved.P, saved.F, plan.bsegs, dht=dht,
                               n_final=saved.n_seqs, dstates=dstates, states=states, starts=saved.starts)
    dq, dk, dg, db = backward_grads(qf, kf, vf, dof, gf, bf, plan.chunks, saved.Ai, saved.P, states, dstates,
                                    sdc, saved.scale, bool(use_qk_l2norm_in_kernel))
    return (dq.view(B, T, H, K), dk.view(B, T, H, K), dv.view(B, T, HV, V).to(v.dtype),
            dg.view(B, T, HV).to(g.dtype), db.view(B, T, HV).to(beta.dtype), dh0)
