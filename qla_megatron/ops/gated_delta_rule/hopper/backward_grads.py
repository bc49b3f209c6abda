"""Input gradients of every chunk at once, from the chunk's start state S and the adjoint dS of its
end state (forward.py's states mode and backward_dh.py): dq, dk, dg, dbeta (dv and d(initial
state) come out of the adjoint walk).

One program per (chunk, qk-head), 256 threads; it walks the v-heads of its qk-head one after another
and sums their dq, dk in registers: grouped value heads reduce without atomics, deterministic.
S, dS and ten other tiles take ~205 KB of shared memory and the fragments 255 registers a thread, so
one program runs on an SM at a time and nothing hides its loads: on an H100 at 32/16 x 32k, 21 % of
Nsight Compute's stall samples wait on a v-head's loads, 8 % on q, k and 25 % on barriers
(benchmarks/results/ncu_h100.md). The gates of all the group's v-heads are summed once per program
(not per v-head, by two warps while six wait), the dg scans run in one warp with shuffles, and
independent products (KS and QS, dLg and dP) are issued together and waited for once.

Per v-head (C = 64 tokens; Kn, Qn the l2-normalised k, q rows, in bf16 like the forward reads them;
gam = exp(G), e = exp(G_C - G), gC = exp(G_C), Gamma_ij = exp(G_i - G_j) for i >= j, each the exp of
a difference of cumulative log-gates, so strong decay underflows to 0 instead of forming 0/0;
Ai = Gamma . A (prepare.py), b = beta, sc the scale):

    forward, rebuilt        KS = Kn S,  QS = Qn S,  Y = V - diag(gam) KS,  Vd = Ai diag(b) Y
    adjoints                dVd = P^T dO + diag(e) Kn dS,   T = Ai^T dVd,   dY = diag(b) T (= dv)
    inverse, no 64^3 chain  dLg = -StrictLower(T Vd^T)     (= -Ai^T dAi Ai^T, as Ai Y~ = Vd)
    q, k                    dQn = sc diag(gam) dO S^T + sc (Gamma . dP) Kn,   dP = Lower(dO Vd^T)
                            dKn = sc (Gamma . dP)^T Qn - diag(gam b) T S^T + diag(e) Vd dS^T
                                  + (dKK + dKK^T) Kn,    dKK = dLg . diag(b) Gamma  (strict lower)
    beta                    db = rowsum(T . Y) + rowsum(dLg . Gamma . Kn Kn^T)
    gate (fp32)             dG_i = sc gam_i <dO_i, QS_i> - gam_i b_i <T_i, KS_i>
                                   + rowsum_i(MG) - colsum_i(MG),   MG = StrictLower(dLg . Lg + dP . P)
                            dg_t = sum_{i >= t} dG_i + gC <S, dS> + sum_{i < t} e_i <Kn dS, Vd>_i

(e_i = exp(G_C - G_i) with G_C = G_{C-1} = sum of the chunk's g: its derivative in g_t is e_i
[i < t], an exclusive prefix sum; gC's is gC for every t.)

Lg = diag(b) (Gamma . Kn Kn^T) strictly lower, P = sc Gamma . Qn Kn^T (prepare.py). With l2norm,
dq = Rq (dQn - Qn <Qn, dQn>) (Rq = 1 / ||q||; the same for k). Pad rows (past a sequence's end) are
loaded as 0, so they contribute nothing (G is flat over them, so G_C = G of the last valid token).
"""

import tilelang
import tilelang.language as T

CHUNK = 64
LOG2E = 1.4426950408889634


@tilelang.jit(pass_configs={tilelang.PassConfigKey.TL_ENABLE_FAST_MATH: False})
def backward_grads_kernel(
    # task config
    H: int, HV: int, K: int, V: int, dtype: str, l2norm: bool = True,
    # kernel config
    threads: int = 256,
):
    """Grid (NC, H), `threads` threads.

    q, k [Tt, H, K], v, do [Tt, HV, V] dtype; g, beta [Tt, HV] fp32; chunks [NC, 2] int32 = (first
    token, valid tokens); Ai, P [NC, HV, C, C] dtype (prepare.py); states, dstates [NC, HV, K, V]
    dtype: every chunk's start state and the adjoint of its end state; sdc [NC, HV, V] fp32: the adjoint
    walk's correction of <S, dS> (backward_dh.py; zero where it has none); sc the scale of q.
    Writes dq, dk [Tt, H, K] dtype and dg, dbeta [Tt, HV] fp32, every valid token once.
    """
    C = CHUNK
    GQ = HV // H
    assert K == 2 * C and V == K, "K = V = 128: the <S, dS> fold, and [C, K] products in [C, V] fragments"
    Tt, NC = T.dynamic("Tt, NC")
    acc = "float32"

    @T.macro
    def normalised(x, Xn_s, r_s, tmp, raw, sq, t0, n, hk):
        # Xn_s = bf16(rows of x / ||x||) (1 / ||x|| in r_s; 1 without l2norm), pad rows (i >= n) 0;
        # tmp: a [C, K] fp32 fragment used for the squares.
        for i, d in T.Parallel(C, K):
            raw[i, d] = T.if_then_else(i < n, T.cast(x[t0 + i, hk, d], acc), 0.0)
        if l2norm:
            for i, d in T.Parallel(C, K):
                tmp[i, d] = raw[i, d] * raw[i, d]
            T.reduce_sum(tmp, sq, dim=1)
            for i in T.Parallel(C):
                r_s[i] = T.rsqrt(sq[i] + 1e-6)
        else:
            for i in T.Parallel(C):
                r_s[i] = 1.0
        for i, d in T.Parallel(C, K):
            Xn_s[i, d] = T.cast(raw[i, d] * r_s[i], dtype)

    @T.macro
    def through_l2norm(Xn_s, r_s, dX, raw, sq):
        # dX <- r (dX - Xn <Xn, dX>): the gradient of the normalised rows taken back to the raw ones.
        for i, d in T.Parallel(C, K):
            raw[i, d] = T.cast(Xn_s[i, d], acc) * dX[i, d]
        T.reduce_sum(raw, sq, dim=1)
        for i, d in T.Parallel(C, K):
            dX[i, d] = r_s[i] * (dX[i, d] - T.cast(Xn_s[i, d], acc) * sq[i])

    @T.prim_func
    def kernel(
        q: T.Tensor((Tt, H, K), dtype),
        k: T.Tensor((Tt, H, K), dtype),
        v: T.Tensor((Tt, HV, V), dtype),
        do: T.Tensor((Tt, HV, V), dtype),
        g: T.Tensor((Tt, HV), acc),
        beta: T.Tensor((Tt, HV), acc),
        chunks: T.Tensor((NC, 2), "int32"),
        Ai: T.Tensor((NC, HV, C, C), dtype),
        P: T.Tensor((NC, HV, C, C), dtype),
        states: T.Tensor((NC, HV, K, V), dtype),
        dstates: T.Tensor((NC, HV, K, V), dtype),
        sdc: T.Tensor((NC, HV, V), acc),
        sc: T.float32,
        dq: T.Tensor((Tt, H, K), dtype),
        dk: T.Tensor((Tt, H, K), dtype),
        dg: T.Tensor((Tt, HV), acc),
        dbeta: T.Tensor((Tt, HV), acc),
    ):
        with T.Kernel(NC, H, threads=threads) as (ic, hk):
            t0 = chunks[ic, 0]
            n = chunks[ic, 1]
            tx = T.get_thread_binding()

            Qn_s = T.alloc_shared((C, K), dtype)
            Kn_s = T.alloc_shared((C, K), dtype)
            S_s = T.alloc_shared((K, V), dtype)
            dS_s = T.alloc_shared((K, V), dtype)
            V_s = T.alloc_shared((C, V), dtype)
            dO_s = T.alloc_shared((C, V), dtype)
            X_s = T.alloc_shared((C, V), dtype)       # Y, then dVd, then T
            Vd_s = T.alloc_shared((C, V), dtype)
            Ai_s = T.alloc_shared((C, C), dtype)
            P_s = T.alloc_shared((C, C), dtype)
            M1_s = T.alloc_shared((C, C), dtype)      # Ai diag(b), then sc Gamma . dP
            dKK_s = T.alloc_shared((C, C), dtype)
            # The gates of every v-head of the group, set up once per program (the prologue below), and
            # the current v-head's row of each: the loops over a v-head index 1-D arrays, whose extent
            # the barrier placement can see (indexed by the v-head, it put barriers inside them).
            g_raw = T.alloc_shared((GQ, C), acc)
            G_all = T.alloc_shared((GQ, C), acc)
            gam_all = T.alloc_shared((GQ, C), acc)
            e_all = T.alloc_shared((GQ, C), acc)
            b_all = T.alloc_shared((GQ, C), acc)
            G_s = T.alloc_shared((C,), acc)           # cumulative gate (natural units)
            gam_s = T.alloc_shared((C,), acc)         # exp(G_i)
            e_s = T.alloc_shared((C,), acc)           # exp(G_C - G_i)
            b_s = T.alloc_shared((C,), acc)
            dG_s = T.alloc_shared((C,), acc)
            ed_s = T.alloc_shared((C,), acc)          # e_i <Kn dS, Vd>_i
            sd_s = T.alloc_shared((C,), acc)          # row sums of S . dS
            rq_s = T.alloc_shared((C,), acc)
            rk_s = T.alloc_shared((C,), acc)

            raw = T.alloc_fragment((C, K), acc)
            sq = T.alloc_fragment((C,), acc)
            kk = T.alloc_fragment((C, C), acc)
            dQn = T.alloc_fragment((C, K), acc)
            dKn = T.alloc_fragment((C, K), acc)
            F1 = T.alloc_fragment((C, V), acc)
            F2 = T.alloc_fragment((C, V), acc)
            F3 = T.alloc_fragment((C, V), acc)
            W1 = T.alloc_fragment((C, V), acc)
            R1 = T.alloc_fragment((C, C), acc)
            R2 = T.alloc_fragment((C, C), acc)
            MG = T.alloc_fragment((C, C), acc)
            # Row / column sums, one fragment each (a reduction's output takes its source's layout).
            r_qs = T.alloc_fragment((C,), acc)       # <dO_i, QS_i>
            r_ed = T.alloc_fragment((C,), acc)       # <Kn dS, Vd>_i
            r_ty = T.alloc_fragment((C,), acc)       # <T_i, Y_i>
            r_tk = T.alloc_fragment((C,), acc)       # <T_i, KS_i>
            r_lb = T.alloc_fragment((C,), acc)       # dbeta through Lg
            r_mr = T.alloc_fragment((C,), acc)       # row sums of MG
            r_mc = T.alloc_fragment((C,), acc)       # column sums of MG
            r_sd = T.alloc_fragment((C,), acc)       # S . dS, K rows folded onto C
            db_s = T.alloc_shared((C,), acc)
            run = T.alloc_local((1,), acc)
            # The dg epilogue's warp scans (module docstring): suffix sums of dG, prefix sums of ed, the total
            # of <S, dS>, two tokens a lane.
            suf = T.alloc_local((1,), acc)
            pre = T.alloc_local((1,), acc)
            tot = T.alloc_local((1,), acc)
            # exp(G_i) in registers, in the row layout of the [C, V] fragments, for the loop that also
            # stores to shared memory (which would otherwise reload it for every element).
            gam_v = T.alloc_fragment((C,), acc)

            # l2-normalised q, k rows (pad rows 0), in bf16 like the forward's operands.
            normalised(q, Qn_s, rq_s, dQn, raw, sq, t0, n, hk)
            normalised(k, Kn_s, rk_s, dKn, raw, sq, t0, n, hk)
            T.gemm(Kn_s, Kn_s, kk, transpose_B=True, clear_accum=True)
            T.clear(dQn)
            T.clear(dKn)

            # Gates of the group's v-heads, once (not per v-head, where two warps would walk the sums while
            # six wait): G by an inclusive prefix sum, one (v-head, token) a thread, the same additions in
            # the same order as prepare.py's (masked terms add +0), so Gamma here is bit for bit the Gamma in
            # Ai and P (a warp scan's different order moved dg by 1e-2 on decaying heads); then the gate
            # factors of each row, exp'd once.
            for hi, i in T.Parallel(GQ, C):
                g_raw[hi, i] = T.if_then_else(i < n, g[t0 + i, hk * GQ + hi], 0.0)
                b_all[hi, i] = T.if_then_else(i < n, beta[t0 + i, hk * GQ + hi], 0.0)
            for base in range((GQ * C + threads - 1) // threads):
                idx = base * threads + tx
                if idx < GQ * C:
                    run[0] = 0.0
                    for j in T.unroll(C):
                        run[0] = run[0] + T.if_then_else(j <= idx % C, g_raw[idx // C, j], 0.0)
                    G_all[idx // C, idx % C] = run[0]
            for hi, i in T.Parallel(GQ, C):
                gam_all[hi, i] = T.exp2(G_all[hi, i] * LOG2E)
                e_all[hi, i] = T.exp2((G_all[hi, C - 1] - G_all[hi, i]) * LOG2E)

            # A chunk row without valid tokens (a padding row of a packed plan) walks no v-head: it
            # writes nothing either way. Not for GQ = 1, where a loop of one static step is no loop
            # and the shared-memory plan of the kernel as measured (191 KB at 32/32) would change.
            for hi in T.serial(GQ if GQ == 1 else T.if_then_else(n > 0, GQ, 0)):
                hv = hk * GQ + hi
                T.copy(states[ic, hv, :, :], S_s)
                T.copy(dstates[ic, hv, :, :], dS_s)
                for i, d in T.Parallel(C, V):
                    V_s[i, d] = T.if_then_else(i < n, v[t0 + i, hv, d], T.cast(0, dtype))
                    dO_s[i, d] = T.if_then_else(i < n, do[t0 + i, hv, d], T.cast(0, dtype))
                T.copy(Ai[ic, hv, :, :], Ai_s)
                T.copy(P[ic, hv, :, :], P_s)
                for i in T.Parallel(C):
                    G_s[i] = G_all[hi, i]
                    gam_s[i] = gam_all[hi, i]
                    e_s[i] = e_all[hi, i]
                    b_s[i] = b_all[hi, i]
                for i in T.Parallel(C):
                    gam_v[i] = gam_s[i]

                # Forward terms: KS, QS, Y, Vd.
                T.wgmma_gemm(Kn_s, S_s, F1, clear_accum=True)      # waited for by the next T.gemm
                T.gemm(Qn_s, S_s, F2, clear_accum=True)
                for i, d in T.Parallel(C, V):
                    W1[i, d] = T.cast(dO_s[i, d], acc) * F2[i, d]
                T.reduce_sum(W1, r_qs, dim=1)
                for i in T.Parallel(C):
                    dG_s[i] = sc * gam_s[i] * r_qs[i]
                for i, d in T.Parallel(C, V):
                    X_s[i, d] = T.cast(T.cast(V_s[i, d], acc) - gam_v[i] * F1[i, d], dtype)
                for i, j in T.Parallel(C, C):
                    M1_s[i, j] = T.cast(T.cast(Ai_s[i, j], acc) * b_s[j], dtype)
                T.gemm(M1_s, X_s, F2, clear_accum=True)        # Vd
                for i, d in T.Parallel(C, V):
                    Vd_s[i, d] = T.cast(F2[i, d], dtype)

                # dVd = P^T dO + diag(e) Kn dS; <Kn dS, Vd> for the gate first.
                T.gemm(Kn_s, dS_s, F3, clear_accum=True)
                for i, d in T.Parallel(C, V):
                    W1[i, d] = F3[i, d] * F2[i, d]
                T.reduce_sum(W1, r_ed, dim=1)
                for i in T.Parallel(C):
                    ed_s[i] = r_ed[i] * e_s[i]                                   # e_i <Kn dS, Vd>_i
                for i, d in T.Parallel(C, V):
                    F3[i, d] = F3[i, d] * e_s[i]
                T.gemm(P_s, dO_s, F3, transpose_A=True)
                for i, d in T.Parallel(C, V):
                    X_s[i, d] = T.cast(F3[i, d], dtype)
                # T = Ai^T dVd
                T.gemm(Ai_s, X_s, F3, transpose_A=True, clear_accum=True)
                for i, d in T.Parallel(C, V):
                    W1[i, d] = F3[i, d] * (T.cast(V_s[i, d], acc) - gam_s[i] * F1[i, d])
                T.reduce_sum(W1, r_ty, dim=1)         # dbeta through Vd's diag(b)
                for i, d in T.Parallel(C, V):
                    W1[i, d] = F3[i, d] * F1[i, d]
                T.reduce_sum(W1, r_tk, dim=1)
                for i in T.Parallel(C):
                    dG_s[i] = dG_s[i] - gam_s[i] * b_s[i] * r_tk[i]
                    db_s[i] = r_ty[i]
                for i, d in T.Parallel(C, V):
                    X_s[i, d] = T.cast(F3[i, d], dtype)

                # The in-chunk matrices: dLg from T Vd^T, dP from dO Vd^T.
                T.wgmma_gemm(X_s, Vd_s, R1, transpose_B=True, clear_accum=True)
                T.gemm(dO_s, Vd_s, R2, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(C, C):
                    gam_ij = T.if_then_else(i >= j, T.exp2((G_s[i] - G_s[j]) * LOG2E), 0.0)
                    dlg = T.if_then_else(i > j, -R1[i, j], 0.0)
                    dp = T.if_then_else(i >= j, R2[i, j], 0.0)
                    dKK_s[i, j] = T.cast(dlg * b_s[i] * gam_ij, dtype)
                    M1_s[i, j] = T.cast(sc * gam_ij * dp, dtype)
                    R1[i, j] = dlg * gam_ij * kk[i, j]                         # dbeta through Lg
                    # dLg . Lg + dP . P off the diagonal: Gamma_ii = 1 has no gate derivative, and its
                    # O(1) entry would enter the row sum and the column sum only to cancel (the fp32
                    # rounding of that difference is what remains where the decay makes dg ~ 0).
                    MG[i, j] = T.if_then_else(i > j, R1[i, j] * b_s[i] + dp * T.cast(P_s[i, j], acc), 0.0)
                T.reduce_sum(R1, r_lb, dim=1)
                for i in T.Parallel(C):
                    db_s[i] = db_s[i] + r_lb[i]
                T.reduce_sum(MG, r_mr, dim=1)
                for i in T.Parallel(C):
                    dG_s[i] = dG_s[i] + r_mr[i]
                T.reduce_sum(MG, r_mc, dim=0)
                for j in T.Parallel(C):
                    dG_s[j] = dG_s[j] - r_mc[j]
                # The chunk-end gate gC <S, dS>, which every token gets: here the row sums of S . dS
                # (K = 2 C rows folded onto C), added up in the dg loop below.
                for i, d in T.Parallel(C, V):
                    W1[i, d] = T.cast(S_s[i, d], acc) * T.cast(dS_s[i, d], acc) \
                        + T.cast(S_s[i + C, d], acc) * T.cast(dS_s[i + C, d], acc)
                T.reduce_sum(W1, r_sd, dim=1)
                for i in T.Parallel(C):
                    sd_s[i] = r_sd[i] + sdc[ic, hv, i] + sdc[ic, hv, i + C]   # + the walk's fp32 correction

                # dq, dk contributions of this v-head.
                T.gemm(dO_s, S_s, F1, transpose_B=True, clear_accum=True)   # dO S^T  [C, K]
                for i, d in T.Parallel(C, K):
                    dQn[i, d] = dQn[i, d] + sc * gam_s[i] * F1[i, d]
                T.gemm(M1_s, Kn_s, dQn)
                T.gemm(X_s, S_s, F1, transpose_B=True, clear_accum=True)    # T S^T
                for i, d in T.Parallel(C, K):
                    dKn[i, d] = dKn[i, d] - gam_s[i] * b_s[i] * F1[i, d]
                T.gemm(Vd_s, dS_s, F1, transpose_B=True, clear_accum=True)  # Vd dS^T
                for i, d in T.Parallel(C, K):
                    dKn[i, d] = dKn[i, d] + e_s[i] * F1[i, d]
                T.gemm(M1_s, Qn_s, dKn, transpose_A=True)
                T.gemm(dKK_s, Kn_s, dKn)
                T.gemm(dKK_s, Kn_s, dKn, transpose_A=True)

                # dg_t = sum_{j >= t} dG_j + gC <S, dS> + sum_{j < t} e_j <Kn dS, Vd>_j (module docstring:
                # the e terms enter as an exclusive prefix sum, not as a total minus a suffix, which would
                # cancel catastrophically where e_t ~ 1 and dg_t ~ 0); dbeta. One warp, tokens 2l and 2l + 1
                # on lane l: a suffix scan of dG, a prefix scan of ed and the total of <S, dS> over the lanes
                # by shuffles (three block-wide scans before), each token's sums then formed by additions
                # only.
                if tx < 32:
                    suf[0] = dG_s[2 * tx] + dG_s[2 * tx + 1]
                    pre[0] = ed_s[2 * tx] + ed_s[2 * tx + 1]
                    tot[0] = sd_s[2 * tx] + sd_s[2 * tx + 1]
                    for k in range(5):
                        ys = T.shfl_down(suf[0], 1 << k)
                        yp = T.shfl_up(pre[0], 1 << k)
                        yt = T.shfl_xor(tot[0], 1 << k)
                        suf[0] = suf[0] + T.if_then_else(tx + (1 << k) < 32, ys, 0.0)
                        pre[0] = pre[0] + T.if_then_else(tx >= (1 << k), yp, 0.0)
                        tot[0] = tot[0] + yt
                    # suf: dG over tokens >= 2 l; pre: ed over tokens <= 2 l + 1. The next lane's suffix and
                    # the previous lane's prefix give each token's sums without a subtraction.
                    ys = T.shfl_down(suf[0], 1)
                    yp = T.shfl_up(pre[0], 1)
                    r1 = dG_s[2 * tx + 1] + T.if_then_else(tx < 31, ys, 0.0)
                    e0 = T.if_then_else(tx > 0, yp, 0.0)
                    end = gam_s[C - 1] * tot[0]
                    if 2 * tx < n:
                        dg[t0 + 2 * tx, hv] = dG_s[2 * tx] + r1 + e0 + end
                        dbeta[t0 + 2 * tx, hv] = db_s[2 * tx]
                    if 2 * tx + 1 < n:
                        dg[t0 + 2 * tx + 1, hv] = r1 + e0 + ed_s[2 * tx] + end
                        dbeta[t0 + 2 * tx + 1, hv] = db_s[2 * tx + 1]

            # Through the l2norm: dx = R (dXn - Xn <Xn, dXn>).
            if l2norm:
                through_l2norm(Qn_s, rq_s, dQn, raw, sq)
                through_l2norm(Kn_s, rk_s, dKn, raw, sq)
            # Out through shared memory (Qn_s, Kn_s are done with): whole 16-byte row pieces to global
            # memory instead of the accumulator layout's 4-byte pairs.
            for i, d in T.Parallel(C, K):
                Qn_s[i, d] = T.cast(dQn[i, d], dtype)
                Kn_s[i, d] = T.cast(dKn[i, d], dtype)
            for i, d in T.Parallel(C, K):
                if i < n:
                    dq[t0 + i, hk, d] = Qn_s[i, d]
                    dk[t0 + i, hk, d] = Kn_s[i, d]

    return kernel
