"""A rank's run of cross-GPU context parallelism on the Hopper kernels (parallel/cp.py): its local
stream of pieces planned, prepared once, summarised, run from the composed starts, and the dual.

    prepare_local      the pieces cut into segments as intra-card CP cuts a sequence
                       (intra_cp.plan_segment_len over the pieces' lengths and the call's
                       IntraCPConfig), one host plan for them (segment_plan, the batch-row kind), and
                       the chunk factors (chunk.forward_prepare): what every later step reads
    piece_summaries    [M | S_ext] of every piece: the summary pass (chunk.summarize's) over all
                       segments, gate-driven as the config says (a segment whose decay over its last
                       warm-up chunks is below e^-10 reports M = 0 and what those chunks alone give),
                       each piece's segments folded (segments.fold_summaries, one launch of the
                       compose kernel; a gated segment's M = 0 cuts what lies before it, as the
                       composition would)
    run_local          the rest of the forward from the pieces' start states (chunk.forward_main:
                       intra-card CP inside each piece), keeping ForwardSaved for the backward
    piece_backward_summaries
                       [M^T | dS_ext] of every piece for its dO: backward_dh.py in summary mode over all
                       segments from the saved factors (the adjoint walked from [I | 0] at each
                       segment's end), folded last segment first
    backward_local     the op's backward (backward.chunk_gated_delta_rule_bwd) from the pieces' end
                       adjoints

Summaries are fp32 [P, HV, K, K + V] in the pieces' order; cp.py sends the rows of the pieces that
continue on another rank. The factors are built once a call: the summaries and the main passes,
forward and backward, read the same Ai, P, F.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..intra_cp import IntraCPConfig, plan_segment_len
from ..segment_plan import SegmentPlan, plan_segments, summary_segs
from ..segments import fold_summaries
from .backward import backward_dh, chunk_gated_delta_rule_bwd
from .chunk import ForwardSaved, Prepared, _num_sms, bv_main, forward, forward_main, forward_prepare


@dataclass
class Local:
    """One rank's local stream on the kernels: inputs [1, T, ...], its segment plan and summary rows
    (segment i's summary in row i), the prepared forward."""
    inputs: tuple            # q, k, v, g, beta [1, T, ...]
    plan: SegmentPlan
    segs: torch.Tensor       # [NS, 5] int32
    prep: Prepared
    l2norm: bool


@functools.lru_cache(maxsize=64)
def _tables(plan: SegmentPlan, device: torch.device):
    """(KernelTables, summary rows [NS, 5] of every segment) of a plan."""
    return plan.kernel_tables(device), summary_segs(plan, range(plan.NS), device)


def prepare_local(q, k, v, g, beta, bounds, scale, l2norm, cfg: IntraCPConfig) -> Local:
    """The pieces [bounds[i], bounds[i + 1]) of the local stream q, k [1, T, H, K], v [1, T, HV, V],
    g, beta [1, T, HV] (bounds: host ints) planned and prepared."""
    HV, K, V = v.shape[2], k.shape[-1], v.shape[-1]
    bounds = tuple(int(b) for b in bounds)
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    seg_len = plan_segment_len(lens, HV, K, V, _num_sms(k.device.index or 0), BV=bv_main(V), config=cfg)
    plan = plan_segments(bounds, seg_len if seg_len is not None and seg_len < max(lens) else None)
    tables, segs = _tables(plan, k.device)
    prep = forward_prepare(q, k, v, g, beta, scale, None, l2norm, cfg, planned=(tables, plan.N))
    return Local((q, k, v, g, beta), plan, segs, prep, bool(l2norm))


def piece_summaries(local: Local) -> torch.Tensor:
    """[M | S_ext] [P, HV, K, K + V] fp32 of every piece."""
    p, plan = local.prep, local.plan
    qf, kf, vf = p.flat[:3]
    summ = forward(qf, kf, vf, p.Ai, p.P, p.F, local.segs, n_final=plan.NS, summary=True,
                   gate_chunks=p.config.gate_chunks)[1]
    return summ if plan.NS == plan.N else fold_summaries(summ, plan, backend="tilelang")


def run_local(local: Local, h0: torch.Tensor, keep: bool):
    """o [1, T, HV, V] of the pieces from their start states h0 [P, HV, K, V] fp32, and the
    ForwardSaved of the backward where keep (else None)."""
    out = forward_main(local.prep, h0.float().contiguous(), False, save_for_backward=keep)
    return out[0], (out[2] if keep else None)


def piece_backward_summaries(local: Local, saved: ForwardSaved, do: torch.Tensor) -> torch.Tensor:
    """[M^T | dS_ext] [P, HV, K, K + V] fp32 of every piece for the output gradient do [1, T, HV, V]:
    dS_ext the adjoint of each piece's start from its own outputs (zero end adjoint)."""
    q, k = local.inputs[:2]
    H, K = k.shape[-2], k.shape[-1]
    qf, kf = (x.reshape(-1, H, K).contiguous() for x in (q, k))
    dof = do.reshape(-1, do.shape[-2], do.shape[-1]).to(q.dtype).contiguous()
    plan = local.plan
    summ = backward_dh(qf, kf, dof, saved.Ai, saved.P, saved.F, local.segs, n_final=plan.NS, summary=True,
                       gate_chunks=saved.config.gate_chunks)[1]
    return summ if plan.NS == plan.N else fold_summaries(summ, plan, reverse=True, backend="tilelang")


def backward_local(local: Local, saved: ForwardSaved, do: torch.Tensor, dht: torch.Tensor):
    """Gradients of q, k, v, g, beta (their shapes and dtypes) of the pieces' outputs for do and the
    pieces' end adjoints dht [P, HV, K, V]."""
    return chunk_gated_delta_rule_bwd(saved, *local.inputs, do, dht, local.l2norm)[:5]
