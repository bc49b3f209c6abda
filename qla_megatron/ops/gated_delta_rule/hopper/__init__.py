"""Hopper (sm90) TileLang kernels of the gated delta rule; one file per kernel family.

    prepare.py         chunk factors (cumulative gate, the gated 64 x 64 inverse Ai, the masked Q K^T
                       in P, row factors F), per (chunk, group of v-heads)
    forward.py         chunked forward / segment summary / states walk, the state in registers, per
                       (value block, v-head, segment)
    compose.py         segment summaries composed into start states (or, backward, end adjoints)
    backward_dh.py     the state adjoint walked in reverse: dv, per-chunk adjoints, d(initial state),
                       and the backward segment summaries
    backward_grads.py  dq, dk, dg, dbeta per (chunk, qk-head)
    chunk.py           the plan, the launchers, the forward
    backward.py        the backward on the forward's plan
    autograd.py        the autograd Function

Importing this package imports TileLang but touches no GPU; kernels compile on first use.
"""
