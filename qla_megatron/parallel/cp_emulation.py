"""Cross-GPU context parallelism emulated in one process: cp ranks run one after another on one device,
with the all-gathers replaced by stacking what every rank sends.

The phases are cp.py's (forward_summaries, forward_run, backward_summaries, backward_run, the walks
of cp_plan.py), so this runs the code the ranks run, on the backend asked for (the Hopper kernels
under backend "tilelang"), and shows what CP costs on one card beside the single-device op on the
same tokens: every rank's summaries and the compositions (and, off the Hopper path, the extra
backward of the continuing pieces). It is a test and benchmark tool: the ranks run in
sequence, so it is not faster than the op.
"""

from __future__ import annotations

import torch

from qla_megatron.ops.gated_delta_rule.inputs import check_cu_seqlens, check_inputs
from qla_megatron.ops.gated_delta_rule.options import resolve_options

from .cp import backward_run, backward_summaries, compose_walk, forward_run, forward_summaries, on_kernels
from .cp_plan import CPPlan, cp_plan


def emulated_cp_chunk_gated_delta_rule(q, k, v, g, beta, cp: int, layout: str = "contiguous", scale=None,
                                       cu_seqlens=None, use_qk_l2norm_in_kernel=False, backend="auto", *,
                                       options=None):
    """cp_chunk_gated_delta_rule over `cp` ranks emulated in this process, on the whole sequence.

    q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV]: the full inputs (T = cp T_local), laid
    out as on one device; cu_seqlens as in cp_chunk_gated_delta_rule (global offsets, B = 1).
    Returns o [B, T, HV, V], differentiable in q, k, v, g, beta (the dual backward, as the ranks run it).
    """
    if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1:
        raise ValueError(f"cp must be an int >= 1 (the number of emulated ranks), got {cp!r}")
    options = resolve_options(options)
    check_inputs(q, k, v, g, beta, scale, check_finite=options.check_finite)
    B, T = k.shape[:2]
    if T % cp:
        raise ValueError(f"the sequence length T={T} must be a multiple of cp={cp} (every rank holds T / cp tokens)")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
    plan = cp_plan(layout, cp, T // cp, B, tuple(cu_seqlens.tolist()) if cu_seqlens is not None else None)
    run = dict(scale=scale, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, backend=backend, options=options)
    run["kernels"] = on_kernels((q, k, v), run)
    run["grad"] = torch.is_grad_enabled()      # inside the Function's forward it is always off
    return _Emulated.apply(q, k, v, g, beta, plan, run)


def _index(plan: CPPlan, rank: int, T: int, device) -> torch.Tensor:
    """Positions in the flattened full stream [B T] of rank `rank`'s local stream, in local order."""
    return torch.cat([torch.arange(row * T + s, row * T + e, device=device) for row, s, e in plan.pieces[rank]])


def _stack(parts: list, n_slots: int) -> torch.Tensor:
    """What the all-gather returns: every rank's rows padded to n_slots, rank-major."""
    return torch.cat([torch.cat([x, x.new_zeros((n_slots - x.shape[0],) + tuple(x.shape[1:]))]) for x in parts])


class _Emulated(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, g, beta, plan: CPPlan, run):
        B, T = k.shape[:2]
        idx = [_index(plan, r, T, k.device) for r in range(plan.cp)]
        full = [x.reshape((1, B * T) + tuple(x.shape[2:])) for x in (q, k, v, g, beta)]
        local = [[x[:, i] for x in full] for i in idx]
        sums = [forward_summaries(fl, plan, r, run) for r, fl in enumerate(local)]
        Z = compose_walk(plan.fwalk, _stack([fs for fs, _ in sums], plan.Q), plan.NF, run["kernels"])
        o = q.new_empty((1, B * T) + tuple(v.shape[2:]))
        h0s, graphs = [], []
        keep = run["grad"] and any(ctx.needs_input_grad[:5])     # as cp.py: only where a backward follows
        for r, fl in enumerate(local):
            o_r, h0, graph = forward_run(fl, plan, r, Z, run, keep_graph=keep,
                                         local=sums[r][1] if run["kernels"] else None)
            o[:, idx[r]] = o_r
            h0s.append(h0)
            graphs.append(graph)
        ctx.save_for_backward(q, k, v, g, beta)
        Mbs = [None if run["kernels"] else extra for _, extra in sums]   # extra: M, or the prepared stream
        del sums
        ctx.plan, ctx.run, ctx.idx, ctx.h0s, ctx.Mbs = plan, run, idx, h0s, Mbs
        ctx.graphs = graphs
        return o.view(v.shape)

    @staticmethod
    def backward(ctx, do):
        q, k, v, g, beta = ctx.saved_tensors
        plan, run, idx = ctx.plan, ctx.run, ctx.idx
        B, T = k.shape[:2]
        full = [x.reshape((1, B * T) + tuple(x.shape[2:])) for x in (q, k, v, g, beta)]
        dof = do.reshape((1, B * T) + tuple(do.shape[2:]))
        local = [[x[:, i] for x in full] for i in idx]
        dlocal = [dof[:, i] for i in idx]
        bsumm = [backward_summaries(fl, d, plan, r, ctx.h0s[r], ctx.Mbs[r], run, ctx.graphs[r])
                 for r, (fl, d) in enumerate(zip(local, dlocal))]
        D = compose_walk(plan.bwalk, _stack(bsumm, plan.QB), plan.NB, run["kernels"])
        grads = [torch.empty_like(x) for x in full]
        for r, d in enumerate(dlocal):
            for gr, part in zip(grads, backward_run(d, plan, r, ctx.h0s[r], D, ctx.graphs[r])):
                gr[:, idx[r]] = part
        ctx.graphs = None
        return tuple(gr.view(x.shape) for gr, x in zip(grads, (q, k, v, g, beta))) + (None, None)
