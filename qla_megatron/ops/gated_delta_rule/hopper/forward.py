"""Fused chunked forward: one program per (value-column block, v-head, segment) streams the segment's
chunks, keeps its K x BV slice of the state in registers, and writes o, the end state and (on request)
the per-chunk start states. The WY factors w, u are formed in shared memory / registers per chunk and
never written to device memory.

Per chunk of C = 64 tokens (G, beta, A from prepare.py, G in log2 units; gamma = 2^G, Gamma_ij = 2^(G_i - G_j)):

    Ag  = (Gamma . A) diag(beta)            [C, C]   lower; every factor is exp(G_i - G_j) <= 1
    Wa  = diag(gamma) A diag(beta)          [C, C]   = Ag diag(gamma): so W S = Wa K S without a ratio
    W   = Wa K                              [C, K]   (the classic w, never stored)
    U   = Ag V                              [C, BV]  (the classic u, never stored)
    P   = scale Gamma . (Q K^T)             [C, C]   lower
    ----- serial part: the only dependency between chunks -----
    Vd  = U - W S                           [C, BV]
    O   = scale diag(gamma) Q S + P Vd      [C, BV]
    S  <- exp(G_C) S + K^T (exp(G_C - G) . Vd)

The value columns of the state are independent, so a program owns BV of them; the gate-free and
in-chunk parts (Ag, W, P) are recomputed by the V / BV programs of a head, which is cheap next to
the serial chain.

Summary mode (intra-card context parallelism, DESIGN §2): the state is [M | S_ext], K x (K + V), started
from [I | 0], with zero values in the first K columns; no o. The programs whose columns fall in M
load no v (U = 0) and start from the matching columns of I.

l2norm (use_qk_l2norm_in_kernel): q and k are read as they are; 1 / ||k|| (from prepare) and 1 / ||q||
(computed here from the loaded tile) scale the rows and columns of the factors above instead.

Pad tokens of a sequence's last chunk have beta = 0 (prepare.py), so their rows of Ag, Wa, U, W and Vd
are exactly 0 and they move nothing; their o rows are not written.
"""

import tilelang
import tilelang.language as T

from .prepare import inv_row_norms

CHUNK = 64


@tilelang.jit(pass_configs={tilelang.PassConfigKey.TL_ENABLE_FAST_MATH: True})
def forward_kernel(
    # task config
    H: int, HV: int, K: int, V: int, dtype: str,
    summary: bool = False, has_initial: bool = False, store_final: bool = True,
    save_states: bool = False, l2norm: bool = False,
    # kernel config
    BV: int = 64, threads: int = 256, num_stages: int = 2, async_mma: bool = True,
):
    """Grid (W / BV, HV, NS), W = V (or K + V in summary mode).

    q, k [Tt, H, K], v [Tt, HV, V] dtype; Gc, Bc [NC, HV, C] fp32, A [NC, HV, C, C] dtype (prepare);
    segs [NS, 5] int32 = (first token, end token, first chunk id, row of h0, row of ht or -1); h0 [NI, HV, K, W] fp32;
    o [Tt, HV, V] dtype; ht [NF, HV, K, W] fp32; states [NC, HV, K, V] dtype (start state of every
    chunk, for the backward); sc: the scale of q.
    """
    C = CHUNK
    GQ = HV // H
    W = K + V if summary else V
    assert K % 16 == 0 and V % BV == 0 and W % BV == 0, (K, V, BV)
    Tt, NC, NS, NI, NF, NH, To = T.dynamic("Tt, NC, NS, NI, NF, NH, To")
    acc = "float32"

    @T.prim_func
    def kernel(
        q: T.Tensor((Tt, H, K), dtype),
        k: T.Tensor((Tt, H, K), dtype),
        v: T.Tensor((Tt, HV, V), dtype),
        Gc: T.Tensor((NC, HV, C), acc),
        Bc: T.Tensor((NC, HV, C), acc),
        Rk: T.Tensor((NC, HV, C), acc),
        A: T.Tensor((NC, HV, C, C), dtype),
        segs: T.Tensor((NS, 5), "int32"),
        h0: T.Tensor((NI, HV, K, W), acc),
        sc: T.float32,
        o: T.Tensor((To, HV, V), dtype),     # To = Tt; 1 in summary mode (no o)
        ht: T.Tensor((NF, HV, K, W), acc),
        states: T.Tensor((NH, HV, K, V), dtype),
    ):
        with T.Kernel(W // BV, HV, NS, threads=threads) as (bv, hv, s):
            hk = hv // GQ
            t_beg = segs[s, 0]
            t_end = segs[s, 1]
            c_beg = segs[s, 2]
            row = segs[s, 3]
            out_row = segs[s, 4]
            col0 = bv * BV
            # Summary mode: columns [0, K) are M (no values), [K, K + V) are S_ext.
            vcol0 = col0 - K if summary else col0

            Q_s = T.alloc_shared((C, K), dtype)
            K_s = T.alloc_shared((C, K), dtype)
            V_s = T.alloc_shared((C, BV), dtype)
            A_s = T.alloc_shared((C, C), dtype)
            G_s = T.alloc_shared((C,), acc)
            B_s = T.alloc_shared((C,), acc)
            eg_s = T.alloc_shared((C,), acc)
            ee_s = T.alloc_shared((C,), acc)
            Rk_s = T.alloc_shared((C,), acc)
            wb_s = T.alloc_shared((C,), acc)
            rq_s = T.alloc_shared((C,), acc)
            Ag_s = T.alloc_shared((C, C), dtype)
            Wa_s = T.alloc_shared((C, C), dtype)
            P_s = T.alloc_shared((C, C), dtype)
            W_s = T.alloc_shared((C, K), dtype)
            S_s = T.alloc_shared((K, BV), dtype)
            Vd_s = T.alloc_shared((C, BV), dtype)
            Vk_s = T.alloc_shared((C, BV), dtype)
            O_s = T.alloc_shared((C, BV), dtype)
            Qg_s = T.alloc_shared((C, K), dtype) if (async_mma and not summary) else None

            S = T.alloc_fragment((K, BV), acc)
            W_f = T.alloc_fragment((C, K), acc)
            U_f = T.alloc_fragment((C, BV), acc)
            WS_f = T.alloc_fragment((C, BV), acc)
            QK_f = T.alloc_fragment((C, C), acc)
            O_f = T.alloc_fragment((C, BV), acc)

            if has_initial:
                T.copy(h0[row, hv, :, col0:col0 + BV], S)
            elif summary:
                for i, j in T.Parallel(K, BV):
                    S[i, j] = T.if_then_else(i == col0 + j, 1.0, 0.0)
            else:
                T.clear(S)

            n_chunks = T.ceildiv(t_end - t_beg, C)
            for ic in T.Pipelined(n_chunks, num_stages=num_stages):
                t0 = t_beg + ic * C
                cid = c_beg + ic
                T.copy(k[t0:t0 + C, hk, :], K_s)
                T.copy(A[cid, hv, :, :], A_s)
                T.copy(Gc[cid, hv, :], G_s)
                T.copy(Bc[cid, hv, :], B_s)
                if l2norm:
                    T.copy(Rk[cid, hv, :], Rk_s)
                if not summary:
                    T.copy(q[t0:t0 + C, hk, :], Q_s)
                if summary:
                    if col0 >= K:
                        T.copy(v[t0:t0 + C, hv, vcol0:vcol0 + BV], V_s)
                    else:
                        T.clear(V_s)
                else:
                    T.copy(v[t0:t0 + C, hv, vcol0:vcol0 + BV], V_s)

                # Per-row decay factors (G is in log2 units: exp2 of differences, each <= 1).
                if l2norm:
                    # Unit-norm q and k without rewriting them: k's 1 / ||k|| (Rk, from prepare)
                    # scales the columns of Wa and P and the rows of Vk; q's (rq) the rows of Qg, P.
                    if not summary:
                        inv_row_norms(Q_s, rq_s)
                    for i in T.Parallel(C):
                        eg_s[i] = T.exp2(G_s[i])
                        ee_s[i] = T.exp2(G_s[C - 1] - G_s[i]) * Rk_s[i]
                        wb_s[i] = B_s[i] * Rk_s[i]
                else:
                    for i in T.Parallel(C):
                        eg_s[i] = T.exp2(G_s[i])
                        ee_s[i] = T.exp2(G_s[C - 1] - G_s[i])
                        wb_s[i] = B_s[i]
                # In-chunk factors from the gate-free inverse (not on the serial path).
                for i, j in T.Parallel(C, C):
                    Ag_s[i, j] = T.if_then_else(
                        i >= j, A_s[i, j] * T.exp2(G_s[i] - G_s[j]) * B_s[j], 0.0)
                    Wa_s[i, j] = T.if_then_else(i >= j, A_s[i, j] * eg_s[i] * wb_s[j], 0.0)
                if async_mma:
                    # Independent products are issued together and waited for once.
                    if not summary:
                        for i, d in T.Parallel(C, K):
                            Qg_s[i, d] = Q_s[i, d] * (sc * eg_s[i] * (rq_s[i] if l2norm else 1.0))
                    T.wgmma_gemm(Wa_s, K_s, W_f, clear_accum=True)
                    T.wgmma_gemm(Ag_s, V_s, U_f, clear_accum=True)
                    if not summary:
                        T.wgmma_gemm(Q_s, K_s, QK_f, transpose_B=True, clear_accum=True)
                    T.wait_wgmma(0)
                else:
                    T.gemm(Wa_s, K_s, W_f, clear_accum=True)
                    T.gemm(Ag_s, V_s, U_f, clear_accum=True)
                    if not summary:
                        T.gemm(Q_s, K_s, QK_f, transpose_B=True, clear_accum=True)
                T.copy(W_f, W_s)
                if not summary:
                    if l2norm:
                        for i, j in T.Parallel(C, C):
                            P_s[i, j] = T.if_then_else(
                                i >= j, sc * rq_s[i] * Rk_s[j] * QK_f[i, j] * T.exp2(G_s[i] - G_s[j]), 0.0)
                    else:
                        for i, j in T.Parallel(C, C):
                            P_s[i, j] = T.if_then_else(
                                i >= j, sc * QK_f[i, j] * T.exp2(G_s[i] - G_s[j]), 0.0)

                # Serial part.
                T.copy(S, S_s)
                if save_states:
                    T.copy(S_s, states[cid, hv, :, vcol0:vcol0 + BV])
                if async_mma:
                    T.wgmma_gemm(W_s, S_s, WS_f, clear_accum=True)
                    if not summary:
                        T.wgmma_gemm(Qg_s, S_s, O_f, clear_accum=True)
                    T.wait_wgmma(0)
                else:
                    T.gemm(W_s, S_s, WS_f, clear_accum=True)
                for i, j in T.Parallel(C, BV):
                    U_f[i, j] = U_f[i, j] - WS_f[i, j]
                T.copy(U_f, Vd_s)
                for i, j in T.Parallel(C, BV):
                    U_f[i, j] = U_f[i, j] * ee_s[i]
                T.copy(U_f, Vk_s)
                for i, j in T.Parallel(K, BV):
                    S[i, j] = S[i, j] * eg_s[C - 1]
                if async_mma:
                    T.wgmma_gemm(K_s, Vk_s, S, transpose_A=True)
                    if not summary:
                        T.wgmma_gemm(P_s, Vd_s, O_f)
                    T.wait_wgmma(0)
                else:
                    T.gemm(K_s, Vk_s, S, transpose_A=True)

                if not summary:
                    if not async_mma:
                        T.gemm(Q_s, S_s, O_f, clear_accum=True)
                        for i, j in T.Parallel(C, BV):
                            O_f[i, j] = O_f[i, j] * (sc * eg_s[i] * (rq_s[i] if l2norm else 1.0))
                        T.gemm(P_s, Vd_s, O_f)
                    T.copy(O_f, O_s)
                    for i, j in T.Parallel(C, BV):
                        if t0 + i < t_end:
                            o[t0 + i, hv, vcol0 + j] = O_s[i, j]

            if store_final:
                if out_row >= 0:
                    T.copy(S, ht[out_row, hv, :, col0:col0 + BV])

    return kernel
