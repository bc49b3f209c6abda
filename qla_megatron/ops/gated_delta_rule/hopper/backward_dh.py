"""Backward walk of the state adjoint dS, chunks in reverse, dS held TRANSPOSED in registers: the dual
of forward.py's walk, with the same chunk factors (prepare.py) and the same register-operand
(RS) wgmma chain.

Per chunk, from the adjoint dS of the chunk's end state (K x V; dSt = dS^T [BV, K] in registers):

    Xt  = dSt K^T diag(ee) + dO^T P     [BV, C]   = dVd^T   (dVd = diag(e) Kn dS + P^T dO)
    Tt  = Xt Ai                         [BV, C]   = (Ai^T dVd)^T
    dYt = Tt diag(b)                    [BV, C]   = dv^T    (Vd = Ai diag(b) Y, Y = V - diag(gk) K S)
    dSt <- gC dSt + (dO^T diag(qs)) Q - (dYt diag(gk)) K          the adjoint of the chunk's start

(F = [gk, ee, qs, gC, b] as in forward.py; pad rows of F are 0, so the pad rows of whole-tile
loads, the next sequence's tokens, contribute nothing.) It writes dv, the adjoint at every chunk's
end (bf16, for backward_grads.py) and, for a sequence's first segment, d(initial state).

The end chunk's <S, dS> in fp32 (main mode with a terminal adjoint): backward_grads.py takes
gC <S, dS> of every chunk from the bf16 copies of S and dS, whose rounding leaves an absolute error
of ~sqrt(K V) |s| |ds| 2^-9 in it however small <S, dS> is: at a one-token sequence with a random
initial state that was 3 % of its dg (an H200, 2/8 heads). Where the walk holds the exact values,
at the segment's last chunk (dS = the fp32 terminal adjoint; S = the fp32 segment start where the
segment is one chunk, with has_initial), it writes the row sums of S . dS - bf16(S) . bf16(dS) to
sdc[chunk, v-head] (V entries; the launcher zeroes the other chunks' rows), which backward_grads.py
adds to its own sum.

One program per (block of BV adjoint columns, v-head, segment), BV = 128 on two consumer warpgroups
(64 columns each, independent chains) plus TileLang's TMA producer, as in the forward.

Summary mode (the dual of the forward's, for intra-card CP): the adjoint widened to [M^T | dS_ext]
(K x (K + V)), started from [I | 0] at the segment's end, so that at its start
dS_start = M^T dS_end + dS_ext, where M is the segment's forward transition. The M^T programs read no
dO. Gate-driven (gate_chunks = n > 0): where the decay over the segment's FIRST n chunks is below
e^-10, what lies after them cannot reach the segment's start in float32: the pair reports M^T = 0 and,
as dS_ext, the adjoint from those n chunks alone, walked from zero.
"""

import tilelang
import tilelang.language as T

from .forward import GATE_DECAY, ROWS, _window_decay

CHUNK = 64


@tilelang.jit(pass_configs={tilelang.PassConfigKey.TL_ENABLE_FAST_MATH: True})
def backward_dh_kernel(
    # task config
    H: int, HV: int, K: int, V: int, dtype: str,
    summary: bool = False, has_terminal: bool = False, has_initial: bool = False, gate_chunks: int = 0,
    # kernel config
    BV: int = 128, num_stages: int = 2,
):
    """Grid (W / BV, HV, NS), W = V (K + V in summary mode); 2 * BV threads (+ TMA producer).

    q, k [Tt, H, K], do [Tt, HV, V] dtype; Ai, P [NC, HV, C, C] dtype, F [NC, HV, 5, C] fp32;
    segs [NS, 5] int32 = (first token, end token, first chunk id, row of dht (read with has_terminal),
    row of dh0 or -1); dht [NI, HV, K, W] fp32: the adjoint at the segment's end;
    dv [Tt, HV, V] dtype (main mode; [1, HV, V] in summary mode: not written);
    dstates [NC, HV, K, V] dtype: the adjoint at every chunk's end (main mode);
    dh0 [NF, HV, K, W] fp32: the adjoint at the segment's start (summary mode: [M^T | dS_ext]);
    main mode with has_terminal: states [NC, HV, K, V] dtype, every chunk's start state (read at
    segments' last chunks), starts [NI, HV, K, V] fp32, the segments' start states (rows of segs[:, 3],
    read with has_initial), sdc [NC, HV, V] fp32: the end chunks' <S, dS> corrections (module
    docstring). Summary mode: those three are not read (one-row placeholders).
    """
    assert summary or not gate_chunks, "gate_chunks applies to the summary pass only"
    assert not has_initial or (has_terminal and not summary), "has_initial: the main walk's end-chunk term"
    C = CHUNK
    GQ = HV // H
    W = K + V if summary else V
    assert BV in (64, 128) and V % BV == 0 and K % 64 == 0 and (K % BV == 0 or not summary), (K, V, BV)
    Tt, NC, NS, NI, NF, Tv, NCs, NI0 = T.dynamic("Tt, NC, NS, NI, NF, Tv, NCs, NI0")
    acc = "float32"
    main = not summary
    end_term = main and has_terminal
    assert not end_term or BV == V, "the end-chunk term: one program holds the whole adjoint"

    @T.prim_func
    def kernel(
        q: T.Tensor((Tt, H, K), dtype),
        k: T.Tensor((Tt, H, K), dtype),
        do: T.Tensor((Tt, HV, V), dtype),
        Ai: T.Tensor((NC, HV, C, C), dtype),
        P: T.Tensor((NC, HV, C, C), dtype),
        F: T.Tensor((NC, HV, 5, C), acc),
        segs: T.Tensor((NS, 5), "int32"),
        dht: T.Tensor((NI, HV, K, W), acc),
        dv: T.Tensor((Tv, HV, V), dtype),          # Tv = Tt; 1 in summary mode
        dstates: T.Tensor((NCs, HV, K, V), dtype),  # NCs = NC; 1 in summary mode
        dh0: T.Tensor((NF, HV, K, W), acc),
        states: T.Tensor((NCs, HV, K, V), dtype),   # NCs = NC; 1 in summary mode
        starts: T.Tensor((NI0, HV, K, V), acc),
        sdc: T.Tensor((NCs, HV, V), acc),
    ):
        with T.Kernel(W // BV, HV, NS, threads=2 * BV) as (bv, hv, s):
            hk = hv // GQ
            t_beg = segs[s, 0]
            t_end = segs[s, 1]
            c_beg = segs[s, 2]
            row = segs[s, 3]
            out_row = segs[s, 4]
            col0 = bv * BV
            # Summary mode: the M^T programs (col0 < K) read dO's first columns and use zeros.
            dcol0 = T.max(col0 - K, 0) if summary else col0
            has_do = (col0 >= K) if summary else True
            seg_chunks = T.ceildiv(t_end - t_beg, C)
            if gate_chunks:
                gated = T.And(seg_chunks > gate_chunks,
                              _window_decay(F, c_beg, gate_chunks, hv, gate_chunks) < GATE_DECAY)
                # A gated pair walks chunks gate_chunks - 1 .. 0 for dS_ext, none for M^T.
                last = T.if_then_else(gated, gate_chunks, seg_chunks)
                n_chunks = T.if_then_else(T.And(gated, T.Not(has_do)), 0, last)
            else:
                gated = False
                last = seg_chunks
                n_chunks = seg_chunks

            K_s = T.alloc_shared((C, K), dtype)
            Q_s = T.alloc_shared((C, K), dtype)
            dO_s = T.alloc_shared((C, BV), dtype)
            Ai_s = T.alloc_shared((C, C), dtype)
            P_s = T.alloc_shared((C, C), dtype)
            F_s = T.alloc_shared((5, C), acc)
            dV_s = T.alloc_shared((C, BV), dtype) if main else None

            St = T.alloc_fragment((BV, K), acc)
            Sb = T.alloc_fragment((BV, K), dtype)
            Xt = T.alloc_fragment((BV, C), acc)
            Db = T.alloc_fragment((BV, C), dtype)
            Eq = T.alloc_fragment((BV, C), dtype)
            Ek = T.alloc_fragment((BV, C), dtype)
            xr = T.alloc_fragment((BV,), acc) if end_term else None

            if end_term:
                # The last chunk's S . dS - bf16(S) . bf16(dS), row sums (module docstring), in Xt (free
                # until the walk's first product), before St is live (no spills; 185 -> 231 registers at
                # its peak here with has_initial, the walk's own unchanged). dS = dht exactly; its bf16
                # rounding is the one the walk stores.
                if seg_chunks > 0:
                    cl = c_beg + seg_chunks - 1
                    one = seg_chunks == 1
                    T.clear(Xt)
                    for h in T.unroll(K // C):
                        for j, t in T.Parallel(BV, C):
                            ds = dht[row, hv, h * C + t, j]
                            sb = T.cast(states[cl, hv, h * C + t, j], acc)
                            sx = T.if_then_else(one, starts[row, hv, h * C + t, j], sb) if has_initial else sb
                            Xt[j, t] = Xt[j, t] + sx * ds - sb * T.cast(T.cast(ds, dtype), acc)
                    T.reduce_sum(Xt, xr, dim=1)
                    for j in T.Parallel(BV):
                        sdc[cl, hv, j] = xr[j]

            if has_terminal:
                for j, d in T.Parallel(BV, K):
                    St[j, d] = dht[row, hv, d, col0 + j]
            elif summary:
                for j, d in T.Parallel(BV, K):
                    St[j, d] = T.if_then_else(gated, 0.0, T.if_then_else(d == col0 + j, 1.0, 0.0))
            else:
                T.clear(St)

            for ic in T.Pipelined(n_chunks, num_stages=num_stages):
                c_in = last - 1 - ic                 # chunk of the segment, walked last to first
                t0 = t_beg + c_in * C
                cid = c_beg + c_in
                T.copy(k[t0:t0 + C, hk, :], K_s)
                T.copy(q[t0:t0 + C, hk, :], Q_s)
                T.copy(do[t0:t0 + C, hv, dcol0:dcol0 + BV], dO_s)
                T.copy(Ai[cid, hv, :, :], Ai_s)
                T.copy(P[cid, hv, :, :], P_s)
                T.copy(F[cid, hv, :, :], F_s)

                for j, d in T.Parallel(BV, K):
                    Sb[j, d] = St[j, d]
                if main:
                    for j, d in T.Parallel(BV, K):
                        dstates[cid, hv, d, col0 + j] = Sb[j, d]
                for j, t in T.Parallel(BV, C):
                    Db[j, t] = T.if_then_else(has_do, dO_s[t, j], T.cast(0, dtype))
                # Xt = dS^T K^T diag(ee) + dO^T P   (= dVd^T)
                T.gemm(Sb, K_s, Xt, transpose_B=True, clear_accum=True, policy=ROWS)
                for j, t in T.Parallel(BV, C):
                    Xt[j, t] = Xt[j, t] * F_s[1, t]
                T.gemm(Db, P_s, Xt, policy=ROWS)
                for j, t in T.Parallel(BV, C):
                    Db[j, t] = Xt[j, t]
                # Tt = dVd^T Ai; dY^T = Tt diag(b), reusing Xt's registers
                T.gemm(Db, Ai_s, Xt, clear_accum=True, policy=ROWS)
                for j, t in T.Parallel(BV, C):
                    Xt[j, t] = Xt[j, t] * F_s[4, t]
                    Ek[j, t] = -Xt[j, t] * F_s[0, t]
                    Eq[j, t] = T.if_then_else(has_do, dO_s[t, j], T.cast(0, dtype)) * F_s[2, t]
                for j, d in T.Parallel(BV, K):
                    St[j, d] = St[j, d] * F_s[3, 0]
                T.gemm(Eq, Q_s, St, policy=ROWS)
                T.gemm(Ek, K_s, St, policy=ROWS)
                if main:
                    for j, t in T.Parallel(BV, C):
                        dV_s[t, j] = Xt[j, t]
                    for t, j in T.Parallel(C, BV):
                        if t0 + t < t_end:
                            dv[t0 + t, hv, col0 + j] = dV_s[t, j]

            if out_row >= 0:
                for j, d in T.Parallel(BV, K):
                    dh0[out_row, hv, d, col0 + j] = St[j, d]

    return kernel
