"""The device plan of packed sequences in six Triton launches: segment_plan.packed_tables' tables
(the same values, padding rows included), built from the cu_seqlens tensor without reading it.

Why a kernel: packed_tables builds them with about 70 small torch ops. Their GPU work is nothing,
but their host launches are not: on the H200 a forward of 28 packed sequences at 8/2 heads took
1.81 ms where the same plan from the host took 0.45 (benchmarks/results/ops_h200.md), the op
waiting on its own plan. Here the host does six launches and one allocation; sizes are functions
of T, N and the segment length only, as in packed_tables (segment_plan's docstring has the tables'
layout and the padding rows).

    1 _sequences    one program: per sequence the clamped, non-decreasing offsets (cummax), chunk and
                    segment counts and their running sums (carried across blocks of BN sequences)
    2 _chunks       per chunk row: its sequence by binary search over the chunk ends
    3 _segments     per segment: its sequence by binary search over the segment ends; bounds, first
                    chunk, first / last flags, summary rows (forward, backward)
    4 _rows         per segment: its main-pass row, the stable longest-first rank
                    #{j: len_j > len_i} + #{j < i: len_j = len_i} (argsort(stable=True)'s order), and
                    segs / bsegs written at that row
    5 _summaries    per summary row: the k-th segment with a successor (forward) / predecessor
    6 _walks        per (sequence, step): the walks' srow and zrow

Scratch (per-sequence and per-segment int32 rows) lives in the same allocation as the tables. The
torch builder stays the reference (and the CPU path): tests/ops/test_packed_plan.py checks these
tables equal its on many packings (the Triton interpreter on the CPU, the kernels on a GPU).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..segment_plan import CHUNK, KernelTables, WalkTables, _check_segment_len, max_pieces

BN = 128          # sequences per block of _sequences (one program walks all blocks)
BR = 128          # rows per program of _chunks, _segments, _rows, _summaries
BJ = 64           # columns per step of _rows' rank loop and per program of _walks
ALIGN = 16        # every table starts at a multiple of 16 int32 (64 bytes) in the allocation
SEQ_FIELDS = 8    # start, end, chunk_off, chunk_end, n_segs, seg_off, seg_end, kept_off
SEG_FIELDS = 9    # s, e, c0, seq, first, last, fwd_row, bwd_row, rank


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _search_right(arr, x, n, LOG: tl.constexpr):
    """#{m < n: arr[m] <= x} for each x, arr non-decreasing (torch.searchsorted(right=True))."""
    lo = tl.zeros_like(x)
    hi = tl.zeros_like(x) + n
    for _ in tl.static_range(LOG):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(arr + mid, mask=active, other=0)
        go = active & (v <= x)
        lo = tl.where(go, mid + 1, lo)
        hi = tl.where(active & (v > x), mid, hi)
    return lo


@triton.jit
def _sequences(cu, seqs, N, T, S, HAS_SEG: tl.constexpr, BN: tl.constexpr):
    c0 = tl.minimum(tl.maximum(tl.load(cu).to(tl.int64), 0), T).to(tl.int32)
    carry_lo = tl.zeros([], tl.int32)     # max of the clamped cu[0 .. b - 1] (all >= 0)
    carry_hi = c0                         # max of the clamped cu[0 .. b]
    carry_chunks = tl.zeros([], tl.int32)
    carry_segs = tl.zeros([], tl.int32)
    carry_kept = tl.zeros([], tl.int32)
    for b in range(0, N, BN):
        i = b + tl.arange(0, BN)
        m = i < N
        lo = tl.minimum(tl.maximum(tl.load(cu + i, mask=m, other=0).to(tl.int64), 0), T).to(tl.int32)
        hi = tl.minimum(tl.maximum(tl.load(cu + i + 1, mask=m, other=0).to(tl.int64), 0), T).to(tl.int32)
        start = tl.maximum(tl.associative_scan(lo, 0, _max), carry_lo)
        end = tl.maximum(tl.associative_scan(hi, 0, _max), carry_hi)
        carry_lo = tl.maximum(carry_lo, tl.max(lo, 0))
        carry_hi = tl.maximum(carry_hi, tl.max(hi, 0))
        length = tl.where(m, end - start, 0)
        n_chunks = (length + 63) // 64
        chunk_end = tl.cumsum(n_chunks, 0) + carry_chunks
        carry_chunks += tl.sum(n_chunks, 0)
        if HAS_SEG:
            n_segs = (length + S - 1) // S
        else:
            n_segs = tl.where(m, 1, 0)
        seg_end = tl.cumsum(n_segs, 0) + carry_segs
        carry_segs += tl.sum(n_segs, 0)
        kept = tl.maximum(n_segs - 1, 0)
        kept_end = tl.cumsum(kept, 0) + carry_kept
        carry_kept += tl.sum(kept, 0)
        tl.store(seqs + 0 * N + i, start, mask=m)
        tl.store(seqs + 1 * N + i, end, mask=m)
        tl.store(seqs + 2 * N + i, chunk_end - n_chunks, mask=m)
        tl.store(seqs + 3 * N + i, chunk_end, mask=m)
        tl.store(seqs + 4 * N + i, n_segs, mask=m)
        tl.store(seqs + 5 * N + i, seg_end - n_segs, mask=m)
        tl.store(seqs + 6 * N + i, seg_end, mask=m)
        tl.store(seqs + 7 * N + i, kept_end - kept, mask=m)


@triton.jit
def _chunks(seqs, chunks, N, T, NC, LOG: tl.constexpr, BR: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    m = r < NC
    n_of = _search_right(seqs + 3 * N, r, N, LOG)         # the sequence holding chunk r; N past the last
    real = n_of < N
    n = tl.minimum(n_of, N - 1)
    t0 = tl.load(seqs + n) + 64 * (r - tl.load(seqs + 2 * N + n))
    valid = tl.minimum(tl.load(seqs + N + n) - t0, 64)
    tl.store(chunks + 2 * r, tl.where(real, t0, T), mask=m)
    tl.store(chunks + 2 * r + 1, tl.where(real, valid, 0), mask=m)


@triton.jit
def _segments(seqs, segsc, N, T, S, NS, HAS_SEG: tl.constexpr, LOG: tl.constexpr, BR: tl.constexpr):
    i = tl.program_id(0) * BR + tl.arange(0, BR)
    m = i < NS
    if HAS_SEG:
        seq = _search_right(seqs + 6 * N, i, N, LOG)       # N for padding rows
        real = seq < N
        n = tl.minimum(seq, N - 1)
        j = i - tl.load(seqs + 5 * N + n)
        s = tl.where(real, tl.load(seqs + n) + j * S, T)
        e = tl.where(real, tl.minimum(s + S, tl.load(seqs + N + n)), T)
        pad_chunk = tl.maximum(tl.load(seqs + 3 * N + N - 1), 1)
        c0 = tl.where(real, tl.load(seqs + 2 * N + n) + j * (S // 64), pad_chunk)
        first = real & (j == 0)
        last = real & (j == tl.load(seqs + 4 * N + n) - 1)
        kept_off = tl.load(seqs + 7 * N + n)          # summary rows of the sequences before
        fwd_row = tl.where(real & ~last, kept_off + j, -1)
        bwd_row = tl.where(real & ~first, kept_off + j - 1, -1)
    else:
        n = tl.minimum(i, N - 1)
        s = tl.load(seqs + n, mask=m, other=0)
        e = tl.load(seqs + N + n, mask=m, other=0)
        c0 = tl.load(seqs + 2 * N + n, mask=m, other=0)
        first = m
        last = m
        fwd_row = tl.zeros_like(i) - 1
        bwd_row = fwd_row
    tl.store(segsc + 0 * NS + i, s, mask=m)
    tl.store(segsc + 1 * NS + i, e, mask=m)
    tl.store(segsc + 2 * NS + i, c0, mask=m)
    tl.store(segsc + 3 * NS + i, n, mask=m)
    tl.store(segsc + 4 * NS + i, first.to(tl.int32), mask=m)
    tl.store(segsc + 5 * NS + i, last.to(tl.int32), mask=m)
    tl.store(segsc + 6 * NS + i, fwd_row, mask=m)
    tl.store(segsc + 7 * NS + i, bwd_row, mask=m)


@triton.jit
def _store_row(row, a, b, c, d, e, m):
    tl.store(row, a, mask=m)
    tl.store(row + 1, b, mask=m)
    tl.store(row + 2, c, mask=m)
    tl.store(row + 3, d, mask=m)
    tl.store(row + 4, e, mask=m)


@triton.jit
def _rows(segsc, segs, bsegs, NS, HAS_SEG: tl.constexpr, BR: tl.constexpr, BJ: tl.constexpr):
    i = tl.program_id(0) * BR + tl.arange(0, BR)
    m = i < NS
    s = tl.load(segsc + i, mask=m, other=0)
    e = tl.load(segsc + NS + i, mask=m, other=0)
    length = e - s
    rank = tl.zeros_like(i)
    for jb in range(0, NS, BJ):
        j = jb + tl.arange(0, BJ)
        mj = j < NS
        lj = tl.load(segsc + NS + j, mask=mj, other=0) - tl.load(segsc + j, mask=mj, other=1)  # -1 past NS
        ahead = (lj[None, :] > length[:, None]) | ((lj[None, :] == length[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum(ahead.to(tl.int32), 1)
    tl.store(segsc + 8 * NS + i, rank, mask=m)
    c0 = tl.load(segsc + 2 * NS + i, mask=m, other=0)
    seq = tl.load(segsc + 3 * NS + i, mask=m, other=0)
    first = tl.load(segsc + 4 * NS + i, mask=m, other=0) != 0
    last = tl.load(segsc + 5 * NS + i, mask=m, other=0) != 0
    init = rank if HAS_SEG else seq                        # the row of the start state / end adjoint
    _store_row(segs + 5 * rank, s, e, c0, init, tl.where(last, seq, -1), m)
    _store_row(bsegs + 5 * rank, s, e, c0, init, tl.where(first, seq, -1), m)


@triton.jit
def _summaries(seqs, segsc, sum_segs, bsum_segs, N, T, NS, NSS, LOG: tl.constexpr, BR: tl.constexpr):
    k = tl.program_id(0) * BR + tl.arange(0, BR)
    m = k < NSS
    total = tl.load(seqs + 7 * N + N - 1) + tl.maximum(tl.load(seqs + 4 * N + N - 1) - 1, 0)
    ok = k < total
    n = tl.maximum(_search_right(seqs + 7 * N, k, N, LOG) - 1, 0)   # the sequence of summary row k
    fseg = tl.load(seqs + 5 * N + n) + k - tl.load(seqs + 7 * N + n)
    pad_chunk = tl.maximum(tl.load(seqs + 3 * N + N - 1), 1)
    _summary_row(sum_segs + 5 * k, segsc, fseg, k, ok, m, T, NS, pad_chunk)
    _summary_row(bsum_segs + 5 * k, segsc, fseg + 1, k, ok, m, T, NS, pad_chunk)   # the segment after


@triton.jit
def _summary_row(row, segsc, seg, k, ok, m, T, NS, pad_chunk):
    g = tl.minimum(tl.maximum(seg, 0), NS - 1)
    _store_row(row, tl.where(ok, tl.load(segsc + g), T), tl.where(ok, tl.load(segsc + NS + g), T),
               tl.where(ok, tl.load(segsc + 2 * NS + g), pad_chunk), tl.zeros_like(k), k, m)


@triton.jit
def _walks(seqs, segsc, fmeta, fsrow, fzrow, bmeta, bsrow, bzrow, N, NS, NSS, BJ: tl.constexpr):
    n = tl.program_id(0)
    jj = tl.program_id(1) * BJ + tl.arange(0, BJ)
    J = tl.minimum(tl.load(seqs + 4 * N + n) - 1, NSS)
    off = tl.load(seqs + 5 * N + n)
    if tl.program_id(1) == 0:
        tl.store(fmeta + 2 * n, J)
        tl.store(fmeta + 2 * n + 1, n)
        tl.store(bmeta + 2 * n, J)
        tl.store(bmeta + 2 * n + 1, n)
    _walk_row(fsrow, fzrow, segsc + 6 * NS, segsc + 8 * NS, off + jj, jj, J, n, NS, NSS)
    _walk_row(bsrow, bzrow, segsc + 7 * NS, segsc + 8 * NS, off + J - jj, jj, J, n, NS, NSS)


@triton.jit
def _walk_row(srow, zrow, summ_rows, ranks, idx, jj, J, n, NS, NSS):
    """Steps jj of sequence n's walk: the summary row read (jj < J) and the main-pass row written."""
    g = tl.minimum(tl.maximum(idx, 0), NS - 1)
    tl.store(srow + n * NSS + jj, tl.where(jj < J, tl.load(summ_rows + g), 0), mask=jj < NSS)
    tl.store(zrow + n * (NSS + 1) + jj, tl.where(jj <= J, tl.load(ranks + g), 0), mask=jj < NSS + 1)


def packed_tables_device(cu_seqlens: torch.Tensor, T: int, segment_len: Optional[int] = None) -> KernelTables:
    """segment_plan.packed_tables(cu_seqlens, T, segment_len) in six launches on cu_seqlens' device
    (a CUDA device, or the CPU under TRITON_INTERPRET=1). Same contract: int32 / int64 cu_seqlens of
    N + 1 offsets, never read on the host; values outside 0 = c_0 < ... < c_N = T give wrong tables
    but every row stays inside [0, T] tokens and inside the tables' chunks."""
    _check_segment_len(segment_len)
    N = cu_seqlens.numel() - 1
    has_seg = segment_len is not None
    NC = max_pieces(T, N, CHUNK)
    NS = max_pieces(T, N, segment_len) if has_seg else N
    NSS = NS - N
    shapes = dict(chunks=(NC, 2), segs=(NS, 5), bsegs=(NS, 5))
    if has_seg:
        shapes.update(sum_segs=(NSS, 5), bsum_segs=(NSS, 5), fmeta=(N, 2), fsrow=(N, NSS), fzrow=(N, NSS + 1),
                      bmeta=(N, 2), bsrow=(N, NSS), bzrow=(N, NSS + 1))
    shapes.update(seqs=(SEQ_FIELDS, N), segsc=(SEG_FIELDS, NS))
    offsets, total = {}, 0
    for name, (a, b) in shapes.items():
        offsets[name] = total
        total += -(-a * b // ALIGN) * ALIGN
    buf = torch.empty(max(total, 1), dtype=torch.int32, device=cu_seqlens.device)
    t = {name: buf[offsets[name]:offsets[name] + a * b].view(a, b) for name, (a, b) in shapes.items()}
    LOG = max(N.bit_length(), 1) + 1
    S = segment_len if has_seg else 1
    seqs, segsc = t["seqs"], t["segsc"]
    _sequences[(1,)](cu_seqlens, seqs, N, T, S, HAS_SEG=has_seg, BN=BN)
    _chunks[(triton.cdiv(NC, BR),)](seqs, t["chunks"], N, T, NC, LOG=LOG, BR=BR)
    _segments[(triton.cdiv(NS, BR),)](seqs, segsc, N, T, S, NS, HAS_SEG=has_seg, LOG=LOG, BR=BR)
    _rows[(triton.cdiv(NS, BR),)](segsc, t["segs"], t["bsegs"], NS, HAS_SEG=has_seg, BR=BR, BJ=BJ)
    tables = dict(chunks=t["chunks"], segs=t["segs"], bsegs=t["bsegs"], NC=NC, NS=NS)
    if has_seg:
        if NSS:
            _summaries[(triton.cdiv(NSS, BR),)](seqs, segsc, t["sum_segs"], t["bsum_segs"], N, T, NS, NSS,
                                                LOG=LOG, BR=BR)
        _walks[(N, triton.cdiv(NSS + 1, BJ))](seqs, segsc, t["fmeta"], t["fsrow"], t["fzrow"], t["bmeta"],
                                              t["bsrow"], t["bzrow"], N, NS, NSS, BJ=BJ)
        tables.update(sum_segs=t["sum_segs"], bsum_segs=t["bsum_segs"],
                      walk=WalkTables(t["fmeta"], t["fsrow"], t["fzrow"]),
                      bwalk=WalkTables(t["bmeta"], t["bsrow"], t["bzrow"]))
    return KernelTables(**tables)
