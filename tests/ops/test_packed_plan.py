"""The device plan of packed sequences (segment_plan.packed_tables): the Hopper kernels' tables built
from a cu_seqlens tensor without reading it.

* With the padding rows removed the tables equal the host plan's (plan_segments(...).kernel_tables)
  on many packings: many short sequences with one long, lengths not multiples of 64, length 1,
  N = 1, int32 and int64 offsets, with and without segments.
* The padding rows are no-ops for the kernels: no tokens, no final-state / dh0 row, summary rows
  that no walk reads, chunk ids the kernels may look at inside the tables.
* No value is read: the builder, and the whole Hopper forward + backward around it (kernels
  recorded instead of run), run on 'meta' tensors, which have no values, so any .item(), .tolist(),
  nonzero(), boolean-mask index or other value-sized op raises there (checked too).
* The Triton builder the Hopper path uses on CUDA (hopper/packed_plan.py) gives the torch
  builder's tables exactly (packed_plan_checks.py: under Triton's interpreter here, on a GPU with
  `-m gpu`), offsets outside the contract included.
On a GPU, test_hopper_backward.py::test_packed_sequences_make_no_host_sync runs forward + backward of
packed sequences under torch.cuda.set_sync_debug_mode("error") against the float64 recurrence.
"""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qla_megatron.ops.gated_delta_rule.intra_cp import IntraCPConfig, packed_segment_len, plan_segment_len
from qla_megatron.ops.gated_delta_rule.segment_plan import (CHUNK, max_pieces, packed_tables, plan_segments)
from qla_megatron.ops.gated_delta_rule.segments import compose

SEG_LENS = (None, 64, 128, 192, 512, 1024)
CASES = [
    [1], [63], [64], [65], [1000], [5000],
    [1, 1, 1, 1], [1, 4999], [4999, 1], [64, 64, 64], [63, 65, 1, 129],
    [1, 16, 63, 64, 65, 3, 127, 1500, 200, 7],          # many short, one long (the GPU tests' packing)
    [3] * 40 + [3000] + [5] * 20,
    [2000, 37, 1500, 700], [700, 5, 1100, 64], [100, 1600, 64, 636, 1],
]


def _offsets(lens, dtype=torch.int64, device="cpu"):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=dtype, device=device)


def _random_lens(rng):
    kind = rng.choice(["short", "one_long", "mixed", "single"])
    if kind == "single":
        return [rng.randint(1, 3000)]
    if kind == "short":
        return [rng.randint(1, 80) for _ in range(rng.randint(1, 60))]
    if kind == "one_long":
        lens = [rng.randint(1, 130) for _ in range(rng.randint(1, 30))]
        lens.insert(rng.randrange(len(lens) + 1), rng.randint(500, 4000))
        return lens
    return [rng.choice([1, 2, 63, 64, 65, 127, 128, 129, rng.randint(1, 2500)]) for _ in range(rng.randint(1, 12))]


def _assert_tables_match(lens, seg, dtype=torch.int64):
    """packed_tables == the host plan's tables after the padding rows, and the padding rows are no-ops."""
    cu = _offsets(lens, dtype)
    T, N = int(cu[-1]), len(lens)
    host = plan_segments(cu.tolist(), seg).kernel_tables("cpu")
    dev = packed_tables(cu, T, seg)
    real_chunks = host.NC
    # Sizes from the shapes only.
    assert dev.NC == dev.chunks.shape[0] == max_pieces(T, N, CHUNK) >= host.NC
    assert dev.NS == dev.segs.shape[0] == (N if seg is None else max_pieces(T, N, seg)) >= host.NS
    for name in ("chunks", "segs", "bsegs"):
        got = getattr(dev, name)
        assert got.dtype == torch.int32
        assert got[:getattr(host, "NC" if name == "chunks" else "NS")].equal(getattr(host, name)), name
    # Padding rows: chunks with no valid token; segments with no tokens and no final / dh0 row, their
    # first chunk the real chunk count (a kernel's clamped look at chunk c - 1 stays in a real row).
    assert (dev.chunks[real_chunks:] == torch.tensor([T, 0], dtype=torch.int32)).all()
    for t in (dev.segs, dev.bsegs):
        pad = t[host.NS:]
        assert (pad[:, 0] == T).all() and (pad[:, 1] == T).all() and (pad[:, 4] == -1).all()
        assert (pad[:, 2] == max(real_chunks, 1)).all()
        assert pad[:, 3].tolist() == list(range(host.NS, dev.NS))          # their own (unwritten) rows
    if seg is None:
        assert dev.sum_segs is None and dev.walk is None and dev.bwalk is None
        return
    NSS = dev.NS - N
    assert dev.sum_segs.shape == dev.bsum_segs.shape == (NSS, 5)
    n_real = host.sum_segs.shape[0] if host.sum_segs is not None else 0
    for got, want, walk, hwalk in ((dev.sum_segs, host.sum_segs, dev.walk, host.walk),
                                   (dev.bsum_segs, host.bsum_segs, dev.bwalk, host.bwalk)):
        if want is not None:
            assert got[:n_real].equal(want)
        pad = got[n_real:]
        assert (pad[:, :2] == T).all() and pad[:, 4].tolist() == list(range(n_real, NSS))   # unread rows
        meta, srow, zrow = walk
        assert srow.shape == (N, NSS) and zrow.shape == (N, NSS + 1)
        if hwalk is not None:
            mj = hwalk.srow.shape[1]
            assert meta.equal(hwalk.meta) and srow[:, :mj].equal(hwalk.srow) and zrow[:, :mj + 1].equal(hwalk.zrow)
            assert not srow[:, mj:].any() and not zrow[:, mj + 1:].any()
        else:   # no sequence is cut: walks of 0 steps that write each sequence's start row
            assert meta[:, 0].eq(0).all() and not srow.any() and not zrow[:, 1:].any()
            assert zrow[:, 0].tolist() == [r[3] for r in sorted(host.segs.tolist(), key=lambda r: r[0])]
        # Every real main-pass row is written exactly once by the composition; summary rows read are real.
        written = [zrow[q, j].item() for q in range(N) for j in range(meta[q, 0].item() + 1)]
        assert sorted(written) == list(range(host.NS))
        read = [srow[q, j].item() for q in range(N) for j in range(meta[q, 0].item())]
        assert sorted(read) == list(range(n_real))


@pytest.mark.parametrize("seg", SEG_LENS, ids=[f"seg{s}" for s in SEG_LENS])
@pytest.mark.parametrize("lens", CASES, ids=[f"N{len(c)}-T{sum(c)}" for c in CASES])
def test_device_tables_equal_host_tables(lens, seg):
    _assert_tables_match(lens, seg)


@pytest.mark.parametrize("seed", range(8))
def test_device_tables_equal_host_tables_random(seed):
    rng = random.Random(seed)
    for _ in range(25):
        _assert_tables_match(_random_lens(rng), rng.choice(SEG_LENS), rng.choice([torch.int32, torch.int64]))


@pytest.mark.parametrize("with_z0", [False, True])
def test_device_walks_compose_like_host_walks(with_z0):
    """The composition (the torch reference) along the device walks gives every real main-pass row the
    value it gets along the host plan's walks, forward and backward."""
    lens, seg = [1, 700, 64, 1300, 5, 257], 128
    cu = _offsets(lens)
    host_plan = plan_segments(cu.tolist(), seg)
    dev = packed_tables(cu, int(cu[-1]), seg)
    N, HV, K, V = len(lens), 2, 8, 4
    for dev_walk, host_walk, rows in ((dev.walk, host_plan.walk, host_plan.fwd_row),
                                      (dev.bwalk, host_plan.bwalk, host_plan.bwd_row)):
        n_real = sum(r >= 0 for r in rows)
        summ = torch.randn(dev.NS - N, HV, K, K + V, dtype=torch.float64) * 0.3   # padding rows too
        z0 = torch.randn(N, HV, K, V, dtype=torch.float64) if with_z0 else None
        want = compose(host_walk, summ[:n_real], z0, host_plan.NS)
        got = compose(dev_walk, summ, z0, host_plan.NS)
        assert torch.equal(got, want)


def test_triton_builder_interpreted(fresh_seed):
    """hopper/packed_plan.py's kernels under TRITON_INTERPRET=1 (set before they are defined, so in a
    subprocess): every table equal to packed_tables' on every case of this file and random packings."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", QLA_TEST_SEED=str(fresh_seed), PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, "-m", "tests.ops.packed_plan_checks"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"packed plan: {len(CASES) * len(SEG_LENS) + 120} pairs equal" in run.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_builder_on_gpu(fresh_seed):
    from .packed_plan_checks import check_all
    assert check_all("cuda", fresh_seed, n_random=200, n_invalid=200) == len(CASES) * len(SEG_LENS) + 400


def test_invalid_offsets_stay_in_bounds():
    """Offsets outside the contract (not checked on a device: that would read them) give wrong tables
    but no token outside [0, T], no chunk outside the table, no row outside its tensor."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        T = int(torch.randint(1, 600, (1,), generator=gen))
        N = int(torch.randint(1, 12, (1,), generator=gen))
        cu = torch.randint(-50, T + 50, (N + 1,), generator=gen)
        for seg in (None, 64, 192):
            t = packed_tables(cu, T, seg)
            assert t.chunks[:, 0].min() >= 0 and t.chunks[:, 0].max() <= T
            assert t.chunks[:, 1].min() >= 0 and t.chunks[:, 1].max() <= CHUNK
            assert (t.chunks[:, 0] + t.chunks[:, 1] <= T).all()
            for segs in (t.segs, t.bsegs) + ((t.sum_segs, t.bsum_segs) if seg else ()):
                s, e, c0 = segs[:, 0], segs[:, 1], segs[:, 2]
                assert (s >= 0).all() and (e <= T).all() and (e >= s).all()
                assert (c0 >= 0).all() and (c0 + (e - s + CHUNK - 1) // CHUNK <= t.NC).all()
            assert t.segs[:, 3].max() < t.NS and t.segs[:, 4].max() < N
            if seg:
                meta, srow, zrow = t.walk
                assert (meta[:, 0] <= srow.shape[1]).all() and (srow < max(t.sum_segs.shape[0], 1)).all()
                assert (zrow >= 0).all() and (zrow < t.NS).all()


# --- No value is read: meta tensors -------------------------------------------------------------

def test_meta_tensors_fail_on_value_reads():
    """The check below has teeth: on a 'meta' tensor every value read raises."""
    cu = torch.empty(5, dtype=torch.int64, device="meta")
    lengths = cu[1:] - cu[:-1]
    for read in (lambda: cu.tolist(), lambda: cu[-1].item(), lambda: bool(lengths.gt(0).any()),
                 lambda: lengths.nonzero(), lambda: lengths[lengths > 64], lambda: cu.cpu(),
                 lambda: torch.repeat_interleave(lengths), lambda: plan_segments(cu, 64)):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()


@pytest.mark.parametrize("seg", SEG_LENS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_builder_reads_no_value(seg, dtype):
    T, N = 5000, 7
    t = packed_tables(torch.empty(N + 1, dtype=dtype, device="meta"), T, seg)
    assert t.chunks.shape == (max_pieces(T, N, CHUNK), 2) and t.chunks.device.type == "meta"
    NS = N if seg is None else max_pieces(T, N, seg)
    assert t.segs.shape == t.bsegs.shape == (NS, 5)
    if seg is not None:
        assert t.sum_segs.shape == (NS - N, 5) and t.walk.zrow.shape == (N, NS - N + 1)


class _Recorder:
    """Stands in for a kernel factory: records its kwargs and the tensors its kernel is called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        def kern(*tensors):
            self.calls.append((kwargs, tensors))
        return kern


@pytest.fixture
def recorded_kernels(monkeypatch):
    from qla_megatron.ops.gated_delta_rule.hopper import backward as hback
    from qla_megatron.ops.gated_delta_rule.hopper import chunk as hchunk
    recs = {name: _Recorder() for name in ("prepare", "forward", "compose", "dh", "grads")}
    monkeypatch.setattr(hchunk, "prepare_kernel", recs["prepare"])
    monkeypatch.setattr(hchunk, "forward_kernel", recs["forward"])
    monkeypatch.setattr(hchunk, "compose_kernel", recs["compose"])
    monkeypatch.setattr(hback, "backward_dh_kernel", recs["dh"])
    monkeypatch.setattr(hback, "backward_grads_kernel", recs["grads"])
    monkeypatch.setattr(hchunk, "_num_sms", lambda index: 132)
    return recs


@pytest.mark.parametrize("cfg", [IntraCPConfig(), IntraCPConfig(enabled=False), IntraCPConfig(segment_len=256),
                                 IntraCPConfig(mode="exact")], ids=["default", "off", "seg256", "exact"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "batch"])
def test_hopper_forward_backward_reads_no_value(recorded_kernels, cfg, packed):
    """The Hopper path's forward + backward (the autograd Function, kernels recorded) on meta tensors:
    input checks, plan, launches and backward run without reading a value, packed or not, with
    intra-card CP planned (the default packs the shapes into segments here), off, or forced."""
    from qla_megatron.ops.gated_delta_rule.hopper.autograd import run
    from qla_megatron.ops.gated_delta_rule.inputs import check_inputs
    B, T, H, HV, K, V, N = (1, 8192, 2, 4, 128, 128, 5) if packed else (2, 4096, 2, 4, 128, 128, 2)
    meta = dict(device="meta", requires_grad=True)
    q, k = (torch.empty(B, T, H, K, dtype=torch.bfloat16, **meta) for _ in range(2))
    v = torch.empty(B, T, HV, V, dtype=torch.bfloat16, **meta)
    g, beta = (torch.empty(B, T, HV, **meta) for _ in range(2))
    h0 = torch.empty(N, HV, K, V, **meta)
    cu = torch.empty(N + 1, dtype=torch.int64, device="meta") if packed else None
    assert check_inputs(q, k, v, g, beta, None, h0, cu) == N
    o, ht = run(q, k, v, g, beta, None, h0, True, cu, True, intra_cp=cfg)
    (o.float().sum() + ht.sum()).backward()
    assert q.grad.shape == q.shape and g.grad.shape == g.shape and h0.grad.shape == h0.shape
    if packed:
        seg = packed_segment_len(T, N, HV, K, V, 132, 128, cfg)
    else:
        seg = plan_segment_len([T] * B, HV, K, V, 132, 128, cfg)
        seg = seg if seg is not None and seg < T else None
    assert (seg is None) == (not cfg.enabled), "the default plans segments for these shapes"
    forward_passes = recorded_kernels["forward"].calls
    assert bool(recorded_kernels["compose"].calls) == (seg is not None)
    assert len(forward_passes) == (2 if seg is None else 3)          # (summary,) main, states pass
    if packed:      # the main pass reads the device plan, padding rows included
        assert forward_passes[-2][1][6].shape[0] == (N if seg is None else max_pieces(T, N, seg))
    with pytest.raises((RuntimeError, NotImplementedError)):
        check_inputs(q, k, v, g, beta, None, h0, cu, check_finite=True)   # the debug check reads


def test_packed_segment_len_from_shapes():
    """The packed plan's segment length is the planner's for the longest sequence the shapes allow;
    none when that fits in one segment; off and forced lengths as configured."""
    cfg = IntraCPConfig()
    for T, N, HV in ((8192, 5, 4), (32768, 16, 8), (32768, 64, 32), (131072, 3, 16)):
        want = plan_segment_len([T - N + 1] + [1] * (N - 1), HV, 128, 128, 132, BV=128, config=cfg)
        got = packed_segment_len(T, N, HV, 128, 128, 132, BV=128, config=cfg)
        assert got == (want if want is not None and want < T - N + 1 else None)
    assert packed_segment_len(8192, 5, 4, 128, 128, 132, 128, IntraCPConfig(enabled=False)) is None
    assert packed_segment_len(8192, 5, 4, 128, 128, 132, 128, IntraCPConfig(segment_len=320)) == 320
    assert packed_segment_len(400, 5, 4, 128, 128, 132, 128, IntraCPConfig(segment_len=448)) is None  # nothing to cut
    assert packed_segment_len(400, 5, 4, 128, 128, 132, 128, IntraCPConfig(segment_len=384)) == 384  # 396 > 384
