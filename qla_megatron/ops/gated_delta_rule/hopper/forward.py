"""Chunked forward with the state held TRANSPOSED in registers: every product on the serial chain
takes its left operand from registers (wgmma's RS form).

Why: with S as K x BV in registers, every W S and Q S needs S copied to shared memory (bf16) first,
and K^T Vd needs Vd there: two round trips and their barriers per chunk on the only serial path
(measured ~5 us a chunk on an H100, 2.79 ms against this kernel's 1.56 at 32/16 x 32k). Holding
S^T [BV, K] instead, the chain is

    Xt  = S^T K^T                     [BV, C]   A = S^T (registers, bf16), B = K (smem)
    Yt  = (V^T - Xt diag(gk)) diag(b) [BV, C]   gk = gamma Rk, b = beta             (registers)
    Dt  = Yt Ai^T                     [BV, C]   A = Yt (registers), B = Ai (smem)   = Vd^T
    S^T <- gC S^T + (Dt diag(ee)) K   [BV, K]   A = registers, B = K (smem)

and the output, off the chain but in the same registers,

    Ot  = S^T Q^T diag(qs) + Dt P^T   [BV, C]   = O^T;  qs = scale gamma Rq

with the chunk factors from prepare.py:

    Ai  = Gamma . A                   [C, C]   lower; A = (I + StrictLower(diag(beta) Kn Kn^T))^-1
    P   = scale diag(Rq) (Gamma . Q K^T) diag(Rk)  [C, C]   lower
    F   = [gk, ee, qs, gC, b]         [5, C]   gk = gamma Rk, ee = exp(G_C - G) Rk, gC = exp(G_C)

(gamma = exp(G), Gamma_ij = exp(G_i - G_j), Rk = 1 / ||k||, Rq = 1 / ||q|| with l2norm, else 1.)
This is the classic WY form's algebra (Vd = U - W S = Ai diag(beta) (V - diag(gamma Rk) K S), since
W = Ai diag(beta gamma Rk) K), transposed. The accumulator layout of one wgmma is the register-operand layout of the next, so Xt, Dt
and S^T never leave registers; the only per-chunk shared-memory write is O for its store.

One program per (block of BV state columns, v-head, segment); BV = 128 runs two consumer warpgroups,
each owning 64 state columns (64 rows of S^T): their chains are independent and share the chunk's
q, k, Ai, P tiles in shared memory, loaded once by TileLang's TMA producer warpgroup.

Summary mode (intra-card CP): state [M | S_ext] (K x (K + V)), started from [I | 0], no o; the
programs whose columns are M use no v (V^T = 0).

States mode (emit_o=False, for the backward's recompute of every chunk's start state): no q, P or o;
the walk of the main pass writing `states` only.

Gate-driven summaries (gate_chunks = n > 0, DESIGN §2): where the decay over the segment's last n
chunks, the product of their exp(G_C) (F's last row), is below e^-10, whatever came before them is
below float32 resolution in the end state. Such a (segment, v-head) reports M = 0 and, as S_ext, the
end state of those n chunks from zero (a warm-up): its M programs walk no chunks and its S_ext
programs only the last n. The composition S_start[j + 1] = M_j S_start[j] + S_ext[j] then takes the
warm-up state with no gate mask anywhere else. Segments of n chunks or fewer are never gated.
"""

import tilelang
import tilelang.language as T

CHUNK = 64
GATE_DECAY = 4.5399929762484854e-05    # e^-10: the decay below which a window hides what came before


def _window_decay(F, c_beg, n_chunks, hv, n):
    """Product of exp(G_C) over the last n chunks of a segment (F [NC, HV, 5, C], row 3 = exp(G_C));
    chunk indices clamped into the segment, so a segment of n chunks or fewer reads only its own."""
    first = c_beg + T.max(n_chunks - n, 0)
    last = c_beg + n_chunks - 1
    dec = F[T.min(first, last), hv, 3, 0]
    for w in range(1, n):
        dec = dec * F[T.min(first + w, last), hv, 3, 0]
    return dec
# Each warpgroup owns whole rows of S^T (its 64 state columns): no operand is shared across them.
ROWS = T.GemmWarpPolicy.FullRow


@tilelang.jit(pass_configs={tilelang.PassConfigKey.TL_ENABLE_FAST_MATH: True})
def forward_kernel(
    # task config
    H: int, HV: int, K: int, V: int, dtype: str,
    summary: bool = False, has_initial: bool = False, store_final: bool = True,
    save_states: bool = False, gate_chunks: int = 0, emit_o: bool = True,
    # kernel config
    BV: int = 128, num_stages: int = 2,
):
    """Grid (W / BV, HV, NS), W = V (or K + V in summary mode); 2 * BV threads (+ TMA producer).

    q, k [Tt, H, K], v [Tt, HV, V] dtype; Ai, P [NC, HV, C, C] dtype, F [NC, HV, 5, C] fp32 (prepare.py);
    segs [NS, 5] int32 = (first token, end token, first chunk id, row of h0, row of
    ht or -1); h0 [NI, HV, K, W] fp32;
    o [Tt, HV, V] dtype ([1, HV, V] in summary mode: not written); ht [NF, HV, K, W] fp32; states [NH, HV, K, V] dtype (start state of every
    chunk, for the backward).
    """
    assert summary or not gate_chunks, "gate_chunks applies to the summary pass only"
    C = CHUNK
    GQ = HV // H
    W = K + V if summary else V
    # A block of state columns is all M or all S_ext in summary mode (K % BV == 0).
    assert BV in (64, 128) and V % BV == 0 and K % 64 == 0 and (K % BV == 0 or not summary), (K, V, BV)
    Tt, NC, NS, NI, NF, NH, To = T.dynamic("Tt, NC, NS, NI, NF, NH, To")
    acc = "float32"
    assert emit_o or (save_states and not summary), "emit_o=False is the states-only walk"
    out = emit_o and not summary

    @T.prim_func
    def kernel(
        q: T.Tensor((Tt, H, K), dtype),
        k: T.Tensor((Tt, H, K), dtype),
        v: T.Tensor((Tt, HV, V), dtype),
        Ai: T.Tensor((NC, HV, C, C), dtype),
        P: T.Tensor((NC, HV, C, C), dtype),
        F: T.Tensor((NC, HV, 5, C), acc),
        segs: T.Tensor((NS, 5), "int32"),
        h0: T.Tensor((NI, HV, K, W), acc),
        o: T.Tensor((To, HV, V), dtype),     # To = Tt; 1 in summary mode (no o)
        ht: T.Tensor((NF, HV, K, W), acc),
        states: T.Tensor((NH, HV, K, V), dtype),
    ):
        with T.Kernel(W // BV, HV, NS, threads=2 * BV) as (bv, hv, s):
            hk = hv // GQ
            t_beg = segs[s, 0]
            t_end = segs[s, 1]
            c_beg = segs[s, 2]
            row = segs[s, 3]
            out_row = segs[s, 4]
            col0 = bv * BV
            # Summary mode: the M programs (col0 < K) have no values; they load v's first columns
            # anyway (an unconditional TMA load keeps the pipeline's producer simple) and read zeros.
            vcol0 = T.max(col0 - K, 0) if summary else col0
            has_v = (col0 >= K) if summary else True
            seg_chunks = T.ceildiv(t_end - t_beg, C)
            if gate_chunks:
                # Gate-driven (module docstring): a gated pair walks only its last gate_chunks chunks
                # for S_ext, none for M, from a zero state.
                gated = T.And(seg_chunks > gate_chunks,
                              _window_decay(F, c_beg, seg_chunks, hv, gate_chunks) < GATE_DECAY)
                first = T.if_then_else(gated, seg_chunks - gate_chunks, 0)
                n_chunks = T.if_then_else(T.And(gated, T.Not(has_v)), 0, seg_chunks - first)
            else:
                gated = False
                first = 0
                n_chunks = seg_chunks

            K_s = T.alloc_shared((C, K), dtype)
            V_s = T.alloc_shared((C, BV), dtype)
            Ai_s = T.alloc_shared((C, C), dtype)
            F_s = T.alloc_shared((5, C), acc)
            Q_s = T.alloc_shared((C, K), dtype) if out else None
            P_s = T.alloc_shared((C, C), dtype) if out else None
            O_s = T.alloc_shared((C, BV), dtype) if out else None

            St = T.alloc_fragment((BV, K), acc)
            Sb = T.alloc_fragment((BV, K), dtype)
            Xt = T.alloc_fragment((BV, C), acc)
            Yb = T.alloc_fragment((BV, C), dtype)
            Kb = T.alloc_fragment((BV, C), dtype)
            Ot = T.alloc_fragment((BV, C), acc) if out else None
            Db = T.alloc_fragment((BV, C), dtype) if out else None

            if has_initial:
                for j, d in T.Parallel(BV, K):
                    St[j, d] = h0[row, hv, d, col0 + j]
            elif summary:
                for j, d in T.Parallel(BV, K):
                    St[j, d] = T.if_then_else(gated, 0.0, T.if_then_else(d == col0 + j, 1.0, 0.0))
            else:
                T.clear(St)

            for ic in T.Pipelined(n_chunks, num_stages=num_stages):
                t0 = t_beg + (first + ic) * C
                cid = c_beg + first + ic
                T.copy(k[t0:t0 + C, hk, :], K_s)
                T.copy(Ai[cid, hv, :, :], Ai_s)
                T.copy(F[cid, hv, :, :], F_s)
                if out:
                    T.copy(q[t0:t0 + C, hk, :], Q_s)
                    T.copy(P[cid, hv, :, :], P_s)
                T.copy(v[t0:t0 + C, hv, vcol0:vcol0 + BV], V_s)

                for j, d in T.Parallel(BV, K):
                    Sb[j, d] = St[j, d]
                if save_states:
                    for j, d in T.Parallel(BV, K):
                        states[cid, hv, d, vcol0 + j] = Sb[j, d]
                # Xt = S^T K^T and (off the chain) S^T Q^T, issued together. Only the async form
                # (wgmma_gemm) is used where the tile it reads is read again by a later synchronous
                # T.gemm: TileLang's pipeline hands a tile back to the TMA producer right after its
                # last use is ISSUED, so a last use must be waited for (T.gemm) before that.
                if out:
                    T.wgmma_gemm(Sb, K_s, Xt, transpose_B=True, clear_accum=True, policy=ROWS)
                    T.gemm(Sb, Q_s, Ot, transpose_B=True, clear_accum=True, policy=ROWS)
                else:
                    T.gemm(Sb, K_s, Xt, transpose_B=True, clear_accum=True, policy=ROWS)
                if summary:
                    for j, t in T.Parallel(BV, C):
                        Yb[j, t] = (T.if_then_else(has_v, V_s[t, j], T.cast(0, dtype)) - Xt[j, t] * F_s[0, t]) \
                            * F_s[4, t]
                else:
                    for j, t in T.Parallel(BV, C):
                        Yb[j, t] = (V_s[t, j] - Xt[j, t] * F_s[0, t]) * F_s[4, t]
                # Dt = Yt Ai^T (= Vd^T), reusing Xt's registers.
                T.gemm(Yb, Ai_s, Xt, transpose_B=True, clear_accum=True, policy=ROWS)
                for j, t in T.Parallel(BV, C):
                    Kb[j, t] = Xt[j, t] * F_s[1, t]
                if out:
                    for j, t in T.Parallel(BV, C):
                        Db[j, t] = Xt[j, t]
                        Ot[j, t] = Ot[j, t] * F_s[2, t]
                for j, d in T.Parallel(BV, K):
                    St[j, d] = St[j, d] * F_s[3, 0]
                T.gemm(Kb, K_s, St, policy=ROWS)
                if out:
                    T.gemm(Db, P_s, Ot, transpose_B=True, policy=ROWS)
                if out:
                    for j, t in T.Parallel(BV, C):
                        O_s[t, j] = Ot[j, t]
                    for t, j in T.Parallel(C, BV):
                        if t0 + t < t_end:
                            o[t0 + t, hv, vcol0 + j] = O_s[t, j]

            if store_final:
                if out_row >= 0:
                    for j, d in T.Parallel(BV, K):
                        ht[out_row, hv, d, col0 + j] = St[j, d]

    return kernel
