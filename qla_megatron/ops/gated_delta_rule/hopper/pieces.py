"""Summaries of whole pieces on the Hopper kernels, for cross-GPU context parallelism
(parallel/cp.py): every piece of a packed stream is one segment, summarised by the intra-card CP
summary passes (exact, no warm-up).

    forward   [M | S_ext] of each piece: prepare, then forward.py in summary mode (chunk.summarize's
              pass) over one summary row per piece
    backward  [M^T | dS_ext] of each piece for its dO: prepare, then backward_dh.py in summary mode
              (backward.backward_summarize's pass), the adjoint walked from [I | 0] at the piece's end

Both are fp32 [NP, HV, K, K + V] in the pieces' order, the rows parallel/cp_plan.py's walks compose.
"""

from __future__ import annotations

import functools

import torch

from ..segment_plan import _i32, plan_segments
from .backward import backward_dh
from .chunk import forward, prepare


@functools.lru_cache(maxsize=64)
def _tables(bounds: tuple, device: torch.device):
    """(chunks [NC, 2], summary rows [NP, 5] = (start, end, first chunk, 0, piece)) of pieces `bounds`."""
    plan = plan_segments(bounds)
    segs = [(bounds[i], bounds[i + 1], plan.chunk0[i], 0, i) for i in range(len(bounds) - 1)]
    return _i32(list(plan.chunks), device), _i32(segs, device)


def _factors(q, k, g, beta, bounds, scale, l2norm):
    """The token-major views, the summary rows and the chunk factors (prepare) of the pieces."""
    H, K, HV = k.shape[-2], k.shape[-1], g.shape[-1]
    qf, kf = (x.reshape(-1, H, K).contiguous() for x in (q, k))
    gf, bf = (x.reshape(-1, HV).float().contiguous() for x in (g, beta))
    chunks, segs = _tables(tuple(int(b) for b in bounds), k.device)
    scale = k.shape[-1] ** -0.5 if scale is None else float(scale)
    return qf, kf, segs, prepare(qf, kf, gf, bf, chunks, HV, scale, l2norm)


def piece_summaries(q, k, v, g, beta, bounds, scale, l2norm) -> torch.Tensor:
    """[M | S_ext] [NP, HV, K, K + V] fp32 of the pieces [bounds[i], bounds[i + 1]) of the packed
    stream q, k [1, T, H, K], v [1, T, HV, V], g, beta [1, T, HV] (bounds: host ints)."""
    qf, kf, segs, (Ai, P, F) = _factors(q, k, g, beta, bounds, scale, l2norm)
    vf = v.reshape(-1, v.shape[-2], v.shape[-1]).contiguous()
    return forward(qf, kf, vf, Ai, P, F, segs, n_final=len(bounds) - 1, summary=True)[1]


def piece_backward_summaries(q, k, do, g, beta, bounds, scale, l2norm) -> torch.Tensor:
    """[M^T | dS_ext] [NP, HV, K, K + V] fp32 of the same pieces for the output gradient do
    [1, T, HV, V]: dS_ext the adjoint of each piece's start from its own outputs (zero end adjoint)."""
    qf, kf, segs, (Ai, P, F) = _factors(q, k, g, beta, bounds, scale, l2norm)
    dof = do.reshape(-1, do.shape[-2], do.shape[-1]).to(q.dtype).contiguous()
    return backward_dh(qf, kf, dof, Ai, P, F, segs, n_final=len(bounds) - 1, summary=True)[1]
