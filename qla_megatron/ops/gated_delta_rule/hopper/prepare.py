"""Chunk factors of the register-state forward (forward.py), HP v-heads per program.

For every (chunk, v-head), in parallel over all chunks (G = cumsum g over the chunk's valid tokens in
natural-log units, Gamma[r, c] = exp(G_r - G_c); Rk, Rq = 1 / ||k||, 1 / ||q|| with l2norm, else 1;
Kn = diag(Rk) K; sc the scale of q):

    Ai [NC, HV, C, C] dtype  Gamma . A,  A = (I + StrictLower(diag(beta) Kn Kn^T))^-1, unit lower
                             triangular, exactly 0 above the diagonal (the gated inverse; beta is
                             applied by its users, so the backward has the inverse itself)
    P  [NC, HV, C, C] dtype  sc diag(Rq) (Gamma . Q K^T) diag(Rk), lower
    F  [NC, HV, 5, C] fp32   rows exp(G) Rk, exp(G_C - G) Rk, sc exp(G) Rq, exp(G_C), beta

Pad tokens (past the end of their sequence in the last chunk) read q = k = 0, g = beta = 0: their rows
of L are 0, G stays flat over them, and F's rows 0-2 and 4 are 0 there, so a kernel that loads whole
64-token tiles (the next sequence's tokens in the pad rows) gets no contribution from them.

How, for speed (its first version took 0.62 ms at 32/16 x 32768 on an H100, this one 0.39; the chunk
factors were 54% of the op before that, with one v-head a program):

- The v-heads of one qk-head share q, k: a program takes HP of them (4, 3 or 2, whichever divides
  HV / H; chunk.prepare_heads), so q and k are loaded, and K K^T, Q K^T formed, once for all; the
  threads then solve the HP triangular systems at once (thread t: column t % 64 of head t // 64; 256
  threads for HP > 2). The loads dominate a program, so this is worth 14-36% (48/16: 0.870 ms at
  HP = 1, 0.560 at HP = 3). With HV = H a program still takes two v-heads, each in its own qk-head pass
  (share_qk=False), to keep the substitution's threads busy.
- 1 / ||k|| and 1 / ||q|| are read off the diagonals of K K^T and Q Q^T (tensor-core products).
- Gamma . (I + L)^-1 = (I + Gamma . L)^-1 (with D = diag(exp G), Gamma . M = D M D^-1 for lower M), so
  the substitution inverts I + L_g, L_g[i, j] = beta_i Rk_i Rk_j kkt[i, j] Gamma[i, j] (i > j), and
  Ai[r, c] = x[r]: no exp in the Ai write. Gamma[i, j] is formed once per element and serves
  both L_g and P.
- Row and column factors (beta Rk, Rk, sc Rq, G log2 e) sit in fragments laid out like the K K^T
  accumulator, loaded once a thread instead of shared-memory reads per element.
- exp2 is ex2.approx.ftz (one MUFU; results below 2^-126 flush to 0). The kernel compiles without fast
  math, so the substitution is IEEE float32.
- The inverse is a forward substitution in which thread c owns column c of A in 64 registers, in
  blocks of 16 rows: a triangle within the block, then the block's columns applied to every row below
  as a rectangle (independent rows, one accumulator each), L read from shared memory as broadcasts.
  x[r] = 0 exactly for r < c, so Ai is exactly 0 above the diagonal.
- P leaves by TMA as soon as it is built, overlapping the substitution; Ai follows; one wait at the end.
"""

import tilelang
import tilelang.language as T

CHUNK = 64
LOG2E = 1.4426950408889634

_PRELUDE = r"""
__device__ __forceinline__ float qla_ex2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
"""


def _ex2(x):
    return T.call_extern("float32", "qla_ex2_ftz", x)


@tilelang.jit(pass_configs={tilelang.PassConfigKey.TL_ENABLE_FAST_MATH: False})
def prepare_kernel(
    # task config
    H: int, HV: int, K: int, dtype: str, l2norm: bool = True,
    # kernel config
    HP: int = 2, share_qk: bool = True, min_blocks: int = 0,
):
    """Grid (NC, HV / HP), 128 threads (256 for HP > 2); min_blocks 0: 512 / threads. q, k [Tt, H, K]
    dtype; g, beta [Tt, HV] fp32; chunks [NC, 2] int32 = (first token, valid tokens); sc the scale of
    q. Writes Ai, P, F (module docstring)."""
    C = CHUNK
    GQ = HV // H
    # share_qk: the HP v-heads of a program belong to one qk-head (HP divides HV / H), which is loaded
    # and multiplied once; otherwise each v-head's qk-head is loaded and multiplied in its own pass.
    assert HP in (1, 2, 3, 4) and (GQ % HP == 0 if share_qk else HP == 2 and HV % HP == 0), \
        (HV, H, HP, share_qk)
    HQ = 1 if share_qk else HP    # qk-head passes a program
    VPQ = HP // HQ                 # v-heads a pass serves: v-head h is pass h // VPQ's
    Tt, NC = T.dynamic("Tt, NC")
    acc = "float32"
    threads = 128 if HP <= 2 else 256   # the substitution takes one thread a column of each head
    min_blocks = min_blocks or 512 // threads
    # HP = 1 (3): threads 64..127 (192..255) idle in the substitution.

    B = 16

    @T.macro
    def tri(L_s, x, part, hh, col, r0):
        # rows r0 .. r0 + B - 1 from the columns r0 .. r - 1 of the same block
        for rr in T.unroll(B):
            part[0] = x[r0 + rr]
            part[1] = 0.0
            for jj in T.unroll(rr):
                part[jj % 2] = part[jj % 2] + L_s[hh, r0 + rr, r0 + jj] * x[r0 + jj]
            x[r0 + rr] = T.if_then_else(col == r0 + rr, 1.0, 0.0) - (part[0] + part[1])

    @T.macro
    def rect(L_s, x, hh, r_lo, r_hi, j0):
        # x[r] += L[r, j0 : j0 + B] x[j0 : j0 + B] for r in r_lo .. r_hi - 1 (a partial sum, not yet negated)
        for r in T.unroll(r_lo, r_hi):
            for jj in T.unroll(B):
                x[r] = x[r] + L_s[hh, r, j0 + jj] * x[j0 + jj]

    @T.prim_func
    def kernel(
        q: T.Tensor((Tt, H, K), dtype),
        k: T.Tensor((Tt, H, K), dtype),
        g: T.Tensor((Tt, HV), acc),
        beta: T.Tensor((Tt, HV), acc),
        chunks: T.Tensor((NC, 2), "int32"),
        sc: T.float32,
        Ai: T.Tensor((NC, HV, C, C), dtype),
        P: T.Tensor((NC, HV, C, C), dtype),
        F: T.Tensor((NC, HV, 5, C), acc),
    ):
        with T.Kernel(NC, HV // HP, threads=threads, prelude=_PRELUDE) as (ic, hp):
            T.annotate_min_blocks_per_sm(min_blocks)
            hv0 = hp * HP
            t0 = chunks[ic, 0]
            n = chunks[ic, 1]
            K_s = T.alloc_shared((C, K), dtype)
            Q_s = T.alloc_shared((C, K), dtype)
            g_raw = T.alloc_shared((HP, C), acc)
            g_s = T.alloc_shared((HP, C), acc)        # G = cumsum g over the chunk (natural units)
            b_s = T.alloc_shared((HP, C), acc)
            r_s = T.alloc_shared((HQ, C), acc)        # 1 / ||k_i||, per qk-head pass
            rq_s = T.alloc_shared((HQ, C), acc)       # 1 / ||q_i||
            L_s = T.alloc_shared((HP, C, C), acc)     # Gamma . L
            A_s = T.alloc_shared((HP, C, C), dtype)   # Ai, staged
            P_s = T.alloc_shared((HP, C, C), dtype)
            kkt = T.alloc_fragment((C, C), acc)
            qk = T.alloc_fragment((C, C), acc)
            # Row / column factors in the accumulator's layout.
            f_rl = T.alloc_fragment((C,), acc)        # beta_i Rk_i (head h)
            f_rg = T.alloc_fragment((C,), acc)        # G_i log2 e (head h)
            f_cg = T.alloc_fragment((C,), acc)        # G_j log2 e (head h)
            f_rq = T.alloc_fragment((C,), acc)        # sc Rq_i
            f_cr = T.alloc_fragment((C,), acc)        # Rk_j
            x = T.alloc_local((C,), acc)
            part = T.alloc_local((4,), acc)
            run = T.alloc_local((1,), acc)

            tx = T.get_thread_binding()
            for h, i in T.Parallel(HP, C):
                g_raw[h, i] = T.if_then_else(i < n, g[t0 + i, hv0 + h], 0.0)
                b_s[h, i] = T.if_then_else(i < n, beta[t0 + i, hv0 + h], 0.0)
            # Inclusive prefix sums, one (head, token) a thread: the same additions in the same order
            # as a sequential cumsum (masked terms add +0, exactly).
            if tx < HP * C:
                run[0] = 0.0
                for j in T.unroll(C):
                    gj = g_raw[tx // C, j]
                    run[0] = run[0] + T.if_then_else(j <= tx % C, gj, 0.0)
                g_s[tx // C, tx % C] = run[0]

            # One pass per distinct qk-head (HQ = 1 shared, else one per v-head), serving v-heads
            # h = qh VPQ + hi.
            for qh in T.unroll(HQ):
                hk = (hv0 + qh) // GQ
                T.sync_threads()   # the previous pass's products have read K_s, Q_s
                for i, d in T.Parallel(C, K):
                    K_s[i, d] = T.if_then_else(i < n, k[t0 + i, hk, d], T.cast(0, dtype))
                    Q_s[i, d] = T.if_then_else(i < n, q[t0 + i, hk, d], T.cast(0, dtype))
                T.gemm(K_s, K_s, kkt, transpose_B=True, clear_accum=True)
                if l2norm:
                    T.gemm(Q_s, Q_s, qk, transpose_B=True, clear_accum=True)
                    for i, j in T.Parallel(C, C):
                        if i == j:
                            r_s[qh, i] = T.rsqrt(kkt[i, j] + 1e-6)
                            rq_s[qh, i] = T.rsqrt(qk[i, j] + 1e-6)
                else:
                    for i in T.Parallel(C):
                        r_s[qh, i] = 1.0
                        rq_s[qh, i] = 1.0
                T.gemm(Q_s, K_s, qk, transpose_B=True, clear_accum=True)

                for i in T.Parallel(C):
                    f_rq[i] = sc * rq_s[qh, i]
                for j in T.Parallel(C):
                    f_cr[j] = r_s[qh, j]
                # Gamma[i, j] = 2^(G_i log2e - G_j log2e), <= 1 for i >= j; above the diagonal it may
                # be inf, and the select drops it. One head at a time: 16 column factors live, not 32.
                for hi in T.unroll(VPQ):
                    h = qh * VPQ + hi
                    for i in T.Parallel(C):
                        f_rl[i] = b_s[h, i] * r_s[qh, i]
                        f_rg[i] = g_s[h, i] * LOG2E
                    for j in T.Parallel(C):
                        f_cg[j] = g_s[h, j] * LOG2E
                    for i, j in T.Parallel(C, C):
                        w = f_cr[j] * _ex2(f_rg[i] - f_cg[j])
                        L_s[h, i, j] = T.if_then_else(i > j, (f_rl[i] * kkt[i, j]) * w, 0.0)
                        P_s[h, i, j] = T.cast(T.if_then_else(i >= j, (f_rq[i] * qk[i, j]) * w, 0.0), dtype)
            for h, i in T.Parallel(HP, C):
                F[ic, hv0 + h, 0, i] = T.if_then_else(i < n, _ex2(g_s[h, i] * LOG2E) * r_s[h // VPQ, i], 0.0)
                F[ic, hv0 + h, 1, i] = T.if_then_else(
                    i < n, _ex2((g_s[h, C - 1] - g_s[h, i]) * LOG2E) * r_s[h // VPQ, i], 0.0)
                F[ic, hv0 + h, 2, i] = T.if_then_else(i < n, sc * _ex2(g_s[h, i] * LOG2E) * rq_s[h // VPQ, i], 0.0)
                F[ic, hv0 + h, 3, i] = _ex2(g_s[h, C - 1] * LOG2E)
                F[ic, hv0 + h, 4, i] = b_s[h, i]
            for h in T.unroll(HP):
                T.tma_copy(P_s[h, :, :], P[ic, hv0 + h, :, :])

            # Column c of head tx // C: A_g[:, c] by forward substitution, in blocks of B rows: a
            # diagonal block is a triangle (x[r] enters holding the sum over earlier blocks), the
            # rows below it take its columns as a rectangle (rows independent: one accumulator each,
            # x[r] itself). x[r] = 0 exactly for r < c (the sums are of +0 terms). A chunk row without
            # valid tokens (a padding row of a packed plan) skips it: no kernel reads that row's Ai.
            if T.And(tx < HP * C, n > 0):
                hh = tx // C
                for r in T.unroll(C):
                    x[r] = 0.0
                for bi in T.unroll(C // B):
                    tri(L_s, x, part, hh, tx % C, bi * B)
                    rect(L_s, x, hh, bi * B + B, C, bi * B)
            # TileLang's planner counts P_s dead once its TMA store is issued and may place A_s on it
            # (it does for HP = 1): the store must have read P_s before anyone writes A_s. The wait is
            # the issuing thread's; the barrier (outside the branch: all threads) passes it on.
            T.tma_store_wait()
            T.sync_threads()
            if tx < HP * C:
                for r in T.unroll(C):
                    A_s[tx // C, r, tx % C] = T.cast(x[r], dtype)
            for h in T.unroll(HP):
                T.tma_copy(A_s[h, :, :], Ai[ic, hv0 + h, :, :])
            T.tma_store_wait()

    return kernel
