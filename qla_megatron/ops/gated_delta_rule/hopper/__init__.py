"""Hopper (sm90) TileLang kernels of the gated delta rule; one file per kernel family.

    prepare.py   in-chunk cumulative gate and the gate-free 64 x 64 inverse, per (chunk, v-head)
    forward.py   fused chunked forward / segment summary, per (value block, v-head, segment)
    forward_ws.py  the same, warp-specialized by hand (opt-in: QLA_MEGATRON_HOPPER_FORWARD=ws; not yet
                 run on a GPU)
    chunk.py     the forward plan: prepare -> (summary -> compose ->) forward, and the launchers

Importing this package imports TileLang but touches no GPU; kernels compile on first use.
"""
