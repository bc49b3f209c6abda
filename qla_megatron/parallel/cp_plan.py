"""The plan of cross-GPU context parallelism: which pieces of which sequence every rank holds, and the
two walks that connect them (docs/segments.md).

A rank's local token stream is cut into pieces, one per (sequence, rank) part: with one sequence per
batch row, each row's part on this rank ("contiguous": one piece a row; "zigzag": two); with packed
sequences, each sequence's intersection with the shard ("contiguous") or its two chunks on this rank
("zigzag", Megatron's THD layout). The pieces of one sequence, over all ranks in sequence order, form
a chain:

    forward   S_start[j + 1] = M_j S_start[j] + S_ext_j              (S_start[0] = 0)
    backward  dS_end[j - 1] = M_j^T dS_end[j] + dS_ext_j              (dS_end[last] = 0)

(M_j, S_ext_j) is piece j's summary; dS_ext_j the adjoint of its start from its own outputs (its
backward from a zero end adjoint). Every rank sends the summaries of its pieces that have a successor
(forward) or a predecessor (backward) in fixed-size slots, so one all-gather of equal shapes serves;
the walks (segment_plan.Walk, as segments.compose takes them) read the gathered rows, rank-major.
The plan is a function of (layout, cp, the local shape, cu_seqlens) and the same on every rank.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from qla_megatron.ops.gated_delta_rule.segment_plan import Walk

from .layouts import check_layout


@dataclass(frozen=True)
class CPPlan:
    """Per rank r (tuples indexed by rank): pieces[r] its pieces in local order as (row, start, end) in
    the global stream (row: the batch row, 0 for packed sequences); bounds[r] their offsets in its
    local stream;
    fsend[r] / bsend[r] its pieces (local indices) whose summary goes into forward / backward slot
    0, 1, ... (pieces with a successor / a predecessor); start_row[r][p] the row of fwalk's output
    that is piece p's start state, end_row[r][p] the row of bwalk's output that is its end adjoint
    (-1: the piece starts / ends its sequence: zero). Q, QB: slots a rank sends (the most any rank
    needs); NF, NB: rows the walks write."""
    cp: int
    pieces: tuple
    bounds: tuple
    fsend: tuple
    bsend: tuple
    start_row: tuple
    end_row: tuple
    Q: int
    QB: int
    fwalk: Walk
    bwalk: Walk
    NF: int
    NB: int


def zigzag_piece_lengths(cu_seqlens, cp: int) -> list[int]:
    """Lengths of a rank's local pieces in the zigzag THD layout: two per sequence, L_n / (2 cp) each
    (cu_seqlens: a tensor or a sequence of ints)."""
    cu = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    bad = [L for L in lens if L % (2 * cp)]
    if bad:
        raise ValueError(f"layout='zigzag' with cu_seqlens needs every sequence length to be a multiple of "
                         f"2 * cp = {2 * cp} (Megatron pads them so), got lengths {bad}")
    return [L // (2 * cp) for L in lens for _ in range(2)]


def _rank_pieces(layout: str, cp: int, T: int, B: int, cu: Optional[tuple]) -> list:
    """Per rank, its pieces in local order as (sequence, start, end) in the sequence's own coordinates
    (the global stream's for packed sequences); empty pieces left out (they tile nothing)."""
    out = []
    for r in range(cp):
        if cu is None:
            if layout == "contiguous":
                ps = [(b, r * T, (r + 1) * T) for b in range(B)]
            else:
                c = T // 2
                ps = [p for b in range(B) for p in ((b, r * c, (r + 1) * c),
                                                     (b, (2 * cp - 1 - r) * c, (2 * cp - r) * c))]
        elif layout == "contiguous":
            lo, hi = r * T, (r + 1) * T
            ps = [(n, max(a, lo), min(e, hi)) for n, (a, e) in enumerate(zip(cu[:-1], cu[1:]))
                  if max(a, lo) < min(e, hi)]
        else:
            ps = []
            for n, (a, e) in enumerate(zip(cu[:-1], cu[1:])):
                c = (e - a) // (2 * cp)
                ps += [(n, a + r * c, a + (r + 1) * c), (n, a + (2 * cp - 1 - r) * c, a + (2 * cp - r) * c)]
            ps = [p for p in ps if p[1] < p[2]]
        out.append(ps)
    return out


def _walk(chains: list, slot_row, out_row) -> tuple:
    """The Walk over chains of pieces (each a list of (rank, piece), walked in list order): step j
    reads the summary of chain[j], Z[j] goes to out_row of chain[j]; padded to the longest walk."""
    if not chains:
        return Walk((), (), (), ()), 0
    MJ = max(len(c) - 1 for c in chains)
    J = tuple(len(c) - 1 for c in chains)
    srow = tuple(tuple(slot_row(x) for x in c[:-1]) + (0,) * (MJ - len(c) + 1) for c in chains)
    zrow = tuple(tuple(out_row[x] for x in c) + (0,) * (MJ - len(c) + 1) for c in chains)
    return Walk(J, (0,) * len(chains), srow, zrow), sum(len(c) for c in chains)


@functools.lru_cache(maxsize=64)
def cp_plan(layout: str, cp: int, T: int, B: int = 1, cu: Optional[tuple] = None) -> CPPlan:
    """The plan of `cp` ranks holding T tokens each (B rows; cu: the global cu_seqlens as a tuple of
    ints, B = 1) in `layout`. Raises ValueError where the layout cannot take the shapes."""
    check_layout(layout)
    if cu is None and layout == "zigzag" and T % 2:
        raise ValueError(f"layout='zigzag' needs an even local length (two equal halves), got T_local={T}")
    if cu is not None and layout == "zigzag":
        lens = zigzag_piece_lengths(cu, cp)
        if sum(lens) != T:
            raise ValueError(f"this rank holds T_local={T} tokens, but cu_seqlens implies {sum(lens)} in the "
                             f"zigzag layout")
    pieces = _rank_pieces(layout, cp, T, B, cu)
    bounds = []
    for ps in pieces:
        b = [0]
        for _, s, e in ps:
            b.append(b[-1] + e - s)
        bounds.append(tuple(b))
    # chains: each sequence's pieces over all ranks in sequence order (only those with 2 or more pieces)
    by_seq = {}
    for r, ps in enumerate(pieces):
        for p, (n, s, _) in enumerate(ps):
            by_seq.setdefault(n, []).append((s, r, p))
    chains = [[(r, p) for _, r, p in sorted(v)] for _, v in sorted(by_seq.items()) if len(v) > 1]
    fsend = [[] for _ in range(cp)]
    bsend = [[] for _ in range(cp)]
    for c in chains:
        for r, p in c[:-1]:
            fsend[r].append(p)
        for r, p in c[1:]:
            bsend[r].append(p)
    Q = max(1, max(len(f) for f in fsend))
    QB = max(1, max(len(b) for b in bsend))
    fslot = {(r, p): r * Q + i for r in range(cp) for i, p in enumerate(fsend[r])}
    bslot = {(r, p): r * QB + i for r in range(cp) for i, p in enumerate(bsend[r])}
    frow, brow, nf, nb = {}, {}, 0, 0
    for c in chains:
        for x in c:
            frow[x], nf = nf, nf + 1
        for x in reversed(c):
            brow[x], nb = nb, nb + 1
    fwalk, NF = _walk(chains, fslot.__getitem__, frow)
    bwalk, NB = _walk([list(reversed(c)) for c in chains], bslot.__getitem__, brow)
    firsts = {c[0] for c in chains}
    lasts = {c[-1] for c in chains}
    start_row = tuple(tuple(frow[(r, p)] if (r, p) in frow and (r, p) not in firsts else -1
                            for p in range(len(ps))) for r, ps in enumerate(pieces))
    end_row = tuple(tuple(brow[(r, p)] if (r, p) in brow and (r, p) not in lasts else -1
                          for p in range(len(ps))) for r, ps in enumerate(pieces))
    rows = tuple(tuple((n if cu is None else 0, s, e) for n, s, e in ps) for ps in pieces)
    return CPPlan(cp, rows, tuple(bounds), tuple(map(tuple, fsend)), tuple(map(tuple, bsend)), start_row, end_row,
                  Q, QB, fwalk, bwalk, NF, NB)
