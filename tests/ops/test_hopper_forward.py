"""Hopper (TileLang) forward vs the float64 token-by-token recurrence (DESIGN §6: o and final state
<= 5e-3 relative L2 for bf16). Every output is poisoned with NaN before the kernels run. GPU only."""

import pytest
import torch

from qla_megatron.ops import chunk_gated_delta_rule, recurrent_gated_delta_rule
from qla_megatron.ops.gated_delta_rule import which_backend
from qla_megatron.ops.gated_delta_rule.intra_cp import IntraCPConfig

from .gdr_inputs import offsets, rel, rounded_inputs

pytestmark = pytest.mark.gpu
TOL = 5e-3
HEADS = [(2, 8), (4, 16), (8, 32), (16, 32), (16, 48), (16, 64), (32, 32)]   # (H, HV)


@pytest.fixture(autouse=True)
def poison():
    from qla_megatron.ops.gated_delta_rule.hopper.chunk import poison_outputs
    with poison_outputs():
        yield


def _reference(low, h0, cu=None, scale=None):
    """Float64 recurrence on exactly the (rounded) inputs the kernel sees, on the GPU."""
    q, k, v, g, beta = (t.double() for t in low)
    return recurrent_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=h0.double(),
                                      output_final_state=True, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)


def _hopper(low, h0, cu=None, intra_cp=None, scale=None):
    from qla_megatron.ops.gated_delta_rule.hopper.chunk import chunk_gated_delta_rule_fwd
    return chunk_gated_delta_rule_fwd(*low, scale, h0, True, cu, True, intra_cp=intra_cp)


def _check(o, s, ro, rs):
    assert torch.isfinite(o).all() and torch.isfinite(s).all(), "NaN/Inf (unwritten output?)"
    eo, es = rel(o, ro), rel(s, rs)
    assert eo <= TOL and es <= TOL, f"o rel {eo:.2e}, state rel {es:.2e}"
    return eo, es


@pytest.mark.parametrize("H,HV", HEADS, ids=[f"H{h}-HV{hv}" for h, hv in HEADS])
@pytest.mark.parametrize("B,T", [(2, 200), (1, 64), (1, 1)], ids=["B2-T200", "B1-T64", "B1-T1"])
def test_heads(B, T, H, HV):
    low, h0 = rounded_inputs(B, T, H, HV)
    o, s = chunk_gated_delta_rule(*low, initial_state=h0, output_final_state=True,
                                  use_qk_l2norm_in_kernel=True, backend="tilelang")
    _check(o, s, *_reference(low, h0))


def test_varlen_many_short_one_long():
    lens = [1, 16, 63, 64, 65, 3, 127, 1500, 200, 7]
    cu = offsets(lens)
    low, h0 = rounded_inputs(1, sum(lens), 4, 16, N=len(lens))
    o, s = chunk_gated_delta_rule(*low, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                  use_qk_l2norm_in_kernel=True, backend="tilelang")
    _check(o, s, *_reference(low, h0, cu))


@pytest.mark.parametrize("profile", ["mixed", "none"])
@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_intra_cp_on_off(profile, varlen):
    H, HV = 2, 8
    if varlen:
        lens = [700, 5, 1100, 64]
        cu = offsets(lens)
        low, h0 = rounded_inputs(1, sum(lens), H, HV, N=len(lens), profile=profile)
    else:
        cu = None
        low, h0 = rounded_inputs(2, 1000, H, HV, profile=profile)
    ref = _reference(low, h0, cu)
    off = _hopper(low, h0, cu, IntraCPConfig(enabled=False))
    _check(*off, *ref)
    for seg in (64, 128, 192, 512):     # 192: three chunks, as the wave-filling planner cuts
        on = _hopper(low, h0, cu, IntraCPConfig(segment_len=seg))
        _check(*on, *ref)
        assert rel(on[0], off[0]) <= TOL and rel(on[1], off[1]) <= TOL


def test_other_value_dims_and_fp16_and_scale():
    for V in (64, 256):
        low, h0 = rounded_inputs(1, 300, 2, 4, V=V)
        _check(*_hopper(low, h0), *_reference(low, h0))
    low, h0 = rounded_inputs(1, 300, 2, 4, dtype=torch.float16)
    _check(*_hopper(low, h0, scale=0.3), *_reference(low, h0, scale=0.3))


def test_reruns_bit_identical():
    low, h0 = rounded_inputs(1, 777, 2, 8)
    cfg = IntraCPConfig(segment_len=128)
    o0, s0 = _hopper(low, h0, None, cfg)
    for _ in range(1000):
        o, s = _hopper(low, h0, None, cfg)
        assert torch.equal(o, o0) and torch.equal(s, s0)


def test_dispatch():
    low, _ = rounded_inputs(1, 10, 2, 4)
    assert which_backend(*low[:3]) == "tilelang"
    assert which_backend(*(t.float() for t in low[:3])) == "torch"
    q, k, v = (torch.zeros(1, 4, 1, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    assert which_backend(q, k, v) == "torch"            # K = 32 is not a Hopper kernel size
    with pytest.raises(ValueError, match="K="):
        g = torch.zeros(1, 4, 1, device="cuda")
        chunk_gated_delta_rule(q, k, v, g, g, backend="tilelang")


@pytest.mark.parametrize("l2norm", [True, False], ids=["l2norm", "no-l2norm"])
def test_long_sequence_against_recurrence(l2norm):
    """Many chunks (the kernels' shared-memory slots wrap around often), with and without l2norm in the
    kernel, intra-card CP off and on."""
    from qla_megatron.ops.gated_delta_rule.hopper.chunk import chunk_gated_delta_rule_fwd
    low, h0 = rounded_inputs(1, 64 * 37 + 5, 2, 8)
    if not l2norm:
        low[0] = torch.nn.functional.normalize(low[0].float(), dim=-1).to(low[0].dtype)
        low[1] = torch.nn.functional.normalize(low[1].float(), dim=-1).to(low[1].dtype)
    q, k, v, g, beta = (t.double() for t in low)
    ro, rs = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0.double(), output_final_state=True,
                                        use_qk_l2norm_in_kernel=l2norm)
    for cfg in (IntraCPConfig(enabled=False), IntraCPConfig(segment_len=256)):
        _check(*chunk_gated_delta_rule_fwd(*low, None, h0, True, None, l2norm, intra_cp=cfg), ro, rs)


@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_gate_driven_intra_cp(varlen):
    """Gate-driven intra-CP (the default): a (segment, head) whose last 4 chunks decay below
    e^-10 reports M = 0 and, as S_ext, the state of those 4 chunks from zero; the others report the
    exact (M, S_ext). Checked on the summary kernel itself against the float64 recurrence, pair by
    pair, with gated and ungated pairs both present; then o and the final state of the whole op in
    gate and exact mode against the recurrence."""
    from qla_megatron.ops.gated_delta_rule.hopper import chunk as hc
    from qla_megatron.ops.gated_delta_rule.hopper.chunk import chunk_gated_delta_rule_fwd
    H, HV, K, n = 2, 8, 128, 4
    if varlen:
        lens = [2000, 37, 1500, 700]
        cu = offsets(lens)
        low, h0 = rounded_inputs(1, sum(lens), H, HV, N=len(lens))
    else:
        cu = None
        low, h0 = rounded_inputs(1, 64 * 40 + 7, H, HV)
    q, k, v, g, beta = low
    Tt = q.shape[0] * q.shape[1]
    plan = hc._make_plan(tuple(cu.tolist()) if varlen else (0, Tt), 512, torch.device("cuda"))
    qf, kf, vf = q.reshape(Tt, H, K), k.reshape(Tt, H, K), v.reshape(Tt, HV, K)
    gf, bf = g.reshape(Tt, HV).float(), beta.reshape(Tt, HV).float()
    factors = hc.prepare(qf, kf, gf, bf, plan.chunks, HV, K ** -0.5, True)
    NSS = plan.sum_segs.shape[0]
    _, summ = hc.forward(qf, kf, vf, *factors, plan.sum_segs, n_final=NSS, summary=True, gate_chunks=n)
    _, exact = hc.forward(qf, kf, vf, *factors, plan.sum_segs, n_final=NSS, summary=True)
    flat = [t.reshape(1, Tt, *t.shape[2:]) for t in low]
    n_gated = 0
    for r, (t_beg, t_end, *_) in enumerate(plan.sum_segs.tolist()):
        w = t_end - n * 64                       # summary segments are whole chunks (they have a successor)
        decay = g.reshape(Tt, HV)[w:t_end].double().sum(0)
        _, ws = recurrent_gated_delta_rule(*(t[:, w:t_end].double() for t in flat), output_final_state=True,
                                           use_qk_l2norm_in_kernel=True)       # the window from zero
        for hv in range(HV):
            if abs(float(decay[hv]) + 10) < 1e-3:
                continue                         # too close to the threshold to call
            if float(decay[hv]) < -10 and t_end - t_beg > n * 64:
                n_gated += 1
                assert not summ[r, hv, :, :K].any(), (r, hv, "gated: M must be 0")
                assert rel(summ[r, hv, :, K:], ws[0, hv]) <= TOL, (r, hv)
            else:
                assert rel(summ[r, hv], exact[r, hv]) <= 1e-5, (r, hv, "ungated: the exact summary")
    assert 0 < n_gated < NSS * HV, f"{n_gated} of {NSS * HV} pairs gated: the inputs should gate some, not all"
    ro, rs = _reference(low, h0, cu)
    args = (*low, None, h0, True, cu, True)
    oe, se = chunk_gated_delta_rule_fwd(*args, intra_cp=IntraCPConfig(segment_len=512, mode="exact"))
    og, sg = chunk_gated_delta_rule_fwd(*args, intra_cp=IntraCPConfig(segment_len=512, mode="gate",
                                                                      warmup_chunks=n))
    _check(oe, se, ro, rs)
    _check(og, sg, ro, rs)
    assert rel(og, oe) <= TOL


@pytest.mark.parametrize("with_h0", [False, True])
def test_compose_kernel_matches_torch(with_h0):
    """compose_kernel (one launch: segments.compose, backend "tilelang") vs segments.compose (torch, the reference) on random summaries: batch
    rows with 16 segments and varlen sequences of 1 to 9 segments, every main-pass row written."""
    from qla_megatron.ops.gated_delta_rule.hopper import chunk as hc
    from qla_megatron.ops.gated_delta_rule.segments import compose
    HV, K, V = 4, 128, 128
    for bounds, seg in (((0, 8192, 16384), 512), ((0, 100, 1700, 1764, 2400, 2401), 192)):
        plan = hc._make_plan(bounds, seg, torch.device("cuda"))
        N = len(bounds) - 1
        summ = torch.randn(plan.sum_segs.shape[0], HV, K, K + V, device="cuda") * (0.5 / K ** 0.5)
        h0 = torch.randn(N, HV, K, V, device="cuda") if with_h0 else None
        got = compose(plan.walk, summ, h0, plan.NS, backend="tilelang")
        want = compose(plan.walk, summ, h0, plan.NS)
        assert torch.isfinite(got).all(), "unwritten rows"
        assert rel(got, want) <= 1e-4, rel(got, want)
