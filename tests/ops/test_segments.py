"""Segment algebra (DESIGN §2): summaries, composition, and the segmented forward in both modes."""

import math

import pytest
import torch

from qla_megatron.ops import (chunk_gated_delta_rule, compose_segments, recurrent_gated_delta_rule,
                              segment_summary, segmented_chunk_gated_delta_rule)
from qla_megatron.ops.gated_delta_rule.segments import gate_driven_mask, plan_segments, warmup_windows

from .gdr_inputs import make_inputs, rel


def explicit_transition(k, g, beta):
    """prod_t exp(g_t)(I - beta_t k_t k_t^T), later tokens on the left: [HV, K, K] for one sequence."""
    T, H, K = k.shape
    HV = g.shape[1]
    M = torch.eye(K, dtype=torch.float64).repeat(HV, 1, 1)
    for t in range(T):
        for h in range(HV):
            kt = k[t, h // (HV // H)][:, None]
            M[h] = torch.exp(g[t, h]) * (torch.eye(K, dtype=torch.float64) - beta[t, h] * kt @ kt.T) @ M[h]
    return M


def test_summary_is_the_affine_map_of_each_sequence():
    cu = torch.tensor([0, 1, 70, 134, 200])
    q, k, v, g, beta, h0 = make_inputs(1, 200, 2, 4, 8, 6, torch.float64, N=4)
    k = torch.nn.functional.normalize(k, dim=-1)
    ext, M = segment_summary(k, v, g, beta, cu_seqlens=cu)
    assert ext.shape == (4, 4, 8, 6) and M.shape == (4, 4, 8, 8)
    _, final = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                          cu_seqlens=cu)
    assert rel(M @ h0 + ext, final) <= 1e-10
    for n in range(4):
        a, b = int(cu[n]), int(cu[n + 1])
        assert rel(M[n], explicit_transition(k[0, a:b], g[0, a:b], beta[0, a:b])) <= 1e-10


def test_summary_l2norm_option_and_batch():
    q, k, v, g, beta, h0 = make_inputs(2, 90, 1, 2, 8, 8, torch.float64)
    ext, M = segment_summary(k, v, g, beta, use_qk_l2norm_in_kernel=True)
    _, final = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                      use_qk_l2norm_in_kernel=True)
    assert rel(M @ h0 + ext, final) <= 1e-10


def test_compose_segments_equals_whole_sequence():
    q, k, v, g, beta, h0 = make_inputs(1, 300, 2, 4, 8, 8, torch.float64)
    cuts = [0, 64, 128, 140, 300]
    ext, M = segment_summary(k, v, g, beta, cu_seqlens=torch.tensor(cuts), use_qk_l2norm_in_kernel=True)
    starts, end = compose_segments(ext, M, h0[0])
    for j in range(len(cuts) - 1):
        _, s = chunk_gated_delta_rule(q[:, :cuts[j] + 1], k[:, :cuts[j] + 1], v[:, :cuts[j] + 1],
                                      g[:, :cuts[j] + 1], beta[:, :cuts[j] + 1], initial_state=h0,
                                      output_final_state=True, use_qk_l2norm_in_kernel=True)
        # the state before token cuts[j] is the state after the prefix [0, cuts[j])
        if cuts[j] > 0:
            _, s = chunk_gated_delta_rule(q[:, :cuts[j]], k[:, :cuts[j]], v[:, :cuts[j]], g[:, :cuts[j]],
                                          beta[:, :cuts[j]], initial_state=h0, output_final_state=True,
                                          use_qk_l2norm_in_kernel=True)
        else:
            s = h0
        assert rel(starts[j], s[0]) <= 1e-10
    _, final = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                          use_qk_l2norm_in_kernel=True)
    assert rel(end, final[0]) <= 1e-10


CASES = [
    pytest.param(dict(B=2, T=300, cu=None, seg=64), id="B2-T300-seg64"),
    pytest.param(dict(B=1, T=400, cu=[0, 1, 65, 200, 201, 400], seg=64), id="varlen-seg64"),
    pytest.param(dict(B=1, T=333, cu=None, seg=128), id="B1-T333-seg128"),
]


@pytest.mark.parametrize("case", CASES)
def test_exact_segmented_forward_equals_unsegmented(case):
    cu = torch.tensor(case["cu"]) if case["cu"] else None
    N = case["B"] if cu is None else len(cu) - 1
    inputs = make_inputs(case["B"], case["T"], 2, 4, 16, 16, torch.float64, N=N, requires_grad=True)
    kw = dict(output_final_state=True, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    q, k, v, g, beta, h0 = inputs
    o, s = segmented_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, segment_len=case["seg"], **kw)
    o_ref, s_ref = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, **kw)
    assert rel(o, o_ref) <= 1e-10 and rel(s, s_ref) <= 1e-10
    do, ds = torch.randn_like(o), torch.randn_like(s)
    grads = torch.autograd.grad((o * do).sum() + (s * ds).sum(), inputs)
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), inputs)
    for a, b in zip(grads, grads_ref):
        assert rel(a, b) <= 1e-10


def gate_test_inputs(T, HV):
    """Per-head constant-ish decays: head 0 none, head 1 weak (window sum ~ -6: exact path), head 2
    medium (window sum ~ -13: gated, error small but visible in float64), head 3 strong (gated)."""
    q, k, v, _, beta, h0 = make_inputs(1, T, 1, HV, 16, 16, torch.float64)
    per_token = torch.tensor([0.0, -0.05, -0.1, -2.0], dtype=torch.float64)
    g = per_token * (0.8 + 0.4 * torch.rand(1, T, HV, dtype=torch.float64))
    return q, k, v, g, beta, h0


def test_gate_mode_mixes_gated_and_exact_heads_within_the_derived_bound():
    T, HV, seg, warm = 640, 4, 128, 2
    q, k, v, g, beta, h0 = gate_test_inputs(T, HV)
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    plan = plan_segments([0, T], seg)
    mask = gate_driven_mask(g[0], plan, warm)
    # segment 1's window reaches the sequence start, where the exact start is as cheap
    assert not mask[:, :2].any() and not mask[:2].any() and mask[2:, 2:].all(), "need both paths"

    o, s = segmented_chunk_gated_delta_rule(q, k, v, g, beta, segment_len=seg, mode="gate",
                                            warmup_chunks=warm, **kw)
    o_exact, s_exact = recurrent_gated_delta_rule(q, k, v, g, beta, **kw)
    # exact heads: unchanged to float64 rounding
    assert rel(o[..., :2, :], o_exact[..., :2, :]) <= 1e-10
    # gated heads: per token, ||do_t|| <= scale ||q_t|| sum_b exp(sum_window g) ||S(w_b)||_2
    qn = torch.nn.functional.normalize(q, dim=-1)[0, :, 0]           # H = 1
    eps = torch.zeros(T, HV, dtype=torch.float64)
    for j, w, start in warmup_windows(plan, warm):
        if not mask[j].any():
            continue
        _, S_w = recurrent_gated_delta_rule(q[:, :w], k[:, :w], v[:, :w], g[:, :w], beta[:, :w], **kw)
        decay = torch.exp(g[0, w:start].sum(0))                       # [HV]
        eps[start:] += (mask[j] * decay * torch.linalg.matrix_norm(S_w[0], ord=2))[None, :]
    bound = 16 ** -0.5 * qn.norm(dim=-1)[:, None] * eps               # [T, HV]
    err = (o - o_exact)[0].norm(dim=-1)                              # [T, HV]
    assert (err <= bound + 1e-12).all(), f"max err/bound {(err / (bound + 1e-300)).max().item():.3g}"
    assert err[:, 2].max() > 0, "the medium-decay head must show the (bounded) warm-up error"
    # and the whole output stays within the float32-invisible level the threshold promises
    assert rel(o, o_exact) <= math.exp(-10) and rel(s, s_exact) <= math.exp(-10)


def test_gate_windows_do_not_reach_before_the_sequence():
    plan = plan_segments([0, 100, 420], 64)
    for j, w, s in warmup_windows(plan, 3):
        n = plan.seq[j]
        assert plan.seq_bounds[n] <= w < s and s - w <= 3 * 64


def test_segment_errors():
    q, k, v, g, beta, _ = make_inputs(1, 100, 1, 2, 8, 8, torch.float64, initial_state=False)
    with pytest.raises(ValueError, match="segment_len"):
        segmented_chunk_gated_delta_rule(q, k, v, g, beta, segment_len=100)
    with pytest.raises(ValueError, match="mode"):
        segmented_chunk_gated_delta_rule(q, k, v, g, beta, segment_len=64, mode="fast")
    with pytest.raises(ValueError, match="warmup_chunks"):
        segmented_chunk_gated_delta_rule(q, k, v, g, beta, segment_len=64, mode="gate", warmup_chunks=0)


@pytest.mark.parametrize("seg_len", [64, 128])
def test_fold_summaries_equals_the_whole_pieces(seg_len):
    """fold_summaries of segment summaries = the summary of each whole piece: [M | S_ext] forward,
    [M^T | dS_ext] backward (dS_ext: the start adjoint of the piece's own outputs, by autograd from a
    zero start), float64, pieces of one to several segments."""
    from qla_megatron.ops.gated_delta_rule.segments import fold_summaries
    bounds = (0, 1, 70, 330, 400)
    q, k, v, g, beta, _ = make_inputs(1, 400, 2, 4, 8, 6, torch.float64, initial_state=False)
    do = torch.randn_like(v)
    plan = plan_segments(bounds, seg_len)
    assert plan.NS > plan.N

    def summaries(b):
        ext, M = segment_summary(k, v, g, beta, torch.tensor(b), use_qk_l2norm_in_kernel=True)
        z = torch.zeros(len(b) - 1, 4, 8, 6, dtype=torch.float64, requires_grad=True)
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=z, cu_seqlens=torch.tensor(b),
                                      use_qk_l2norm_in_kernel=True)
        dext, = torch.autograd.grad(o, z, do)
        return torch.cat([M, ext], -1), torch.cat([M.transpose(-1, -2), dext], -1)

    fwd_seg, bwd_seg = summaries(plan.bounds)
    fwd_whole, bwd_whole = summaries(bounds)
    assert rel(fold_summaries(fwd_seg, plan), fwd_whole) <= 1e-12
    assert rel(fold_summaries(bwd_seg, plan, reverse=True), bwd_whole) <= 1e-12


@pytest.mark.gpu
def test_fold_summaries_on_the_compose_kernel():
    """fold_summaries on the compose kernel (one launch, a state K + V columns wide; cross-GPU CP's
    piece summaries on the Hopper path) against the float64 torch fold: forward and reverse, pieces of
    one to five segments, random fp32 summaries at K = V = 128."""
    from qla_megatron.ops.gated_delta_rule.segments import fold_summaries
    plan = plan_segments((0, 1, 70, 330, 400), 64)
    HV, K, V = 8, 128, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    summ = torch.randn(plan.NS, HV, K, K + V, device="cuda", generator=gen)
    summ[..., :K] *= K ** -0.5                        # transitions of norm ~1: products stay bounded
    for reverse in (False, True):
        want = fold_summaries(summ.double(), plan, reverse)
        got = fold_summaries(summ, plan, reverse, backend="tilelang")
        assert got.dtype == torch.float32 and tuple(got.shape) == (plan.N, HV, K, K + V)
        assert rel(got.double(), want) <= 1e-5, (reverse, rel(got.double(), want))
