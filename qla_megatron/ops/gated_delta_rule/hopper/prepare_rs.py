"""Chunk factors of the register-state forward (forward_rs.py), HP v-heads per program.

For every (chunk, v-head), in parallel over all chunks (G = cumsum g over the chunk's valid tokens in
natural-log units, Gamma[r, c] = exp(G_r - G_c); Rk, Rq = 1 / ||k||, 1 / ||q|| with l2norm, else 1;
Kn = diag(Rk) K; sc the scale of q):

    Ag [NC, HV, C, C] dtype  (Gamma . A) diag(beta),  A = (I + StrictLower(diag(beta) Kn Kn^T))^-1,
                             exactly 0 above the diagonal
    P  [NC, HV, C, C] dtype  sc diag(Rq) (Gamma . Q K^T) diag(Rk), lower
    F  [NC, HV, 4, C] fp32   rows exp(G) Rk, exp(G_C - G) Rk, sc exp(G) Rq, exp(G_C)

Pad tokens (past the end of their sequence in the last chunk) read q = k = 0, g = beta = 0: their rows
of L are 0, G stays flat over them, and they leave the state unchanged in the forward.

How, for speed (its predecessor, a rs_factors mode of prepare.py with one v-head a program, took
0.99 ms against this kernel's 0.61 ms at 32/16 x 32k on an H100, 54% of the op):

- The v-heads of one qk-head share q, k: a program takes HP of them (HP = 2 when HV / H is even), so q
  and k are loaded, and K K^T, Q K^T formed, once for both; the 128 threads then solve the two
  triangular systems at once (threads 0-63 the first head's columns, 64-127 the second's).
- 1 / ||k|| and 1 / ||q|| are read off the diagonals of K K^T and Q Q^T (tensor-core products)
  instead of fp32 copies of the q and k tiles reduced row by row, which held 128 registers a thread.
- The inverse is a forward substitution in which thread c owns column c of A in 64 registers: row r
  of column c is delta_rc - sum_{j<r} L[r, j] A[j, c], with L read from shared memory as a broadcast
  (four consecutive entries of a row a 128-bit load), summed in four interleaved partial sums (a dependent chain
  of ~r / 4 FMAs for row r instead of r). Exact float32; only the final store rounds to the dtype.
- Ag and P are staged in shared memory and leave as whole tiles (TMA stores).
"""

import tilelang
import tilelang.language as T

CHUNK = 64
LOG2E = 1.4426950408889634


@tilelang.jit(pass_configs={tilelang.PassConfigKey.TL_ENABLE_FAST_MATH: False})
def prepare_rs_kernel(
    # task config
    H: int, HV: int, K: int, dtype: str, l2norm: bool = True,
    # kernel config
    HP: int = 2, min_blocks: int = 4,
):
    """Grid (NC, HV / HP), 128 threads. q, k [Tt, H, K] dtype; g, beta [Tt, HV] fp32; chunks [NC, 2]
    int32 = (first token, valid tokens); sc the scale of q. Writes Ag, P, F (module docstring)."""
    C = CHUNK
    GQ = HV // H
    assert HP in (1, 2) and GQ % HP == 0, (HV, H, HP)
    Tt, NC = T.dynamic("Tt, NC")
    acc = "float32"
    threads = 128

    @T.prim_func
    def kernel(
        q: T.Tensor((Tt, H, K), dtype),
        k: T.Tensor((Tt, H, K), dtype),
        g: T.Tensor((Tt, HV), acc),
        beta: T.Tensor((Tt, HV), acc),
        chunks: T.Tensor((NC, 2), "int32"),
        sc: T.float32,
        Ag: T.Tensor((NC, HV, C, C), dtype),
        P: T.Tensor((NC, HV, C, C), dtype),
        F: T.Tensor((NC, HV, 4, C), acc),
    ):
        with T.Kernel(NC, HV // HP, threads=threads) as (ic, hp):
            # Registers for min_blocks programs an SM (the substitution's unrolled loop takes all 255
            # otherwise, for two).
            T.annotate_min_blocks_per_sm(min_blocks)
            hv0 = hp * HP
            hk = hv0 // GQ
            t0 = chunks[ic, 0]
            n = chunks[ic, 1]
            K_s = T.alloc_shared((C, K), dtype)
            Q_s = T.alloc_shared((C, K), dtype)
            g_raw = T.alloc_shared((HP, C), acc)
            g_s = T.alloc_shared((HP, C), acc)        # G = cumsum g over the chunk (natural units)
            b_s = T.alloc_shared((HP, C), acc)
            r_s = T.alloc_shared((C,), acc)           # 1 / ||k_i||
            rq_s = T.alloc_shared((C,), acc)          # 1 / ||q_i||
            L_s = T.alloc_shared((HP, C, C), acc)
            A_s = T.alloc_shared((HP, C, C), dtype)   # Ag, staged
            P_s = T.alloc_shared((HP, C, C), dtype)
            kkt = T.alloc_fragment((C, C), acc)
            qk = T.alloc_fragment((C, C), acc)
            x = T.alloc_local((C,), acc)
            part = T.alloc_local((4,), acc)
            run = T.alloc_local((1,), acc)

            for i, d in T.Parallel(C, K):
                K_s[i, d] = T.if_then_else(i < n, k[t0 + i, hk, d], T.cast(0, dtype))
                Q_s[i, d] = T.if_then_else(i < n, q[t0 + i, hk, d], T.cast(0, dtype))
            for h, i in T.Parallel(HP, C):
                g_raw[h, i] = T.if_then_else(i < n, g[t0 + i, hv0 + h], 0.0)
                b_s[h, i] = T.if_then_else(i < n, beta[t0 + i, hv0 + h], 0.0)
            T.gemm(K_s, K_s, kkt, transpose_B=True, clear_accum=True)
            if l2norm:
                # ||q_i||^2 from the diagonal of Q Q^T (qk holds it until Q K^T overwrites it).
                T.gemm(Q_s, Q_s, qk, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(C, C):
                    if i == j:
                        r_s[i] = T.rsqrt(kkt[i, j] + 1e-6)
                        rq_s[i] = T.rsqrt(qk[i, j] + 1e-6)
            else:
                for i in T.Parallel(C):
                    r_s[i] = 1.0
                    rq_s[i] = 1.0
            T.gemm(Q_s, K_s, qk, transpose_B=True, clear_accum=True)

            tx = T.get_thread_binding()
            # Inclusive prefix sums, one (head, token) a thread: the same additions in the same order
            # as a sequential cumsum.
            if tx < HP * C:
                run[0] = 0.0
                for j in T.serial(C):
                    if j <= tx % C:
                        run[0] = run[0] + g_raw[tx // C, j]
                g_s[tx // C, tx % C] = run[0]

            for h, i, j in T.Parallel(HP, C, C):
                L_s[h, i, j] = T.if_then_else(i > j, b_s[h, i] * r_s[i] * r_s[j] * kkt[i, j], 0.0)
            for h, i, j in T.Parallel(HP, C, C):
                P_s[h, i, j] = T.cast(T.if_then_else(
                    i >= j, sc * rq_s[i] * r_s[j] * qk[i, j] * T.exp2((g_s[h, i] - g_s[h, j]) * LOG2E), 0.0),
                    dtype)
            for h, i in T.Parallel(HP, C):
                F[ic, hv0 + h, 0, i] = T.exp2(g_s[h, i] * LOG2E) * r_s[i]
                F[ic, hv0 + h, 1, i] = T.exp2((g_s[h, C - 1] - g_s[h, i]) * LOG2E) * r_s[i]
                F[ic, hv0 + h, 2, i] = sc * T.exp2(g_s[h, i] * LOG2E) * rq_s[i]
                F[ic, hv0 + h, 3, i] = T.exp2(g_s[h, C - 1] * LOG2E)

            # Column c = tx % C of head tx // C: A[:, c] by forward substitution, then
            # Ag[r, c] = A[r, c] exp(G_r - G_c) beta_c (the exp only where r >= c: it overflows above).
            if tx < HP * C:
                for r in T.unroll(C):
                    for u in T.unroll(4):
                        part[u] = 0.0
                    for j in T.unroll(r):
                        part[j % 4] = part[j % 4] + L_s[tx // C, r, j] * x[j]
                    x[r] = T.if_then_else(tx % C == r, 1.0, 0.0) - ((part[0] + part[1]) + (part[2] + part[3]))
                for r in T.unroll(C):
                    A_s[tx // C, r, tx % C] = T.cast(T.if_then_else(
                        r >= tx % C,
                        x[r] * T.exp2((g_s[tx // C, r] - g_s[tx // C, tx % C]) * LOG2E) * b_s[tx // C, tx % C],
                        0.0), dtype)
            for h in T.unroll(HP):
                T.copy(A_s[h, :, :], Ag[ic, hv0 + h, :, :])
                T.copy(P_s[h, :, :], P[ic, hv0 + h, :, :])

    return kernel
