"""Per-chunk preparation: the in-chunk cumulative gate and the gate-free 64 x 64 inverse (DESIGN §1).

For every (chunk, v-head), in parallel over all chunks:

    G    = log2(e) * cumsum(g) over the chunk's valid tokens (pad tokens get g = 0, so G stays flat
           there); log2 units so the forward kernel's decay factors are single exp2 instructions
    beta = beta of the valid tokens, 0 on pad tokens
    A    = (I + StrictLower(diag(beta) K K^T))^-1           no gate: depends on k and beta only

Pad tokens (past the end of their sequence in the last chunk) get beta = 0, so their row of L is 0,
their row of A is e_i and they leave the state unchanged in the forward kernel.

Outputs are chunk-indexed (not token-indexed), so the last chunk of one packed sequence never writes
over the next sequence's tokens: Gc [NC, HV, C] fp32, Bc [NC, HV, C] fp32, A [NC, HV, C, C] in the
input dtype (it is a tensor-core operand there).

The inverse is a forward substitution in which thread c owns column c of A in 64 registers: row r of
column c is delta_rc - sum_{j<r} L[r, j] A[j, c], with L read from shared memory as a broadcast, so no
barrier is needed between rows. It is exact float32 arithmetic; only the final store rounds to the
input dtype.
"""


import tilelang
import tilelang.language as T

CHUNK = 64
LOG2E = 1.4426950408889634


@T.macro
def inv_row_norms(X_s, r_s):
    """r_s[i] = 1 / sqrt(sum_d X_s[i, d]^2 + 1e-6) (eps as inputs.l2norm), summed in float32.
    X_s [rows, cols] in shared memory, r_s [rows]. The l2norm of q and k rows, by prepare and forward."""
    rows, cols = X_s.shape
    xf = T.alloc_fragment((rows, cols), "float32")
    nx = T.alloc_fragment((rows,), "float32")
    T.copy(X_s, xf)
    for i, d in T.Parallel(rows, cols):
        xf[i, d] = xf[i, d] * xf[i, d]
    T.reduce_sum(xf, nx, dim=1)
    for i in T.Parallel(rows):
        r_s[i] = T.rsqrt(nx[i] + 1e-6)


@tilelang.jit(pass_configs={tilelang.PassConfigKey.TL_ENABLE_FAST_MATH: False})
def prepare_kernel(
    # task config
    H: int, HV: int, K: int, dtype: str, l2norm: bool = False,
    # kernel config
    threads: int = 128,
):
    """Grid (NC, HV). k [Tt, H, K] dtype; g, beta [Tt, HV] fp32; chunks [NC, 2] int32 = (first token,
    valid tokens). Writes Gc, Bc [NC, HV, C] fp32 and A [NC, HV, C, C] dtype; with l2norm also
    Rk [NC, HV, C] = 1 / ||k|| (k itself is never rewritten: the forward folds Rk into its factors).
    (The rs forward's chunk factors come from prepare_rs.py instead.)"""
    C = CHUNK
    GQ = HV // H
    Tt, NC = T.dynamic("Tt, NC")
    acc = "float32"

    @T.prim_func
    def kernel(
        k: T.Tensor((Tt, H, K), dtype),
        g: T.Tensor((Tt, HV), acc),
        beta: T.Tensor((Tt, HV), acc),
        chunks: T.Tensor((NC, 2), "int32"),
        Gc: T.Tensor((NC, HV, C), acc),
        Bc: T.Tensor((NC, HV, C), acc),
        Rk: T.Tensor((NC, HV, C), acc),
        A: T.Tensor((NC, HV, C, C), dtype),
    ):
        with T.Kernel(NC, HV, threads=threads) as (ic, hv):
            hk = hv // GQ
            t0 = chunks[ic, 0]
            n = chunks[ic, 1]
            K_s = T.alloc_shared((C, K), dtype)
            g_s = T.alloc_shared((C,), acc)
            b_s = T.alloc_shared((C,), acc)
            L_s = T.alloc_shared((C, C), acc)
            r_s = T.alloc_shared((C,), acc)
            kkt = T.alloc_fragment((C, C), acc)
            x = T.alloc_local((C,), acc)

            for i, d in T.Parallel(C, K):
                K_s[i, d] = T.if_then_else(i < n, k[t0 + i, hk, d], T.cast(0, dtype))
            for i in T.Parallel(C):
                g_s[i] = T.if_then_else(i < n, g[t0 + i, hv], 0.0)
                b_s[i] = T.if_then_else(i < n, beta[t0 + i, hv], 0.0)
            if l2norm:
                # 1 / ||k_i||; K K^T of unit rows = diag(r) K K^T diag(r).
                inv_row_norms(K_s, r_s)
            T.gemm(K_s, K_s, kkt, transpose_B=True, clear_accum=True)
            if l2norm:
                for i, j in T.Parallel(C, C):
                    L_s[i, j] = T.if_then_else(i > j, b_s[i] * r_s[i] * r_s[j] * kkt[i, j], 0.0)
            else:
                for i, j in T.Parallel(C, C):
                    L_s[i, j] = T.if_then_else(i > j, b_s[i] * kkt[i, j], 0.0)
            T.cumsum(src=g_s, dst=g_s, dim=0)
            for i in T.Parallel(C):
                Gc[ic, hv, i] = g_s[i] * LOG2E
                Bc[ic, hv, i] = b_s[i]
                if l2norm:
                    Rk[ic, hv, i] = r_s[i]

            tx = T.get_thread_binding()
            if tx < C:
                for r in T.unroll(C):
                    x[r] = T.if_then_else(tx == r, 1.0, 0.0)
                    for j in T.unroll(r):
                        x[r] = x[r] - L_s[r, j] * x[j]
                for r in T.unroll(C):
                    A[ic, hv, r, tx] = T.cast(x[r], dtype)

    return kernel
