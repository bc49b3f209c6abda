"""The segment plan: one description of how sequences are cut into segments (DESIGN §2), for every
user of the segment mechanism (docs/segments.md).

A `SegmentPlan` (from `plan_segments(seq_bounds, segment_len)`, cached by shape) holds, on the host:

    segments in sequence order    bounds (NS + 1 token offsets), seq, index within the sequence, first
    main-pass rows                row[i]: segment i's row in the kernels' main pass (longest first)
    summary rows                  the segments with a successor (forward) / a predecessor (backward)
    walks                         `Walk`: per sequence, which summary row each composition step reads
                                  and which output row it writes; forward (first to last) and backward
                                  (last to first)

and `kernel_tables(device)` gives the int32 tables the Hopper kernels read (segs, bsegs, sum_segs,
bsum_segs, chunks; the walks' meta / srow / zrow), copied to the device once per plan and device.
Batch rows (no cu_seqlens) take this host plan: their bounds are a function of the shape, so it is
built once per shape.

Packed sequences take `packed_tables(cu_seqlens, T, segment_len)` instead: the same tables built on
the device from the cu_seqlens tensor with tensor ops whose sizes depend on shapes only (nothing is
read on the host, so no device->host sync). Every size is an upper bound over all packings of N
sequences (each >= 1 token) into T tokens, and the rows past the real ones are no-ops for the
kernels (padding rows, docs/segments.md):

    chunks     (T - N) // 64 + N rows; a padding row is (T, 0): no valid tokens
    segments   (T - N) // S + N rows with segments of S tokens (N without segments); a padding row
               is (T, T, c, row, -1): no tokens, no final-state / dh0 row; c = the real chunk count
               (>= 1), so a kernel's clamped look at chunk c - 1 stays in a real row
    summaries  (T - N) // S rows; a padding row is (T, T, c, 0, its own row): it writes a summary
               row that no walk reads
    walks      (T - N) // S steps per sequence, padded with 0 past each sequence's J (the compose
               kernel loops over J only)

With the padding rows removed the tables equal kernel_tables' for the same packing
(tests/ops/test_segment_plan.py). With segments the device tables always compose (a sequence of
one segment is a walk of 0 steps that writes its start state), where the host plan composes only
if some sequence has more than one segment.

The composition a walk describes, for each sequence q (segments.compose runs it):

    Z[0] = z0[q] (or 0),    Z[j + 1] = M_j Z[j] + S_ext_j,    [M_j | S_ext_j] = summ[srow[q][j]],
    output Z[j] to row zrow[q][j],  j = 0 .. J[q]

Warm-up default of the gate-driven summaries, stated here once: WARMUP_CHUNKS; the threshold on the
decay over the warm-up window: GATE_LOG_THRESHOLD (the Hopper kernels' forward.GATE_DECAY is its
exponential).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

CHUNK = 64
WARMUP_CHUNKS = 4            # gate mode: chunks of warm-up before a segment (IntraCPConfig, segmented op)
GATE_LOG_THRESHOLD = -10.0   # gate mode: a window whose summed log decay is below this hides the past


@dataclass(frozen=True)
class Walk:
    """A composition's walk, per sequence q: J[q] steps, the row z0[q] of its initial value, the summary
    row srow[q][j] of step j (j < J[q]) and the output row zrow[q][j] of Z[j] (j <= J[q]). srow and
    zrow are padded with 0 to the longest walk, as compose.py's kernel reads them."""
    J: tuple
    z0: tuple
    srow: tuple
    zrow: tuple

    def tensors(self, device) -> "WalkTables":
        """The walk as compose.py reads it, int32 on `device` (cached per walk and device)."""
        return _walk_tensors(self, torch.device(device))


class WalkTables(NamedTuple):
    """A walk on the device: meta [NQ, 2] = (J, z0 row), srow [NQ, MJ], zrow [NQ, MJ + 1] int32, MJ >= the
    longest J (columns past a sequence's J are 0 and never read)."""
    meta: torch.Tensor
    srow: torch.Tensor
    zrow: torch.Tensor

    def to_walk(self) -> Walk:
        """The host Walk (reads the tables: for the torch reference of the composition and tests)."""
        meta, srow, zrow = self.meta.tolist(), self.srow.tolist(), self.zrow.tolist()
        return Walk(tuple(J for J, _ in meta), tuple(z for _, z in meta), tuple(map(tuple, srow)),
                    tuple(map(tuple, zrow)))


def chain_walk(n_segments: int) -> Walk:
    """One sequence of n_segments consecutive summaries (rows 0 ..), walked to its end: outputs rows
    0 .. n_segments, the last one the end state."""
    return Walk((n_segments,), (0,), (tuple(range(n_segments)),), (tuple(range(n_segments + 1)),))


@functools.lru_cache(maxsize=128)
def _walk_tensors(walk: Walk, device: torch.device) -> tuple:
    meta = [(J, z) for J, z in zip(walk.J, walk.z0)]
    return WalkTables(_i32(meta, device), _i32(list(walk.srow), device), _i32(list(walk.zrow), device))


def _i32(rows, device):
    return torch.tensor(rows, dtype=torch.int32).to(device)


@dataclass(frozen=True)
class KernelTables:
    """The tables of one plan on one device. segs, bsegs [NS, 5] = (start, end, first chunk, row of the
    start state / end adjoint, row of the final state / dh0 or -1), in main-pass row order; chunks
    [NC, 2] = (first token, valid tokens); with a composition: sum_segs / bsum_segs [NSS, 5] =
    (start, end, first chunk, 0, summary row) and the walks (WalkTables). From packed_tables, NC and
    NS count the padding rows too (the module docstring)."""
    chunks: torch.Tensor
    segs: torch.Tensor
    bsegs: torch.Tensor
    NC: int
    NS: int
    sum_segs: Optional[torch.Tensor] = None
    bsum_segs: Optional[torch.Tensor] = None
    walk: Optional[WalkTables] = None
    bwalk: Optional[WalkTables] = None


@dataclass(frozen=True)
class SegmentPlan:
    """Segments of the packed token stream (see the module docstring). Per segment i in sequence
    order: tokens [bounds[i], bounds[i + 1]), sequence seq[i], index[i] within it, first[i] whether it
    starts its sequence, chunk0[i] its first chunk, row[i] its main-pass row. fwd_row / bwd_row: the
    summary row of each segment with a successor / predecessor (else -1)."""
    seq_bounds: tuple
    segment_len: Optional[int]
    bounds: tuple
    seq: tuple
    index: tuple
    first: tuple
    chunk0: tuple
    row: tuple
    fwd_row: tuple
    bwd_row: tuple
    chunks: tuple               # (first token, valid tokens) of every chunk

    @property
    def NS(self) -> int:
        return len(self.seq)

    @property
    def N(self) -> int:
        return len(self.seq_bounds) - 1

    @property
    def composes(self) -> bool:
        """Whether some sequence has more than one segment (then summaries and a composition run)."""
        return any(not f for f in self.first)

    def segments_of(self, n: int) -> list:
        return [i for i in range(self.NS) if self.seq[i] == n]

    @functools.cached_property
    def walk(self) -> Optional[Walk]:
        """Forward: each sequence's segments first to last, Z[j] = segment j's start state."""
        return self._walk(reverse=False) if self.composes else None

    @functools.cached_property
    def bwalk(self) -> Optional[Walk]:
        """Backward: last to first, Z[j] = the end adjoint of segment J - j."""
        return self._walk(reverse=True) if self.composes else None

    def _walk(self, reverse: bool) -> Walk:
        per_seq = [self.segments_of(n) for n in range(self.N)]
        maxj = max(len(s) for s in per_seq) - 1
        J, z0, srow, zrow = [], [], [], []
        for n, segs in enumerate(per_seq):
            order = segs[::-1] if reverse else segs
            summ = self.bwd_row if reverse else self.fwd_row
            # step j reads the summary of the segment it crosses: order[j] (forward: a successor
            # follows it; backward: a predecessor precedes it)
            s = [summ[i] for i in order[:-1]]
            z = [self.row[i] for i in order]
            J.append(len(segs) - 1)
            z0.append(n)
            srow.append(tuple(s + [0] * (maxj - len(s))))
            zrow.append(tuple(z + [0] * (maxj + 1 - len(z))))
        return Walk(tuple(J), tuple(z0), tuple(srow), tuple(zrow))

    def kernel_tables(self, device) -> KernelTables:
        return _tables(self, torch.device(device))


def _check_segment_len(segment_len) -> None:
    if segment_len is not None and (isinstance(segment_len, bool) or not isinstance(segment_len, int)
                                    or segment_len <= 0 or segment_len % CHUNK):
        raise ValueError(f"segment_len must be a positive multiple of the chunk size {CHUNK} or None, "
                         f"got {segment_len!r}")


def plan_segments(seq_bounds, segment_len: Optional[int] = None) -> SegmentPlan:
    """Cut every sequence into pieces of segment_len tokens (a multiple of 64; the last one shorter),
    or keep it whole (None). seq_bounds: the N + 1 sequence offsets in the packed stream."""
    _check_segment_len(segment_len)
    return _plan(tuple(int(b) for b in seq_bounds), segment_len)


@functools.lru_cache(maxsize=128)
def _plan(seq_bounds: tuple, segment_len: Optional[int]) -> SegmentPlan:
    N = len(seq_bounds) - 1
    chunks, seq_chunk0 = [], []
    for n in range(N):
        seq_chunk0.append(len(chunks))
        chunks += [(t, min(CHUNK, seq_bounds[n + 1] - t)) for t in range(seq_bounds[n], seq_bounds[n + 1], CHUNK)]
    bounds, seq, index, chunk0 = [], [], [], []
    for n in range(N):
        step = segment_len or seq_bounds[n + 1] - seq_bounds[n]
        for j, s in enumerate(range(seq_bounds[n], seq_bounds[n + 1], step)):
            bounds.append(s)
            seq.append(n)
            index.append(j)
            chunk0.append(seq_chunk0[n] + (s - seq_bounds[n]) // CHUNK)
    bounds.append(seq_bounds[-1])
    NS = len(seq)
    first = [j == 0 for j in index]
    last = [i == NS - 1 or seq[i + 1] != seq[i] for i in range(NS)]
    # Main-pass rows: longest segments first (a stable sort), so the grid's last programs are short.
    order = sorted(range(NS), key=lambda i: -(bounds[i + 1] - bounds[i]))
    row = [0] * NS
    for r, i in enumerate(order):
        row[i] = r

    def rows(keep):
        out, r = [], 0
        for i in range(NS):
            out.append(r if keep[i] else -1)
            r += bool(keep[i])
        return out

    return SegmentPlan(seq_bounds, segment_len, tuple(bounds), tuple(seq), tuple(index), tuple(first),
                       tuple(chunk0), tuple(row), tuple(rows([not x for x in last])),
                       tuple(rows([not x for x in first])), tuple(chunks))


@functools.lru_cache(maxsize=64)
def _tables(plan: SegmentPlan, device: torch.device) -> KernelTables:
    order = sorted(range(plan.NS), key=lambda i: plan.row[i])
    segs, bsegs = [], []
    for i in order:
        s, e, c0, n = plan.bounds[i], plan.bounds[i + 1], plan.chunk0[i], plan.seq[i]
        # Row of the start state (forward) / end adjoint (backward): the composed row when segmented,
        # else the sequence's h0 / dht row. Last column: the final-state (forward) / dh0 (backward) row.
        init = plan.row[i] if plan.segment_len else n
        last = i == plan.NS - 1 or plan.seq[i + 1] != n
        segs.append((s, e, c0, init, n if last else -1))
        bsegs.append((s, e, c0, init, n if plan.first[i] else -1))
    tables = dict(chunks=_i32(list(plan.chunks), device), segs=_i32(segs, device), bsegs=_i32(bsegs, device),
                  NC=len(plan.chunks), NS=plan.NS)
    if plan.segment_len and plan.composes:
        tables.update(sum_segs=summary_segs(plan, plan.fwd_row, device),
                      bsum_segs=summary_segs(plan, plan.bwd_row, device),
                      walk=plan.walk.tensors(device), bwalk=plan.bwalk.tensors(device))
    return KernelTables(**tables)


def summary_segs(plan: SegmentPlan, rows, device) -> torch.Tensor:
    """The summary passes' table [n, 5] = (start, end, first chunk, 0, summary row) of the segments i
    with rows[i] >= 0 (their summary row), in segment order."""
    return _i32([(plan.bounds[i], plan.bounds[i + 1], plan.chunk0[i], 0, r) for i, r in enumerate(rows) if r >= 0],
                device)


def max_pieces(T: int, N: int, piece: int) -> int:
    """The most pieces of `piece` tokens that N sequences of >= 1 token packed into T tokens can be
    cut into (each cut from its start, the last piece shorter): sum_n ceil(L_n / piece) <=
    (T - N) // piece + N, reached by N - 1 sequences of one token and one of T - N + 1."""
    return max(T - N, 0) // piece + N


def packed_tables(cu_seqlens: torch.Tensor, T: int, segment_len: Optional[int] = None) -> KernelTables:
    """The kernels' tables of a packing, built on cu_seqlens' device without reading it: the same
    tables as plan_segments(cu_seqlens.tolist(), segment_len).kernel_tables(device) plus padding rows
    (module docstring), every size a function of T, N = len(cu_seqlens) - 1 and segment_len only.

    cu_seqlens: int32 or int64 [N + 1], 0 = c_0 < ... < c_N = T (not checked here: reading it would
    sync). Values outside that contract give wrong tables but never a row outside [0, T] tokens or
    outside the tables' chunks: cu_seqlens is clamped to [0, T] and made non-decreasing first."""
    _check_segment_len(segment_len)
    dev = cu_seqlens.device
    N = cu_seqlens.numel() - 1
    i64 = dict(dtype=torch.int64, device=dev)
    cu = cu_seqlens.to(torch.int64).clamp(0, T).cummax(0).values
    start, end = cu[:-1], cu[1:]
    length = end - start

    # Chunks of 64 tokens of every sequence, in sequence order; padding rows (T, 0) after them.
    n_chunks = (length + CHUNK - 1) // CHUNK
    chunk_end = n_chunks.cumsum(0)
    chunk_off = chunk_end - n_chunks                      # first chunk of each sequence
    NC = max_pieces(T, N, CHUNK)
    r = torch.arange(NC, **i64)
    n_of = torch.searchsorted(chunk_end, r, right=True)   # the sequence holding chunk r; N past the last
    real = n_of < N
    n_of = n_of.clamp(max=N - 1)
    t0 = start[n_of] + CHUNK * (r - chunk_off[n_of])
    chunks = torch.stack([torch.where(real, t0, T), torch.where(real, (end[n_of] - t0).clamp(max=CHUNK), 0)], 1)
    pad_chunk = chunk_end[-1].clamp(min=1)                # the real chunk count (>= 1: see the docstring)

    # Segments in sequence order: seq, index j within it, tokens [s, e), first chunk c0.
    if segment_len is None:
        NS = N
        seq = torch.arange(N, **i64)
        s, e, c0 = start, end, chunk_off
        first = last = torch.ones(N, dtype=torch.bool, device=dev)
    else:
        n_segs = (length + segment_len - 1) // segment_len
        seg_end = n_segs.cumsum(0)
        seg_off = seg_end - n_segs
        NS = max_pieces(T, N, segment_len)
        seq = torch.searchsorted(seg_end, torch.arange(NS, **i64), right=True)
        real = seq < N
        seq = seq.clamp(max=N - 1)
        j = torch.arange(NS, **i64) - seg_off[seq]
        s = torch.where(real, start[seq] + j * segment_len, T)
        e = torch.where(real, torch.minimum(s + segment_len, end[seq]), T)
        c0 = torch.where(real, chunk_off[seq] + j * (segment_len // CHUNK), pad_chunk)
        first = real & (j == 0)
        last = real & (j == n_segs[seq] - 1)

    # Main-pass rows: longest first, a stable sort (padding rows, 0 tokens, stay last).
    order = torch.argsort(e - s, descending=True, stable=True)
    row = torch.empty_like(order).scatter_(0, order, torch.arange(NS, **i64))
    none = torch.full_like(seq, -1)
    init = seq if segment_len is None else row       # the row of the start state / end adjoint
    segs = torch.stack([s, e, c0, init, torch.where(last, seq, none)], 1)[order]
    bsegs = torch.stack([s, e, c0, init, torch.where(first, seq, none)], 1)[order]
    i32 = lambda x: x.to(torch.int32)
    tables = dict(chunks=i32(chunks), segs=i32(segs), bsegs=i32(bsegs), NC=NC, NS=NS)
    if segment_len is not None:
        NSS = NS - N

        def summaries(keep):
            """(sum_segs [NSS, 5], each segment's summary row or -1): the segments with keep, in
            sequence order, then padding rows."""
            count = keep.cumsum(0)
            k = torch.arange(NSS, **i64)
            src = torch.searchsorted(count, k, right=True).clamp(max=NS - 1)   # the k-th kept segment
            ok = k < count[-1]
            tab = torch.stack([torch.where(ok, s[src], T), torch.where(ok, e[src], T),
                               torch.where(ok, c0[src], pad_chunk), torch.zeros_like(k), k], 1)
            return i32(tab), torch.where(keep, count - 1, none)

        sum_segs, fwd_row = summaries(last.logical_not() & real)
        bsum_segs, bwd_row = summaries(first.logical_not() & real)
        # Walks: sequence n steps over its segments seg_off[n] + j (forward) / + J - j (backward).
        # J <= NSS holds for offsets within the contract; the clamp keeps the walk inside its tables
        # for any others (zero-length sequences let one sequence have more segments).
        J = (n_segs - 1).clamp(max=NSS)
        jj = torch.arange(NSS + 1, **i64)[None, :]
        meta = i32(torch.stack([J, torch.arange(N, **i64)], 1))

        def walk(idx, summ_row):
            idx = idx.clamp(0, NS - 1)
            srow = torch.where(jj < J[:, None], summ_row[idx], 0)[:, :NSS]
            zrow = torch.where(jj <= J[:, None], row[idx], 0)
            return WalkTables(meta, i32(srow), i32(zrow))

        tables.update(sum_segs=sum_segs, bsum_segs=bsum_segs, walk=walk(seg_off[:, None] + jj, fwd_row),
                      bwalk=walk(seg_off[:, None] + J[:, None] - jj, bwd_row))
    return KernelTables(**tables)


def warmup_windows(plan: SegmentPlan, warmup_chunks: int):
    """For each segment that does not start its sequence: (segment index, window start, window end),
    the window being the warmup_chunks * C tokens before the segment, clipped at the sequence start."""
    out = []
    for i in range(plan.NS):
        if not plan.first[i]:
            s = plan.bounds[i]
            out.append((i, max(plan.seq_bounds[plan.seq[i]], s - warmup_chunks * CHUNK), s))
    return out
