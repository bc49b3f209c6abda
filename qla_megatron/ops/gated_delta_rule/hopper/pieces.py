"""Summaries of whole pieces on the Hopper kernels, for cross-GPU context parallelism
(parallel/cp.py): every piece of a packed stream is cut into segments as intra-card CP cuts a
sequence (intra_cp.plan_segment_len for the pieces' lengths and the call's IntraCPConfig), every
segment summarised in parallel by the intra-card summary passes (gate-driven as the config says:
a segment whose decay over its last (forward) / first (backward) warm-up chunks is below e^-10
reports M = 0 and what those chunks alone give, as intra-card CP does; exact in "exact" mode), and
each piece's segments folded into its summary (segments.fold_summaries; a gated segment's M = 0
cuts what lies before it, as the composition would).

    forward   [M | S_ext] of each piece: prepare, then forward.py in summary mode (chunk.summarize's
              pass) over one summary row per segment
    backward  [M^T | dS_ext] of each piece for its dO: prepare, then backward_dh.py in summary mode
              (backward.backward_summarize's pass), the adjoint walked from [I | 0] at each segment's
              end, folded last segment first

Both are fp32 [NP, HV, K, K + V] in the pieces' order, the rows parallel/cp_plan.py's walks compose.
Uncut, a piece's summary walks its chunks one after another (a 128k-token piece: 2048 chunks).
"""

from __future__ import annotations

import functools

import torch

from ..intra_cp import IntraCPConfig, plan_segment_len
from ..segment_plan import SegmentPlan, plan_segments, summary_segs
from ..segments import fold_summaries
from .backward import backward_dh
from .chunk import _num_sms, bv_main, forward, prepare


@functools.lru_cache(maxsize=64)
def _tables(plan: SegmentPlan, device: torch.device):
    """(chunks [NC, 2], summary rows [NS, 5] with segment i's summary in row i) of a plan."""
    return plan.kernel_tables(device).chunks, summary_segs(plan, range(plan.NS), device)


def _segmented(q, k, g, beta, bounds, scale, l2norm, cfg: IntraCPConfig, V: int):
    """The token-major views, the segment plan of the pieces, its summary rows and the chunk factors."""
    H, K, HV = k.shape[-2], k.shape[-1], g.shape[-1]
    qf, kf = (x.reshape(-1, H, K).contiguous() for x in (q, k))
    gf, bf = (x.reshape(-1, HV).float().contiguous() for x in (g, beta))
    bounds = tuple(int(b) for b in bounds)
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    seg_len = plan_segment_len(lens, HV, K, V, _num_sms(k.device.index or 0), BV=bv_main(V), config=cfg)
    plan = plan_segments(bounds, seg_len if seg_len is not None and seg_len < max(lens) else None)
    chunks, segs = _tables(plan, k.device)
    scale = K ** -0.5 if scale is None else float(scale)
    return qf, kf, plan, segs, prepare(qf, kf, gf, bf, chunks, HV, scale, l2norm)


def piece_summaries(q, k, v, g, beta, bounds, scale, l2norm, cfg: IntraCPConfig) -> torch.Tensor:
    """[M | S_ext] [NP, HV, K, K + V] fp32 of the pieces [bounds[i], bounds[i + 1]) of the packed
    stream q, k [1, T, H, K], v [1, T, HV, V], g, beta [1, T, HV] (bounds: host ints)."""
    qf, kf, plan, segs, (Ai, P, F) = _segmented(q, k, g, beta, bounds, scale, l2norm, cfg, v.shape[-1])
    vf = v.reshape(-1, v.shape[-2], v.shape[-1]).contiguous()
    summ = forward(qf, kf, vf, Ai, P, F, segs, n_final=plan.NS, summary=True, gate_chunks=cfg.gate_chunks)[1]
    return summ if plan.NS == plan.N else fold_summaries(summ, plan)


def piece_backward_summaries(q, k, do, g, beta, bounds, scale, l2norm, cfg: IntraCPConfig) -> torch.Tensor:
    """[M^T | dS_ext] [NP, HV, K, K + V] fp32 of the same pieces for the output gradient do
    [1, T, HV, V]: dS_ext the adjoint of each piece's start from its own outputs (zero end adjoint)."""
    qf, kf, plan, segs, (Ai, P, F) = _segmented(q, k, g, beta, bounds, scale, l2norm, cfg, do.shape[-1])
    dof = do.reshape(-1, do.shape[-2], do.shape[-1]).to(q.dtype).contiguous()
    summ = backward_dh(qf, kf, dof, Ai, P, F, segs, n_final=plan.NS, summary=True, gate_chunks=cfg.gate_chunks)[1]
    return summ if plan.NS == plan.N else fold_summaries(summ, plan, reverse=True)
