"""Hopper (sm90) TileLang kernels of the gated delta rule; one file per kernel family.

    prepare_rs.py  chunk factors of the rs forward (cumulative gate, the gate-free 64 x 64 inverse
                 folded into Ag, the masked Q K^T in P), per (chunk, pair of v-heads)
    forward_rs.py  chunked forward / segment summary / warm-up with the state in registers (the
                 default forward, "rs"), per (value block, v-head, segment)
    prepare.py, forward.py  the earlier pair: the cumulative gate and inverse per (chunk, v-head), and
                 the forward with TileLang's automatic warp specialization (QLA_MEGATRON_HOPPER_FORWARD=fused)
    chunk.py     the forward plan: prepare -> (summary -> compose ->) forward, and the launchers

Importing this package imports TileLang but touches no GPU; kernels compile on first use.
"""
