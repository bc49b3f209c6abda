"""Composition of the segment summaries into start states (DESIGN §2), one launch for all sequences.

Along each sequence, in float32:

    Z[0] = h0[n] (or 0),    Z[j + 1] = M_j Z[j] + S_ext_j,    j = 0 .. J_n - 1

and Z[j] is the start state of the sequence's segment j in the main pass. The steps are sequential,
but sequences, v-heads and blocks of state columns are independent: one program each. This replaces
one batched torch product per segment boundary (segments.compose with backend "torch" is the reference; this kernel is its "tilelang" implementation), whose
host cost (about 20 us a launch) dominated the op for few heads and many segments (8/2 heads x 32768
tokens: 16 segments, 15 steps, ~0.3 ms of host time against ~0.25 ms of GPU work).

Thread k of a program owns row k of its block of Z (BVc columns in registers); M_j is staged in shared
memory with a padded row (row k read by thread k: no bank conflicts), Z[j] in shared memory read as
broadcasts. Plain float32 FMAs, no tensor cores (tf32 would round the states).
"""

import tilelang
import tilelang.language as T


@tilelang.jit(pass_configs={tilelang.PassConfigKey.TL_ENABLE_FAST_MATH: False})
def compose_kernel(
    # task config
    HV: int, K: int, V: int, has_initial: bool = False,
    # kernel config
    BVc: int = 16,
):
    """Grid (V / BVc, HV, NQ), K threads.

    summ [NSS, HV, K, K + V] fp32 ([M | S_ext] per summary row); h0 [NI, HV, K, V] fp32 (read with
    has_initial); meta [NQ, 2] int32 = (J, h0 row) per sequence; srow [NQ, MJ] int32 = summary row of
    step j (j < J); zrow [NQ, MJ + 1] int32 = main-pass row of segment j (j <= J); out [NS, HV, K, V]
    fp32: every main-pass row written once."""
    assert V % BVc == 0 and K <= 1024, (K, V, BVc)
    NSS, NI, NQ, MJ, MJ1, NS = T.dynamic("NSS, NI, NQ, MJ, MJ1, NS")
    acc = "float32"

    @T.prim_func
    def kernel(
        summ: T.Tensor((NSS, HV, K, K + V), acc),
        h0: T.Tensor((NI, HV, K, V), acc),
        meta: T.Tensor((NQ, 2), "int32"),
        srow: T.Tensor((NQ, MJ), "int32"),
        zrow: T.Tensor((NQ, MJ1), "int32"),
        out: T.Tensor((NS, HV, K, V), acc),
    ):
        with T.Kernel(V // BVc, HV, NQ, threads=K) as (bv, hv, q):
            tx = T.get_thread_binding()
            c0 = bv * BVc
            J = meta[q, 0]
            n = meta[q, 1]
            M_s = T.alloc_shared((K, K + 1), acc)     # + 1: row tx read by thread tx, conflict-free
            Z_s = T.alloc_shared((K, BVc), acc)
            z = T.alloc_local((BVc,), acc)

            for v in T.unroll(BVc):
                z[v] = h0[n, hv, tx, c0 + v] if has_initial else T.float32(0)
                Z_s[tx, v] = z[v]
                out[zrow[q, 0], hv, tx, c0 + v] = z[v]
            for j in T.serial(J):
                r = srow[q, j]
                T.sync_threads()                      # Z_s holds Z[j]; M_s is free
                for k, i in T.Parallel(K, K):
                    M_s[k, i] = summ[r, hv, k, i]
                T.sync_threads()
                for v in T.unroll(BVc):
                    z[v] = summ[r, hv, tx, K + c0 + v]
                for i in T.serial(K):
                    for v in T.unroll(BVc):
                        z[v] = z[v] + M_s[tx, i] * Z_s[i, v]
                T.sync_threads()                      # every thread has read Z[j]
                for v in T.unroll(BVc):
                    Z_s[tx, v] = z[v]
                    out[zrow[q, j + 1], hv, tx, c0 + v] = z[v]

    return kernel
