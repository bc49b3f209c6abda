"""Fused chunked forward, warp-specialized by hand (opt-in: QLA_MEGATRON_HOPPER_FORWARD=ws).

Same task, grid, math and outputs as forward.py (read its docstring first); what differs is who does
what. forward.py lets TileLang split one program into a copy warpgroup and two consumer warpgroups
that run every step of a chunk in sequence, so nothing of chunk i + 1 overlaps chunk i's state update
(measured on an H100: ~4.9 us of serial latency per chunk, benchmarks/results/ops_forward_h100.md).
Here the state-independent half of a chunk moves to its own warpgroup, one chunk ahead of the state:

    prep   (chunk i + 1, into shared slot (i + 1) % 2; G in log2 units, Rk = 1/||k||, Rq = 1/||q||)
        Ag  = (Gamma . A) diag(beta)                         written over A in its slot
        Wa  = diag(gamma) A diag(beta Rk)                    scratch
        Wn  = -(Wa K)                                        [C, K]   (minus the classic w)
        P   = scale diag(Rq) (Gamma . Q K^T) diag(Rk)        [C, C]   lower
        Qg  = scale diag(gamma Rq) Q                         written over Q in its slot
        Ke  = diag(exp(G_C - G) Rk) K                        written over K in its slot
    chain  (chunk i, the only dependency between chunks; S is K x BV fp32 in registers)
        Vd  = Ag V + Wn S                                    one accumulator, two wgmma
        O   = Qg S + P Vd
        S  <- exp(G_C) S + Ke^T Vd

With Ke the chain needs one bf16 copy of Vd (not Vd and exp(G_C - G) Vd as forward.py does), and with
Wn the subtraction U - W S is the accumulation itself. 1/||q|| comes from prepare (norm_q=True), so no
reduction sits on the chain either (plan item 2).

Warpgroups (384 threads, __launch_bounds__(384, 1): 168 registers a thread at entry):

    threads    warpgroup  role                                                      registers
    0-127      chain      S in registers; Vd, O, S update per chunk                 setmaxnreg 240
    128-255    prep       per chunk: Ag, Wn, P, Qg, Ke into the slot, 1 ahead      setmaxnreg 224
    256-287    load       one elected lane: TMA of q, k, v, A, G, beta, Rk, Rq      setmaxnreg 40
    288-319    (idle)     nothing after the register handover                       setmaxnreg 40
    320-383    store      o rows from O_s to device memory, masked at sequence end  setmaxnreg 40

mbarriers (shared), slot / buffer b = chunk % 2, phase parity (chunk // 2) & 1:

    name         count  arrived by                                       waited by
    loaded[b]    32 +tx load warp, after its TMA copies (expect_tx)      prep (the chain is covered by ready)
    ready[b]     128    prep, after fence.proxy.async on its writes      chain
    free[b]      128    chain, after its last wgmma of the chunk         load (before refilling slot b)
    o_full[b]    128    chain, after writing O_s[b]                      store
    o_empty[b]   64     store, after reading O_s[b]                      chain (before rewriting O_s[b])

The prep warpgroup reuses slot b only after loaded[b] fires again, which the load thread allows only
after free[b], i.e. after the chain is done with the chunk that slot held: so prep runs at most one
chunk ahead of the chain. Named barriers (bar.sync id, 128) order shared-memory writes inside one
warpgroup before its own wgmma: id 1 chain, id 2 prep; TileLang's storage-sync pass adds its own
128-thread ones inside the branches (ids 3 chain, 4 prep, seen in the generated source: 5 per chunk on
the chain, 4 on prep). Every generic write to shared memory that a wgmma reads next is followed by
fence.proxy.async in the writing thread. Registers used (SASS, CPU compile): producer 38, prep ~180,
chain ~157, no spills; 194 KB of dynamic shared memory (benchmarks/results/ops_forward_ws_cpu.md).

Summary mode (intra-card CP): state [M | S_ext] as in forward.py; no q, o, P, Qg; the programs whose
columns fall in M load no v: their V slots are zeroed once by the chain and never written again.

Nothing here has run on a GPU yet: compiled for sm_90a on a CPU only (see the issue-3 notes).
"""

import tilelang
import tilelang.language as T

CHUNK = 64

# Threads of each role (see the table above).
CHAIN, PREP, LOAD, STORE = 0, 128, 256, 320
THREADS = 384
# setmaxnreg budgets. The CTA holds 168 x 384 = 64512 registers from its launch, and an increase waits
# until the pool has the registers: 128 x (chain + prep + producer) must stay <= 64512, i.e. the three
# sum to <= 504 (as FlashAttention-3's 240 + 240 + 24), or the increase never returns.
NREG_CHAIN, NREG_PREP, NREG_PRODUCER = 240, 224, 40
assert NREG_CHAIN + NREG_PREP + NREG_PRODUCER <= 504


@tilelang.jit(pass_configs={tilelang.PassConfigKey.TL_ENABLE_FAST_MATH: True})
def forward_ws_kernel(
    # task config
    H: int, HV: int, K: int, V: int, dtype: str,
    summary: bool = False, has_initial: bool = False, store_final: bool = True,
    save_states: bool = False, l2norm: bool = False,
    # kernel config
    BV: int = 64,
):
    """Grid (W / BV, HV, NS), W = V (or K + V in summary mode). Arguments as forward_kernel's plus
    Rq [NC, HV, C] fp32 (1 / ||q|| from prepare with norm_q=True; read only with l2norm)."""
    C = CHUNK
    GQ = HV // H
    W = K + V if summary else V
    assert K % 64 == 0 and V % BV == 0 and W % BV == 0 and BV % 64 == 0, (K, V, BV)
    Tt, NC, NS, NI, NF, NH = T.dynamic("Tt, NC, NS, NI, NF, NH")
    acc = "float32"
    out = not summary

    @T.prim_func
    def kernel(
        q: T.Tensor((Tt, H, K), dtype),
        k: T.Tensor((Tt, H, K), dtype),
        v: T.Tensor((Tt, HV, V), dtype),
        Gc: T.Tensor((NC, HV, C), acc),
        Bc: T.Tensor((NC, HV, C), acc),
        Rk: T.Tensor((NC, HV, C), acc),
        Rq: T.Tensor((NC, HV, C), acc),
        A: T.Tensor((NC, HV, C, C), dtype),
        segs: T.Tensor((NS, 5), "int32"),
        h0: T.Tensor((NI, HV, K, W), acc),
        sc: T.float32,
        o: T.Tensor((Tt, HV, V), dtype),
        ht: T.Tensor((NF, HV, K, W), acc),
        states: T.Tensor((NH, HV, K, V), dtype),
    ):
        with T.Kernel(W // BV, HV, NS, threads=THREADS) as (bv, hv, s):
            hk = hv // GQ
            t_beg = segs[s, 0]
            t_end = segs[s, 1]
            c_beg = segs[s, 2]
            row = segs[s, 3]
            out_row = segs[s, 4]
            col0 = bv * BV
            vcol0 = col0 - K if summary else col0
            n_chunks = T.ceildiv(t_end - t_beg, C)

            # Slots written by the load thread (TMA) and rewritten in place by prep.
            Q_s = T.alloc_shared((2, C, K), dtype)        # q, then Qg
            K_s = T.alloc_shared((2, C, K), dtype)        # k, then Ke
            V_s = T.alloc_shared((2, C, BV), dtype)
            A_s = T.alloc_shared((2, C, C), dtype)        # A, then Ag
            G_s = T.alloc_shared((2, C), acc)
            B_s = T.alloc_shared((2, C), acc)
            Rk_s = T.alloc_shared((2, C), acc)
            Rq_s = T.alloc_shared((2, C), acc)
            # Slots written by prep.
            Wn_s = T.alloc_shared((2, C, K), dtype)
            P_s = T.alloc_shared((2, C, C), dtype)
            Wa_s = T.alloc_shared((C, C), dtype)          # prep scratch
            # Chain buffers.
            S_s = T.alloc_shared((K, BV), dtype)
            Vd_s = T.alloc_shared((C, BV), dtype)
            O_s = T.alloc_shared((2, C, BV), dtype)

            S = T.alloc_fragment((K, BV), acc)
            Vd_f = T.alloc_fragment((C, BV), acc)
            O_f = T.alloc_fragment((C, BV), acc)
            W_f = T.alloc_fragment((C, K), acc)
            QK_f = T.alloc_fragment((C, C), acc)
            A_f = T.alloc_fragment((C, C), dtype)
            Q_f = T.alloc_fragment((C, K), dtype)
            K_f = T.alloc_fragment((C, K), dtype)
            gl = T.alloc_local((1,), acc)

            loaded = T.alloc_barrier([32, 32])
            ready = T.alloc_barrier([128, 128])
            free = T.alloc_barrier([128, 128])
            o_full = T.alloc_barrier([128, 128])
            o_empty = T.alloc_barrier([64, 64])

            tx = T.get_thread_binding()
            if tx < PREP:
                # ---------------- chain ----------------
                T.set_max_nreg(NREG_CHAIN, 1)
                if has_initial:
                    T.copy(h0[row, hv, :, col0:col0 + BV], S)
                elif summary:
                    for i, j in T.Parallel(K, BV):
                        S[i, j] = T.if_then_else(i == col0 + j, 1.0, 0.0)
                else:
                    T.clear(S)
                if summary:
                    if col0 < K:      # M columns: no values, ever
                        for b, i, j in T.Parallel(2, C, BV):
                            V_s[b, i, j] = T.cast(0, dtype)
                        T.fence_proxy_async()
                for ic in T.serial(n_chunks):
                    b = ic % 2
                    ph = (ic // 2) % 2
                    # The bf16 copy of S needs nothing of chunk ic: made before waiting for it.
                    T.copy(S, S_s)
                    T.fence_proxy_async()
                    T.sync_threads(1, 128)
                    if save_states:
                        T.copy(S_s, states[c_beg + ic, hv, :, vcol0:vcol0 + BV])
                    T.barrier_wait(ready[b], ph)
                    T.wgmma_gemm(A_s[b, :, :], V_s[b, :, :], Vd_f, clear_accum=True)
                    T.wgmma_gemm(Wn_s[b, :, :], S_s, Vd_f)
                    if out:
                        T.wgmma_gemm(Q_s[b, :, :], S_s, O_f, clear_accum=True)
                    # The decay of S overlaps the products above (S is not their operand).
                    gl[0] = T.exp2(G_s[b, C - 1])
                    for i, j in T.Parallel(K, BV):
                        S[i, j] = S[i, j] * gl[0]
                    T.wait_wgmma(0)
                    T.copy(Vd_f, Vd_s)
                    T.fence_proxy_async()
                    T.sync_threads(1, 128)
                    T.wgmma_gemm(K_s[b, :, :], Vd_s, S, transpose_A=True)
                    if out:
                        T.wgmma_gemm(P_s[b, :, :], Vd_s, O_f)
                    T.wait_wgmma(0)
                    T.barrier_arrive(free[b])
                    if out:
                        T.barrier_wait(o_empty[b], ph ^ 1)
                        T.copy(O_f, O_s[b, :, :])
                        T.barrier_arrive(o_full[b])
                if store_final:
                    if out_row >= 0:
                        T.copy(S, ht[out_row, hv, :, col0:col0 + BV])
            elif tx < LOAD:
                # ---------------- prep ----------------
                T.set_max_nreg(NREG_PREP, 1)
                for ic in T.serial(n_chunks):
                    b = ic % 2
                    ph = (ic // 2) % 2
                    T.barrier_wait(loaded[b], ph)
                    # Ag over A in place, Wa to scratch (every factor exp2 of a difference, <= 1).
                    # Slot tiles are read into registers first and rewritten after: in-place
                    # element loops would make TileLang put a barrier inside every iteration.
                    T.copy(A_s[b, :, :], A_f)
                    for i, j in T.Parallel(C, C):
                        Wa_s[i, j] = T.if_then_else(
                            i >= j, A_f[i, j] * T.exp2(G_s[b, i]) * B_s[b, j] * (Rk_s[b, j] if l2norm else 1.0),
                            0.0)
                        A_s[b, i, j] = T.if_then_else(
                            i >= j, A_f[i, j] * T.exp2(G_s[b, i] - G_s[b, j]) * B_s[b, j], 0.0)
                    T.fence_proxy_async()
                    T.sync_threads(2, 128)
                    T.wgmma_gemm(Wa_s, K_s[b, :, :], W_f, clear_accum=True)
                    if out:
                        T.wgmma_gemm(Q_s[b, :, :], K_s[b, :, :], QK_f, transpose_B=True, clear_accum=True)
                        T.copy(Q_s[b, :, :], Q_f)
                    T.copy(K_s[b, :, :], K_f)
                    T.wait_wgmma(0)
                    T.sync_threads(2, 128)     # every warp's products done before Q, K are rewritten
                    for i, d in T.Parallel(C, K):
                        Wn_s[b, i, d] = -W_f[i, d]
                    if out:
                        if l2norm:
                            for i, j in T.Parallel(C, C):
                                P_s[b, i, j] = T.if_then_else(
                                    i >= j, sc * Rq_s[b, i] * Rk_s[b, j] * QK_f[i, j]
                                    * T.exp2(G_s[b, i] - G_s[b, j]), 0.0)
                            for i, d in T.Parallel(C, K):
                                Q_s[b, i, d] = Q_f[i, d] * (sc * Rq_s[b, i] * T.exp2(G_s[b, i]))
                        else:
                            for i, j in T.Parallel(C, C):
                                P_s[b, i, j] = T.if_then_else(
                                    i >= j, sc * QK_f[i, j] * T.exp2(G_s[b, i] - G_s[b, j]), 0.0)
                            for i, d in T.Parallel(C, K):
                                Q_s[b, i, d] = Q_f[i, d] * (sc * T.exp2(G_s[b, i]))
                    for i, d in T.Parallel(C, K):
                        K_s[b, i, d] = K_f[i, d] * (T.exp2(G_s[b, C - 1] - G_s[b, i])
                                                    * (Rk_s[b, i] if l2norm else 1.0))
                    T.fence_proxy_async()
                    T.barrier_arrive(ready[b])
            else:
                # ---------------- load / store ----------------
                T.set_max_nreg(NREG_PRODUCER, 0)
                if tx < LOAD + 32:
                    for ic in T.serial(n_chunks):
                        b = ic % 2
                        ph = (ic // 2) % 2
                        t0 = t_beg + ic * C
                        cid = c_beg + ic
                        T.barrier_wait(free[b], ph ^ 1)
                        T.tma_copy(k[t0:t0 + C, hk, :], K_s[b, :, :], barrier=loaded[b])
                        if out:
                            T.tma_copy(q[t0:t0 + C, hk, :], Q_s[b, :, :], barrier=loaded[b])
                            T.tma_copy(v[t0:t0 + C, hv, vcol0:vcol0 + BV], V_s[b, :, :], barrier=loaded[b])
                        else:
                            if col0 >= K:
                                T.tma_copy(v[t0:t0 + C, hv, vcol0:vcol0 + BV], V_s[b, :, :],
                                           barrier=loaded[b])
                        T.tma_copy(A[cid, hv, :, :], A_s[b, :, :], barrier=loaded[b])
                        T.tma_copy(Gc[cid, hv, :], G_s[b, :], barrier=loaded[b])
                        T.tma_copy(Bc[cid, hv, :], B_s[b, :], barrier=loaded[b])
                        if l2norm:
                            T.tma_copy(Rk[cid, hv, :], Rk_s[b, :], barrier=loaded[b])
                            if out:
                                T.tma_copy(Rq[cid, hv, :], Rq_s[b, :], barrier=loaded[b])
                        # Every lane arrives (count 32), so the elected lane's expect_tx always
                        # precedes the phase's last arrival.
                        T.barrier_arrive(loaded[b])
                elif tx >= STORE:
                    if out:
                        for ic in T.serial(n_chunks):
                            b = ic % 2
                            ph = (ic // 2) % 2
                            t0 = t_beg + ic * C
                            T.barrier_wait(o_full[b], ph)
                            for i, j in T.Parallel(C, BV):
                                if t0 + i < t_end:
                                    o[t0 + i, hv, vcol0 + j] = O_s[b, i, j]
                            T.barrier_arrive(o_empty[b])

    return kernel
