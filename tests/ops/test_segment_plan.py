"""The one segment plan (segment_plan.SegmentPlan) gives the Hopper kernels the tables they read before
it existed, case for case: segs, bsegs, chunks, sum_segs, bsum_segs and both walks (forward and
reversed), and the torch reference's segments and gate-mode warm-up windows (2 and 4 chunks).

PINNED: sha256 digests (first 12 hex digits) of those tables, captured from the code before the plan
was unified (hopper/chunk.py's _make_plan with its _Walk tables, segments.py's SegmentPlan and
warmup_windows) for batch rows B = 1..4, varlen packings and segment lengths None, 64 .. 512. A
plain construction from the rules (below) checks the same tables readably, so a failure says which
table moved."""

import hashlib
import inspect
import json

import pytest
import torch

from qla_megatron.ops.gated_delta_rule.intra_cp import IntraCPConfig
from qla_megatron.ops.gated_delta_rule.segment_plan import WARMUP_CHUNKS, plan_segments, warmup_windows
from qla_megatron.ops.gated_delta_rule.segments import segmented_chunk_gated_delta_rule

SEGS = (None, 64, 128, 192, 256, 512)
PINNED = {   # bounds: digests for SEGS, in order
    (0, 1000): '49432820cdd8 7804098a1f31 5cb914f8d985 041742ba5a37 a6ad279ef4de 2de7b63da262',
    (0, 1000, 2000): 'bca37df757c0 0fbb26abb934 9caf87ccddc4 c50b88874554 c9a010d6cb29 578f082848b0',
    (0, 640, 1280, 1920): 'e94c906256e9 9261c0606733 6106881c2420 31bc87c39c11 7f8e7d27a218 fa9f10fbe029',
    (0, 4096, 8192, 12288, 16384): 'a803d35acfaf f48f2bdb34bc c9e61cc97311 9cc82dede754 49b8a597e875 46a062e7b5b2',
    (0, 63): 'f8c3d53494cb 6e5a907ebdb3 6e5a907ebdb3 6e5a907ebdb3 6e5a907ebdb3 6e5a907ebdb3',
    (0, 65, 130): '1f5291a48ffa 6326b80192c0 66d821b3c4a7 66d821b3c4a7 66d821b3c4a7 66d821b3c4a7',
    (0, 300, 310, 1000, 1100, 1164): 'ea851459d958 f0e15305f7e3 2ff674222629 e0df5276236d 3fd25ed08478 596a7492bde6',
    (0, 64, 640, 700): 'caaaaa98a760 6886b2b59ae5 1cdc57de5ea7 a286b5f6765b fc86d6be09fa 757a494743cd',
    (0, 100, 1700, 1764, 2400, 2401): 'a4c03d102a36 41c7e2f71f0a 1aa92d03c2f5 14b47701254d 5fc77b848f57 960e783d9c0e',
    (0, 2000, 2037, 3537, 4237): 'fda50edcdde7 108eb8d75cf0 ea2392b530d9 bfe711bf5981 aa8a276493b3 b360ea0ad430',
    (0, 1, 70, 134, 200): 'd9184e28d78b 77409103fe06 d2a80acd0fe1 d2a80acd0fe1 d2a80acd0fe1 d2a80acd0fe1',
    (0, 512, 1536, 1537, 3000): '3607b5241272 285b119681de 8d9c39e84c47 041d237ab7ba 29128cc8a4d0 b72ba078c663',
}
CASES = [pytest.param(b, s, id=f"N{len(b) - 1}-T{b[-1]}-seg{s}") for b in PINNED for s in SEGS]


def tables(bounds, seg):
    """The plan's tables as plain lists, in the form the digests were taken of."""
    p = plan_segments(bounds, seg)
    t = p.kernel_tables("cpu")
    lists = lambda x: None if x is None else x.tolist()
    walk = lambda w: None if w is None else [x.tolist() for x in w]
    hopper = dict(NC=t.NC, NS=t.NS, chunks=t.chunks.tolist(), segs=t.segs.tolist(), bsegs=t.bsegs.tolist(),
                  sum_segs=lists(t.sum_segs), bsum_segs=lists(t.bsum_segs), walk=walk(t.walk), bwalk=walk(t.bwalk))
    ref = None
    if seg:
        ref = dict(bounds=list(p.bounds), seq=list(p.seq), first=list(p.first),
                   w2=[list(x) for x in warmup_windows(p, 2)], w4=[list(x) for x in warmup_windows(p, 4)])
    return dict(hopper=hopper, torch=ref)


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def plain_tables(bounds, seg):
    """The rules, written out: chunks of 64 per sequence; segments of seg tokens from each sequence's
    start (whole sequences without seg); main-pass rows longest first (ties in sequence order); summary
    rows numbered over the segments with a successor (forward) / predecessor (backward); walks per
    sequence, padded with 0."""
    N = len(bounds) - 1
    chunks, c0 = [], {}
    for n in range(N):
        for t in range(bounds[n], bounds[n + 1], 64):
            c0[t] = len(chunks)
            chunks.append([t, min(64, bounds[n + 1] - t)])
    pieces = {}                                   # (n, j) -> (start, end)
    for n in range(N):
        a, b = bounds[n], bounds[n + 1]
        step = seg or b - a
        for j, s in enumerate(range(a, b, step)):
            pieces[(n, j)] = (s, min(s + step, b))
    keys = list(pieces)
    J = {n: max(j for m, j in keys if m == n) for n in range(N)}
    by_len = sorted(keys, key=lambda nj: pieces[nj][0] - pieces[nj][1])
    row = {nj: r for r, nj in enumerate(by_len)}
    segs = [[*pieces[nj], c0[pieces[nj][0]], row[nj] if seg else nj[0], nj[0] if nj[1] == J[nj[0]] else -1]
            for nj in by_len]
    bsegs = [s[:4] + [nj[0] if nj[1] == 0 else -1] for s, nj in zip(segs, by_len)]
    out = dict(NC=len(chunks), NS=len(keys), chunks=chunks, segs=segs, bsegs=bsegs, sum_segs=None, bsum_segs=None,
               walk=None, bwalk=None)
    if seg and max(J.values()) > 0:
        fwd = [nj for nj in keys if nj[1] < J[nj[0]]]
        bwd = [nj for nj in keys if nj[1] > 0]
        out["sum_segs"] = [[*pieces[nj], c0[pieces[nj][0]], 0, r] for r, nj in enumerate(fwd)]
        out["bsum_segs"] = [[*pieces[nj], c0[pieces[nj][0]], 0, r] for r, nj in enumerate(bwd)]
        mj = max(J.values())
        meta = [[J[n], n] for n in range(N)]
        pad = lambda xs, m: xs + [0] * (m - len(xs))
        out["walk"] = [meta, [pad([fwd.index((n, j)) for j in range(J[n])], mj) for n in range(N)],
                       [pad([row[(n, j)] for j in range(J[n] + 1)], mj + 1) for n in range(N)]]
        out["bwalk"] = [meta, [pad([bwd.index((n, J[n] - j)) for j in range(J[n])], mj) for n in range(N)],
                        [pad([row[(n, J[n] - j)] for j in range(J[n] + 1)], mj + 1) for n in range(N)]]
    return out


@pytest.mark.parametrize("bounds,seg", CASES)
def test_tables_are_pinned(bounds, seg):
    got = tables(bounds, seg)
    assert got["hopper"] == plain_tables(bounds, seg), [k for k, v in plain_tables(bounds, seg).items()
                                                         if got["hopper"][k] != v]
    assert digest(got) == PINNED[bounds].split()[SEGS.index(seg)]


def test_the_pin_can_fail():
    """A table that moves by one entry changes its digest (and the plain construction sees it)."""
    got = tables((0, 300, 310, 1000, 1100, 1164), 128)
    assert digest(got) == PINNED[(0, 300, 310, 1000, 1100, 1164)].split()[2]
    got["hopper"]["walk"][2][0][1] += 1
    assert digest(got) != PINNED[(0, 300, 310, 1000, 1100, 1164)].split()[2]
    assert got["hopper"] != plain_tables((0, 300, 310, 1000, 1100, 1164), 128)


def test_one_warmup_default():
    """The gate-driven warm-up default is stated once (segment_plan.WARMUP_CHUNKS) and used by both the
    intra-card config and the torch specification."""
    assert IntraCPConfig().warmup_chunks == WARMUP_CHUNKS == 4
    assert IntraCPConfig().gate_chunks == WARMUP_CHUNKS and IntraCPConfig(mode="exact").gate_chunks == 0
    sig = inspect.signature(segmented_chunk_gated_delta_rule)
    assert sig.parameters["warmup_chunks"].default == WARMUP_CHUNKS


def test_plan_errors_and_cache():
    with pytest.raises(ValueError, match="segment_len"):
        plan_segments((0, 100), 100)
    assert plan_segments([0, 100, 300], 64) is plan_segments((0, 100, 300), 64)
    p = plan_segments((0, 100, 300), 64)
    assert p.kernel_tables("cpu") is p.kernel_tables("cpu")
    assert p.walk.tensors("cpu")[0] is p.walk.tensors("cpu")[0]
    assert isinstance(p.walk.tensors("cpu")[0], torch.Tensor)
