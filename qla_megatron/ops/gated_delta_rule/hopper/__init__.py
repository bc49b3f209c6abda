"""Hopper (sm90) TileLang kernels of the gated delta rule; one file per kernel family.

    prepare.py   in-chunk cumulative gate and the gate-free 64 x 64 inverse, per (chunk, v-head)
    forward.py   fused chunked forward / segment summary, per (value block, v-head, segment)
                 (opt-in: QLA_MEGATRON_HOPPER_FORWARD=fused)
    forward_rs.py  the same with the state in registers (the default forward, "rs"); its chunk
                 factors come from prepare.py (rs_factors) or prepare_rs.py
    chunk.py     the forward plan: prepare -> (summary -> compose ->) forward, and the launchers

Importing this package imports TileLang but touches no GPU; kernels compile on first use.
"""
