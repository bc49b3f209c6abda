"""Segments: the one mechanism behind intra-card and cross-GPU context parallelism (DESIGN §2).

The recurrence is affine in the state, so a contiguous segment of tokens maps its start state to

    S_end = M S_start + S_ext,    M = prod_t exp(g_t) (I - beta_t k_t k_t^T)   (later tokens left)

`segment_summary` computes (S_ext, M) with one scan: it runs the chunked recurrence on a widened state
[M | S_ext] of shape K x (K + V) started from [I | 0], with zero values in the first K columns. So
summary kernels are the forward kernels with a wider state and no output.

`segmented_chunk_gated_delta_rule` is the CPU-testable specification of context parallelism: cut
each sequence into segments, summarise every segment in parallel, compose the start states in order,
and run every segment from its start state in parallel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .inputs import check_inputs, compute_dtype, default_scale, packed_stream, sequence_bounds
from .torch import CHUNK_SIZE, chunk_scan


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
    """segment_summary on the packed stream: k [T, H, K], v [T, HV, V], g, beta [T, HV]."""
    T, HV, V = v.shape
    K = k.shape[-1]
    N = len(bounds) - 1
    v_wide = torch.cat([v.new_zeros(T, HV, K), v], dim=-1)                  # [T, HV, K + V]
    eye = torch.eye(K, dtype=v.dtype, device=v.device).expand(N, HV, K, K)
    start = torch.cat([eye, v.new_zeros(N, HV, K, V)], dim=-1)              # [I | 0]
    _, end = chunk_scan(k, v_wide, g, beta, bounds, initial_state=start)
    return end[..., K:], end[..., :K]


def compose_segments(state_from_zero, transition, start=None):
    """Start states of consecutive segments of one sequence: S[j+1] = M[j] S[j] + S_ext[j].

    Args: state_from_zero [NS, HV, K, V], transition [NS, HV, K, K], start [HV, K, V] or None (0).
    Returns: (starts [NS, HV, K, V], end [HV, K, V]). O(NS) small matmuls.
    """
    S = start if start is not None else torch.zeros_like(state_from_zero[0])
    starts = []
    for j in range(state_from_zero.shape[0]):
        starts.append(S)
        S = transition[j] @ S + state_from_zero[j]
    return torch.stack(starts), S


@dataclass(frozen=True)
class SegmentPlan:
    """Segments of the packed token stream. bounds: NS + 1 offsets; seq: the sequence of each segment;
    first: whether a segment starts its sequence; seq_bounds: the N + 1 sequence offsets."""
    bounds: tuple
    seq: tuple
    first: tuple
    seq_bounds: tuple


def plan_segments(seq_bounds, segment_len: int, chunk_size: int = CHUNK_SIZE) -> SegmentPlan:
    """Cut every sequence into pieces of segment_len tokens (the last one shorter)."""
    if not isinstance(segment_len, int) or segment_len <= 0 or segment_len % chunk_size:
        raise ValueError(f"segment_len must be a positive multiple of the chunk size {chunk_size}, "
                         f"got {segment_len!r}")
    bounds, seq, first = [], [], []
    for n in range(len(seq_bounds) - 1):
        for s in range(seq_bounds[n], seq_bounds[n + 1], segment_len):
            bounds.append(s)
            seq.append(n)
            first.append(s == seq_bounds[n])
    bounds.append(seq_bounds[-1])
    return SegmentPlan(tuple(bounds), tuple(seq), tuple(first), tuple(seq_bounds))


def warmup_windows(plan: SegmentPlan, warmup_chunks: int, chunk_size: int = CHUNK_SIZE):
    """For each segment that does not start its sequence: (segment index, window start, window end),
    the window being the warmup_chunks * C tokens before the segment, clipped at the sequence start."""
    out = []
    for j, s in enumerate(plan.bounds[:-1]):
        if not plan.first[j]:
            w = max(plan.seq_bounds[plan.seq[j]], s - warmup_chunks * chunk_size)
            out.append((j, w, s))
    return out


def gate_driven_mask(g, plan: SegmentPlan, warmup_chunks: int, log_threshold: float = -10.0):
    """Which (segment, v-head) pairs may start from a warm-up instead of the exact composition.

    g: [T, HV] log decays of the packed stream. A pair qualifies when the cumulative decay over its
    warm-up window, exp(sum g), is below exp(log_threshold), and the window does not reach back to
    the sequence start (there the exact start is as cheap). Returns bool [NS, HV].
    """
    mask = torch.zeros(len(plan.bounds) - 1, g.shape[1], dtype=torch.bool, device=g.device)
    gsum = torch.cat([g.new_zeros(1, g.shape[1]), g.to(torch.float64).cumsum(0)])
    for j, w, s in warmup_windows(plan, warmup_chunks):
        if w > plan.seq_bounds[plan.seq[j]]:
            mask[j] = (gsum[s] - gsum[w]) < log_threshold
    return mask


def segmented_chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
                                     output_final_state=False, cu_seqlens=None,
                                     use_qk_l2norm_in_kernel=False, *, segment_len: int,
                                     mode: str = "exact", warmup_chunks: int = 2,
                                     log_threshold: float = -10.0):
    """`chunk_gated_delta_rule` (torch backend) computed segment-parallel: the specification of
    intra-card and cross-GPU context parallelism. Arguments and returns as there, plus:

    segment_len: tokens per segment (a multiple of 64); each sequence is cut from its start.
    mode: "exact" composes every start state with the segments' transitions M. "gate" starts a
        (segment, v-head) from a warm-up over the warmup_chunks chunks before it, from a zero state,
        where the decay over that window is below exp(log_threshold); other heads stay exact.

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
    N = check_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    B, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    out_shape, out_dtype, cdt = v.shape, q.dtype, compute_dtype(q.dtype)
    q, k, v, g, beta = packed_stream(q, k, v, g, beta, use_qk_l2norm_in_kernel)
    plan = plan_segments(sequence_bounds(B, T, cu_seqlens), segment_len)

    # 1. every segment's (S_ext, M), in parallel; 2. compose per sequence.
    ext, trans = summarize(k, v, g, beta, list(plan.bounds))
    warm, gated = None, None
    if mode == "gate":
        gated = gate_driven_mask(g, plan, warmup_chunks, log_threshold)
        windows = [(j, w, s) for j, w, s in warmup_windows(plan, warmup_chunks) if bool(gated[j].any())]
        if windows:
            idx = torch.cat([torch.arange(w, s, device=k.device) for _, w, s in windows])
            wb = [0]
            for _, w, s in windows:
                wb.append(wb[-1] + s - w)
            _, ends = chunk_scan(k[idx], v[idx], g[idx], beta[idx], wb)
            warm = {j: ends[i] for i, (j, _, _) in enumerate(windows)}
    starts = []
    for n in range(N):
        js = [j for j in range(len(plan.seq)) if plan.seq[j] == n]
        S = initial_state[n].to(cdt) if initial_state is not None else v.new_zeros(HV, K, V)
        for j in js:
            if warm is not None and j in warm:
                S = torch.where(gated[j][:, None, None], warm[j], S)
            starts.append(S)
            S = trans[j] @ S + ext[j]
    # 3. every segment from its start state, in parallel.
    o, seg_final = chunk_scan(k, v, g, beta, list(plan.bounds), q=q, scale=default_scale(scale, K),
                              initial_state=torch.stack(starts))
    last = [max(j for j in range(len(plan.seq)) if plan.seq[j] == n) for n in range(N)]
    final = seg_final[torch.tensor(last, device=k.device)]
    return o.view(out_shape).to(out_dtype), (final if output_final_state else None)
