"""Cross-GPU context parallelism for the gated delta rule, by passing segment states between ranks.

Each rank holds one segment of every sequence ("contiguous") or two ("zigzag", Megatron's layout).
It summarises its segments, S_end = M S_start + S_ext (ops.segment_summary), all-gathers the
summaries (fp32, H K (K + V) per segment: independent of the sequence length), composes the start
state of each of its segments in global order, and runs its segments from those starts. This is the
same mechanism as intra-card context parallelism (ops.segmented_chunk_gated_delta_rule, hopper/),
with ranks in place of segments, and the same composition (ops.gated_delta_rule.segments.compose). Differentiable: the gradient of a start state flows back through the gathered
summaries to the ranks that made them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from qla_megatron.ops import chunk_gated_delta_rule, segment_summary
from qla_megatron.ops.gated_delta_rule.inputs import check_cu_seqlens, check_inputs
from qla_megatron.ops.gated_delta_rule.options import resolve_options
from qla_megatron.ops.gated_delta_rule.segment_plan import chain_walk
from qla_megatron.ops.gated_delta_rule.segments import compose

from .collectives import all_gather_stacked
from .layouts import check_layout, global_segments, zigzag_owner


def cp_chunk_gated_delta_rule(q, k, v, g, beta, scale=None, cp_group=None, layout="contiguous",
                              cu_seqlens=None, use_qk_l2norm_in_kernel=False, backend="auto", *, options=None,
                              initial_state=None):
    """Gated delta rule over a sequence split across the ranks of `cp_group`.

    Args:
        q, k [B, T_local, H, K]; v [B, T_local, HV, V]; g, beta [B, T_local, HV]: this rank's shard,
            laid out as `layout` says (qla_megatron.parallel.layouts; every rank holds T_local tokens).
        cp_group: the context-parallel process group (default: the whole world).
        layout: "contiguous" or "zigzag".
        cu_seqlens: int64 [N + 1] offsets of packed sequences in the *global* stream of cp * T_local
            tokens (B must be 1), the same on every rank. "contiguous": the global stream is cut into
            cp equal shards; a sequence that crosses a rank boundary carries its state across it.
            "zigzag" (Megatron's THD layout with CP): every sequence, its length a multiple of 2 cp,
            is cut into 2 cp equal segments and rank r holds segments r and 2 cp - 1 - r of each,
            sequence after sequence.
        scale, use_qk_l2norm_in_kernel, backend: as in chunk_gated_delta_rule (backend of the local
            runs; the summaries run on the torch backend for now).
        options: GDNOptions of the local runs, as in chunk_gated_delta_rule (None: the defaults). Its
            debug switch check_finite also checks that cu_seqlens is the same on every rank (a
            collective and a host read: off by default).
        initial_state: not supported yet (it would be the first segment's start state): must be None.

    Returns:
        o [B, T_local, HV, V], this rank's output, equal to the matching slice of the single-GPU result.
    """
    check_layout(layout)
    if initial_state is not None:
        raise ValueError("initial_state is not supported by cp_chunk_gated_delta_rule yet (every sequence "
                         "starts from zero); pass initial_state=None")
    if cp_group is not None and not isinstance(cp_group, dist.ProcessGroup):
        raise ValueError(f"cp_group must be a torch.distributed ProcessGroup or None (the default group), "
                         f"got {type(cp_group).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("cp_chunk_gated_delta_rule needs an initialized torch.distributed process group "
                         "(cp_group, or the default one)")
    options = resolve_options(options)
    check_inputs(q, k, v, g, beta, scale, check_finite=options.check_finite)
    cp = dist.get_world_size(cp_group)
    rank = dist.get_rank(cp_group)
    if cu_seqlens is not None and options.check_finite:
        _check_same_on_ranks(cu_seqlens, cp_group)
    B, T = k.shape[:2]
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, cp * T)
    elif layout == "zigzag" and T % 2:
        raise ValueError(f"layout='zigzag' needs an even local length (two equal halves), got T_local={T}")
    kw = dict(scale=scale, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, options=options)
    if cu_seqlens is not None and layout == "zigzag":
        return _zigzag_varlen(q, k, v, g, beta, cu_seqlens, cp, rank, cp_group, backend, kw)
    if cu_seqlens is not None:
        return _contiguous_varlen(q, k, v, g, beta, cu_seqlens, cp, rank, cp_group, backend, kw)

    # One sequence per batch row, crossing every rank: the local segments in global order.
    local = global_segments(layout, cp, rank)
    pieces = [slice(i * T // len(local), (i + 1) * T // len(local)) for i in range(len(local))]
    summaries = torch.stack([_summary(k[:, p], v[:, p], g[:, p], beta[:, p], kw) for p in pieces])
    gathered = all_gather_stacked(summaries, cp_group)           # [cp, n_local, B, HV, K, K + V]
    order = {gi: (r, i) for r in range(cp) for i, gi in enumerate(global_segments(layout, cp, r))}
    ordered = torch.stack([gathered[order[gi]] for gi in range(len(order))])
    starts = _compose(ordered, k.shape[-1])                     # [n_global, B, HV, K, V]
    outs = [chunk_gated_delta_rule(q[:, p], k[:, p], v[:, p], g[:, p], beta[:, p], initial_state=starts[gi],
                                   backend=backend, **kw)[0] for p, gi in zip(pieces, local)]
    return torch.cat(outs, dim=1)


def _check_same_on_ranks(cu_seqlens, group):
    """Debug check: cu_seqlens is the same on every rank (else ValueError naming it). Two all-gathers
    (its length, then its values) and a host read."""
    cu = cu_seqlens.to(torch.int64).reshape(-1)
    cp = dist.get_world_size(group)
    n = torch.tensor([cu.numel()], dtype=torch.int64, device=cu.device)
    sizes = [torch.empty_like(n) for _ in range(cp)]
    dist.all_gather(sizes, n, group=group)
    if len({int(t) for t in sizes}) != 1:
        raise ValueError(f"cu_seqlens must be the same on every rank; their lengths differ: {[int(t) for t in sizes]}")
    values = [torch.empty_like(cu) for _ in range(cp)]
    dist.all_gather(values, cu.contiguous(), group=group)
    if any(not torch.equal(vals, values[0]) for vals in values):
        raise ValueError(f"cu_seqlens must be the same on every rank; got {[vals.tolist() for vals in values]}")


def _connected_zero(x):
    """Zeros that stay in the autograd graph of x. Every rank must run the all-gather's backward (an
    all-reduce), also a rank whose output does not depend on any gathered summary."""
    return x * 0


def _summary(k, v, g, beta, kw, cu_seqlens=None):
    """[N, HV, K, K + V]: transition M and state_from_zero S_ext side by side (N = B without
    cu_seqlens), the form the ranks exchange."""
    ext, M = segment_summary(k, v, g, beta, cu_seqlens, use_qk_l2norm_in_kernel=kw["use_qk_l2norm_in_kernel"])
    return torch.cat([M, ext], dim=-1)


def _compose(ordered, K: int):
    """Start states of consecutive segments from their [M | S_ext] summaries in global order
    [NS, ..., K, K + V] (the leading dims batch sequences: one product per step for all), the first
    from zeros that stay in the graph: segments.compose on a one-chain walk, as intra-card CP
    composes (the torch implementation; differentiable)."""
    NS = ordered.shape[0]
    return compose(chain_walk(NS - 1), ordered, _connected_zero(ordered[:1, ..., K:]), NS)


def _contiguous_varlen(q, k, v, g, beta, cu_seqlens, cp, rank, group, backend, kw):
    """Packed sequences (B = 1) in the contiguous layout. A rank passes on the state of its last
    piece; its transition passes the incoming state through only if that piece spans the whole shard
    and continues a sequence from before (otherwise M = 0: the sequence started on this rank)."""
    T = k.shape[1]
    start, end = rank * T, (rank + 1) * T
    bounds = cu_seqlens.tolist()
    local = sorted({start, end} | {b for b in bounds if start < b < end})
    local_cu = torch.tensor([b - start for b in local], dtype=torch.int64, device=k.device)
    continues = start not in bounds
    last = local[-2] - start
    summary = _summary(k[:, last:], v[:, last:], g[:, last:], beta[:, last:], kw)  # [1, HV, K, K + V]
    K = k.shape[-1]
    if not (continues and last == 0):
        summary = torch.cat([torch.zeros_like(summary[..., :K]), summary[..., K:]], dim=-1)
    gathered = all_gather_stacked(summary, group)[:, 0]             # [cp, HV, K, K + V]
    starts = _compose(gathered, K)
    n_local = len(local) - 1
    first = starts[rank] if continues else _connected_zero(starts[rank])
    h0 = torch.cat([first[None], starts.new_zeros((n_local - 1,) + tuple(starts.shape[1:]))])
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, cu_seqlens=local_cu, backend=backend, **kw)
    return o


def zigzag_piece_lengths(cu_seqlens, cp: int) -> list[int]:
    """Lengths of a rank's local pieces in the zigzag THD layout: two per sequence, L_n / (2 cp) each."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    bad = [L for L in lens if L % (2 * cp)]
    if bad:
        raise ValueError(f"layout='zigzag' with cu_seqlens needs every sequence length to be a multiple of "
                         f"2 * cp = {2 * cp} (Megatron pads them so), got lengths {bad}")
    return [L // (2 * cp) for L in lens for _ in range(2)]


def _zigzag_varlen(q, k, v, g, beta, cu_seqlens, cp, rank, group, backend, kw):
    """Packed sequences (B = 1) in the zigzag layout: local pieces (n, r) and (n, 2 cp - 1 - r) of
    every sequence n. Summaries of all local pieces in one varlen call; composition per sequence over
    its 2 cp segments, all sequences at once."""
    pieces = zigzag_piece_lengths(cu_seqlens, cp)
    local_cu = torch.tensor([0] + pieces, dtype=torch.int64, device=k.device).cumsum(0)
    if int(local_cu[-1]) != k.shape[1]:
        raise ValueError(f"this rank holds T_local={k.shape[1]} tokens, but cu_seqlens implies "
                         f"{int(local_cu[-1])} in the zigzag layout")
    gathered = all_gather_stacked(_summary(k, v, g, beta, kw, local_cu), group)   # [cp, 2N, HV, K, K + V]
    # global segment gi of every sequence n is piece 2 n + slot on its owner
    ordered = torch.stack([gathered[owner, slot::2]
                           for owner, slot in (zigzag_owner(gi, cp) for gi in range(2 * cp))])
    starts = _compose(ordered, k.shape[-1])                                   # [2 cp, N, HV, K, V]
    h0 = torch.stack([starts[rank], starts[2 * cp - 1 - rank]], dim=1).flatten(0, 1)   # [2N, HV, K, V]
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, cu_seqlens=local_cu, backend=backend, **kw)
    return o
