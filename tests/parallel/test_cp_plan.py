"""The cross-GPU plan (parallel/cp_plan.py) on the host: every rank's pieces tile its local stream
and, per sequence, the chains of pieces over the ranks tile the sequence in order; the walks connect
exactly the consecutive pieces (forward from each piece to its successor, backward the reverse)."""

import random

import pytest

from qla_megatron.parallel.cp_plan import _rank_pieces, cp_plan


def _cases():
    rng = random.Random(1234)
    out = [("contiguous", 4, 40, 1, (0, 5, 120, 130, 160)), ("contiguous", 4, 40, 1, (0, 40, 100, 103, 160)),
           ("zigzag", 2, 80, 1, (0, 8, 136, 160)), ("contiguous", 3, 10, 2, None), ("zigzag", 4, 6, 3, None)]
    for _ in range(40):
        layout, cp = rng.choice(["contiguous", "zigzag"]), rng.choice([1, 2, 3, 4, 8])
        if layout == "contiguous":
            T = rng.randint(1, 50)
            cuts = sorted(rng.sample(range(1, cp * T), min(rng.randint(0, 6), cp * T - 1)))
            out.append((layout, cp, T, 1, tuple([0] + cuts + [cp * T])))
        else:
            lens = [2 * cp * rng.randint(1, 5) for _ in range(rng.randint(1, 5))]
            cu = [0]
            for L in lens:
                cu.append(cu[-1] + L)
            out.append((layout, cp, sum(lens) // cp, 1, tuple(cu)))
    return out


@pytest.mark.parametrize("layout,cp,T,B,cu", _cases())
def test_chains_tile_every_sequence(layout, cp, T, B, cu):
    plan = cp_plan(layout, cp, T, B, cu)
    pieces = _rank_pieces(layout, cp, T, B, cu)
    for r, ps in enumerate(pieces):
        assert plan.bounds[r][-1] == T * B and len(plan.bounds[r]) == len(ps) + 1
        assert all(e - s == plan.bounds[r][p + 1] - plan.bounds[r][p] for p, (_, s, e) in enumerate(ps))
    seqs = {}
    for r, ps in enumerate(pieces):
        for p, (n, s, e) in enumerate(ps):
            seqs.setdefault(n, []).append((s, e, r, p))
    bounds = list(zip(cu[:-1], cu[1:])) if cu is not None else [(0, cp * T)] * B
    assert sorted(seqs) == list(range(len(bounds)))
    # Forward walk: Z[0] at the first piece (zero), Z[j + 1] = step j's summary (piece j) applied.
    fw = {}
    for J, srow, zrow in zip(plan.fwalk.J, plan.fwalk.srow, plan.fwalk.zrow):
        fw[zrow[0]] = None
        for j in range(J):
            fw[zrow[j + 1]] = srow[j]
    slot_of = {(r, p): r * plan.Q + i for r in range(cp) for i, p in enumerate(plan.fsend[r])}
    bslot_of = {(r, p): r * plan.QB + i for r in range(cp) for i, p in enumerate(plan.bsend[r])}
    bw = {}
    for J, srow, zrow in zip(plan.bwalk.J, plan.bwalk.srow, plan.bwalk.zrow):
        for j in range(J):
            bw[zrow[j + 1]] = srow[j]
    for n, ps in seqs.items():
        ps.sort()
        a, e = bounds[n]
        assert ps[0][0] == a and ps[-1][1] == e and all(x[1] == y[0] for x, y in zip(ps, ps[1:]))
        for i, (_, _, r, p) in enumerate(ps):
            first, last = i == 0, i == len(ps) - 1
            assert (plan.start_row[r][p] == -1) == first and (plan.end_row[r][p] == -1) == last
            if not first:       # its start: the composition's step with its predecessor's summary
                assert fw[plan.start_row[r][p]] == slot_of[ps[i - 1][2:]]
            if not last:        # its end adjoint: the reverse step with its successor's [M^T | dS_ext]
                assert bw[plan.end_row[r][p]] == bslot_of[ps[i + 1][2:]]
    assert all(len(f) <= plan.Q and len(b) <= plan.QB for f, b in zip(plan.fsend, plan.bsend))


def test_plan_errors():
    with pytest.raises(ValueError, match="even local length"):
        cp_plan("zigzag", 2, 33)
    with pytest.raises(ValueError, match="multiple of 2 \\* cp = 4"):
        cp_plan("zigzag", 2, 33, 1, (0, 30, 66))
    with pytest.raises(ValueError, match="T_local=30 tokens, but cu_seqlens implies 40"):
        cp_plan("zigzag", 2, 30, 1, (0, 8, 80))
    with pytest.raises(ValueError, match="layout must be one of"):
        cp_plan("ring", 2, 30)
