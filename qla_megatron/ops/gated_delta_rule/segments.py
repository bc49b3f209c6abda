"""Segments: the one mechanism behind intra-card and cross-GPU context parallelism (DESIGN §2).

The recurrence is affine in the state, so a contiguous segment of tokens maps its start state to

    S_end = M S_start + S_ext,    M = prod_t exp(g_t) (I - beta_t k_t k_t^T)   (later tokens left)

`segment_summary` computes (S_ext, M) with one scan: it runs the chunked recurrence on a widened state
[M | S_ext] of shape K x (K + V) started from [I | 0], with zero values in the first K columns. So
summary kernels are the forward kernels with a wider state and no output.

The two operations every user of the mechanism calls (docs/segments.md): `summarize` (here the torch
reference; the Hopper summary passes are hopper/chunk.py's `summarize` and hopper/backward.py's
`backward_summarize`) and `compose`, along the walks of a `segment_plan.SegmentPlan` (torch here, or
the compose kernel with backend="tilelang"). Intra-card CP (hopper/) and cross-GPU CP (parallel/cp.py)
both compose through `compose`.

`segmented_chunk_gated_delta_rule` is the CPU-testable specification of context parallelism: cut
each sequence into segments, summarise every segment in parallel, compose the start states in order,
and run every segment from its start state in parallel.
"""

from __future__ import annotations

from typing import Optional

import torch

from .inputs import check_inputs, compute_dtype, default_scale, packed_stream, sequence_bounds
from .segment_plan import (GATE_LOG_THRESHOLD, WARMUP_CHUNKS, SegmentPlan, Walk, WalkTables, chain_walk,
                           plan_segments, warmup_windows)
from .torch import chunk_scan


def segment_summary(k, v, g, beta, cu_seqlens=None, *, use_qk_l2norm_in_kernel=False):
    """(state_from_zero [N, HV, K, V], transition [N, HV, K, K]) of every sequence (or segment).

    k [B, T, H, K], v [B, T, HV, V], g, beta [B, T, HV], cu_seqlens int64 [N + 1] (B == 1) as in
    `chunk_gated_delta_rule`. For every sequence n and any start state S0 [HV, K, V]:

        final_state[n] = transition[n] @ S0 + state_from_zero[n]

    Float32 results (float64 for float64 inputs); differentiable.
    """
    check_inputs(None, k, v, g, beta, cu_seqlens=cu_seqlens, need_q=False)
    _, kf, vf, gf, bf = packed_stream(None, k, v, g, beta, use_qk_l2norm_in_kernel)
    return summarize(kf, vf, gf, bf, sequence_bounds(k.shape[0], k.shape[1], cu_seqlens))


def summarize(k, v, g, beta, bounds):
    """segment_summary on the packed stream (the torch reference of the summary pass): k [T, H, K],
    v [T, HV, V], g, beta [T, HV]; bounds the NS + 1 segment offsets (e.g. SegmentPlan.bounds).
    Returns (S_ext [NS, HV, K, V], M [NS, HV, K, K])."""
    T, HV, V = v.shape
    K = k.shape[-1]
    N = len(bounds) - 1
    v_wide = torch.cat([v.new_zeros(T, HV, K), v], dim=-1)                  # [T, HV, K + V]
    eye = torch.eye(K, dtype=v.dtype, device=v.device).expand(N, HV, K, K)
    start = torch.cat([eye, v.new_zeros(N, HV, K, V)], dim=-1)              # [I | 0]
    _, end = chunk_scan(k, v_wide, g, beta, bounds, initial_state=start)
    return end[..., K:], end[..., :K]


def compose(walk, summ: torch.Tensor, z0: Optional[torch.Tensor] = None, NS: Optional[int] = None, *,
            backend: str = "torch") -> torch.Tensor:
    """The composition along every sequence of `walk` (segment_plan.Walk on the host, or its device form
    WalkTables, as KernelTables hold it): Z[0] = z0[walk.z0[q]] (or 0),
    Z[j + 1] = M_j Z[j] + S_ext_j with [M_j | S_ext_j] = summ[walk.srow[q][j]], Z[j] written to row
    walk.zrow[q][j]. Forward: summaries [M | S_ext], z0 the initial states, the outputs the segments'
    start states. Backward (the dual): [M^T | dS_ext], z0 the terminal adjoints, the outputs every
    segment's end adjoint.

    summ [NSS, ..., K, K + V]; z0 [NQ, ..., K, V] or None; returns [NS, ..., K, V] (NS: the rows the
    walk writes, by default all it names). backend: "torch" (the reference: differentiable, any
    dtype and leading dims, one batched product per step over the sequences still walking) or
    "tilelang" (hopper/compose.py's kernel, one launch: fp32, summ [NSS, HV, K, K + V]). The torch
    reference walks on the host: given WalkTables it reads them (WalkTables.to_walk)."""
    if backend == "tilelang":
        from .hopper.chunk import compose as hopper_compose
        return hopper_compose(walk if isinstance(walk, WalkTables) else walk.tensors(summ.device), summ, z0, NS)
    if backend != "torch":
        raise ValueError(f"compose: backend must be 'torch' or 'tilelang', got {backend!r}")
    if isinstance(walk, WalkTables):
        walk = walk.to_walk()
    K = summ.shape[-2]
    zero = summ.new_zeros(summ.shape[1:-1] + (summ.shape[-1] - K,))
    Z = [z0[r] if z0 is not None else zero for r in walk.z0]
    out = {}
    for q, z in enumerate(Z):
        out[walk.zrow[q][0]] = z
    for j in range(max(walk.J, default=0)):
        live = [q for q in range(len(Z)) if walk.J[q] > j]
        m = torch.stack([summ[walk.srow[q][j]] for q in live])
        z = m[..., K:] + m[..., :K] @ torch.stack([Z[q] for q in live])
        for q, zq in zip(live, z.unbind(0)):
            Z[q] = zq
            out[walk.zrow[q][j + 1]] = zq
    return torch.stack([out[r] for r in range(NS if NS is not None else len(out))])


def fold_summaries(summ: torch.Tensor, plan: SegmentPlan, reverse: bool = False, *,
                   backend: str = "torch") -> torch.Tensor:
    """The summary of every sequence of `plan` from its segments' summaries: compose on the widened
    state [M | S] from [I | 0], Z <- A_j Z + [0 | B_j] over each sequence's segments.

    summ [NS, HV, K, K + V], rows in segment order: [M | S_ext] (forward; folded first to last:
    [M_n ... M_1 | the end state from zero]), or with reverse [M^T | dS_ext] (backward; folded last to
    first: [(M_n ... M_1)^T | the start adjoint from a zero end adjoint]). Returns [N, HV, K, K + V].
    backend: compose's ("tilelang": one launch of the compose kernel, its state K + V columns wide)."""
    NS, HV, K, W = summ.shape
    N = plan.N
    wide = torch.cat([summ[..., :K], summ.new_zeros(NS, HV, K, K), summ[..., K:]], dim=-1)     # [A | 0 | B]
    chains = [plan.segments_of(n)[::-1] if reverse else plan.segments_of(n) for n in range(N)]
    MJ = max(len(c) for c in chains)
    # Row n: sequence n's fold, after its last step; the states before it all go to one scratch row, N.
    rows = tuple((N,) * len(c) + (n,) + (0,) * (MJ - len(c)) for n, c in enumerate(chains))
    walk = Walk(tuple(len(c) for c in chains), (0,) * len(chains),
                tuple(tuple(c) + (0,) * (MJ - len(c)) for c in chains), rows)
    eye = torch.cat([torch.eye(K, dtype=summ.dtype, device=summ.device).expand(HV, K, K),
                     summ.new_zeros(HV, K, W - K)], dim=-1)
    return compose(walk, wide, eye[None].contiguous(), N + 1, backend=backend)[:N]


def compose_segments(state_from_zero, transition, start=None):
    """Start states of consecutive segments of one sequence: S[j+1] = M[j] S[j] + S_ext[j] (compose
    on a one-sequence walk).

    Args: state_from_zero [NS, ..., K, V], transition [NS, ..., K, K], start [..., K, V] or None (0).
    Returns: (starts [NS, ..., K, V], end [..., K, V]). O(NS) small matmuls.
    """
    NS = state_from_zero.shape[0]
    Z = compose(chain_walk(NS), torch.cat([transition, state_from_zero], dim=-1),
                start[None] if start is not None else None)
    return Z[:NS], Z[NS]


def gate_driven_mask(g, plan: SegmentPlan, warmup_chunks: int, log_threshold: float = GATE_LOG_THRESHOLD):
    """Which (segment, v-head) pairs may start from a warm-up instead of the exact composition.

    g: [T, HV] log decays of the packed stream. A pair qualifies when the cumulative decay over its
    warm-up window, exp(sum g), is below exp(log_threshold), and the window does not reach back to
    the sequence start (there the exact start is as cheap). Returns bool [NS, HV].
    """
    mask = torch.zeros(plan.NS, g.shape[1], dtype=torch.bool, device=g.device)
    gsum = torch.cat([g.new_zeros(1, g.shape[1]), g.to(torch.float64).cumsum(0)])
    for j, w, s in warmup_windows(plan, warmup_chunks):
        if w > plan.seq_bounds[plan.seq[j]]:
            mask[j] = (gsum[s] - gsum[w]) < log_threshold
    return mask


def segmented_chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
                                     output_final_state=False, cu_seqlens=None,
                                     use_qk_l2norm_in_kernel=False, *, segment_len: int,
                                     mode: str = "exact", warmup_chunks: int = WARMUP_CHUNKS,
                                     log_threshold: float = GATE_LOG_THRESHOLD):
    """`chunk_gated_delta_rule` (torch backend) computed segment-parallel: the specification of
    intra-card and cross-GPU context parallelism. Arguments and returns as there, plus:

    segment_len: tokens per segment (a multiple of 64); each sequence is cut from its start.
    mode: "exact" composes every start state with the segments' transitions M. "gate" starts a
        (segment, v-head) from a warm-up over the warmup_chunks chunks before it, from a zero state,
        where the decay over that window is below exp(log_threshold); other heads stay exact. The
        summary of a gated pair's predecessor is replaced by [0 | the warm-up's end state], as the
        Hopper summary kernels write it, so one composition serves both modes.
    warmup_chunks, log_threshold: segment_plan.WARMUP_CHUNKS and GATE_LOG_THRESHOLD by default.

    Error bound of "gate" mode. With ||k|| = 1 (use_qk_l2norm_in_kernel) and 0 <= beta <= 1 every
    factor (I - beta k k^T) has spectral norm <= 1, so the skipped transition of window b has norm
    <= exp(sum_b g) < exp(log_threshold), and the warm-up start differs from the exact one by at most
    eps_b = exp(sum_b g) ||S(w_b)||_2, S(w_b) the exact state at the window start. Later steps are
    again contractions, so for every token t and v-head h:

        ||o_t - o_t^exact|| <= scale ||q_t|| sum_{gated windows b before t in its sequence} eps_b
    """
    if mode not in ("exact", "gate"):
        raise ValueError(f"mode must be 'exact' or 'gate', got {mode!r}")
    if not isinstance(warmup_chunks, int) or warmup_chunks < 1:
        raise ValueError(f"warmup_chunks must be an int >= 1, got {warmup_chunks!r}")
    if segment_len is None:
        raise ValueError("segment_len must be a positive multiple of the chunk size 64, got None")
    check_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    B, T, H, K = k.shape
    out_shape, out_dtype, cdt = v.shape, q.dtype, compute_dtype(q.dtype)
    q, k, v, g, beta = packed_stream(q, k, v, g, beta, use_qk_l2norm_in_kernel)
    plan = plan_segments(sequence_bounds(B, T, cu_seqlens), segment_len)
    h0 = initial_state.to(cdt) if initial_state is not None else None

    # 1. every segment's (S_ext, M), in parallel; the summary rows are the segments with a successor.
    ext, trans = summarize(k, v, g, beta, list(plan.bounds))
    summ = torch.cat([trans, ext], dim=-1)
    if mode == "gate":
        # A gated (segment, v-head) starts from its warm-up: its predecessor's summary becomes
        # [0 | warm-up end state from zero], so the composition below yields the warm-up state.
        gated = gate_driven_mask(g, plan, warmup_chunks, log_threshold)
        windows = [(j, w, s) for j, w, s in warmup_windows(plan, warmup_chunks) if bool(gated[j].any())]
        if windows:
            idx = torch.cat([torch.arange(w, s, device=k.device) for _, w, s in windows])
            wb = [0]
            for _, w, s in windows:
                wb.append(wb[-1] + s - w)
            _, ends = chunk_scan(k[idx], v[idx], g[idx], beta[idx], wb)
            for (j, _, _), warm in zip(windows, ends):
                warm_summ = torch.cat([torch.zeros_like(trans[j - 1]), warm], dim=-1)
                summ[j - 1] = torch.where(gated[j][:, None, None], warm_summ, summ[j - 1])
    # 2. compose per sequence (the plan's forward walk; rows in main-pass order, as the kernels use).
    has_next = [i for i in range(plan.NS) if plan.fwd_row[i] >= 0]
    if plan.walk is not None:
        starts = compose(plan.walk, summ[has_next], h0, plan.NS)[list(plan.row)]
    else:
        starts = h0 if h0 is not None else None
    # 3. every segment from its start state, in parallel.
    o, seg_final = chunk_scan(k, v, g, beta, list(plan.bounds), q=q, scale=default_scale(scale, K),
                              initial_state=starts)
    last = [plan.segments_of(n)[-1] for n in range(plan.N)]
    final = seg_final[torch.tensor(last, device=k.device)]
    return o.view(out_shape).to(out_dtype), (final if output_final_state else None)
