"""CPU checks of the Hopper path: kernel signatures (TileLang's IR front end only: no CUDA is generated
or compiled, no GPU is touched), the forward's and the backward's algebra against the float64
recurrence and its autograd gradients, the plans and the compositions' walks (forward and backward),
and what the launchers hand the kernels."""

import pytest
import torch

from qla_megatron.ops.gated_delta_rule.hopper import backward as hback
from qla_megatron.ops.gated_delta_rule.hopper import chunk as hchunk
from qla_megatron.ops.gated_delta_rule.segments import compose

from .gdr_inputs import make_inputs, rel


def _params(f):
    return [p.name.removesuffix("_handle") for p in f.params]


def test_kernel_signatures():
    from qla_megatron.ops.gated_delta_rule.hopper.backward_dh import backward_dh_kernel
    from qla_megatron.ops.gated_delta_rule.hopper.backward_grads import backward_grads_kernel
    from qla_megatron.ops.gated_delta_rule.hopper.forward import forward_kernel
    from qla_megatron.ops.gated_delta_rule.hopper.prepare import prepare_kernel
    assert _params(forward_kernel.get_tir(2, 8, 128, 128, "bfloat16", has_initial=True)) == \
        ["q", "k", "v", "Ai", "P", "F", "segs", "h0", "o", "ht", "states"]
    assert _params(prepare_kernel.get_tir(2, 8, 128, "bfloat16", l2norm=True, HP=4)) == \
        ["q", "k", "g", "beta", "chunks", "sc", "Ai", "P", "F"]
    assert _params(backward_dh_kernel.get_tir(2, 8, 128, 128, "bfloat16", has_terminal=True)) == \
        ["q", "k", "do", "Ai", "P", "F", "segs", "dht", "dv", "dstates", "dh0", "states", "starts", "sdc"]
    assert _params(backward_grads_kernel.get_tir(2, 8, 128, 128, "bfloat16")) == \
        ["q", "k", "v", "do", "g", "beta", "chunks", "Ai", "P", "states", "dstates", "sdc", "sc", "dq", "dk",
         "dg", "dbeta"]
    with pytest.raises(AssertionError):
        prepare_kernel.get_tir(3, 9, 128, "bfloat16", HP=2)      # HV / H = 3 is odd: no shared pair
    with pytest.raises(AssertionError):
        prepare_kernel.get_tir(3, 9, 128, "bfloat16", HP=2, share_qk=False)   # HV = 9 is odd
    for kw in (dict(HP=2, share_qk=False), dict(HP=3)):      # a qk-pass per v-head; 256 threads
        assert _params(prepare_kernel.get_tir(16, 48, 128, "bfloat16", **kw))[-1] == "F"
    with pytest.raises(AssertionError, match="summary pass only"):
        forward_kernel.get_tir(2, 8, 128, 128, "bfloat16", gate_chunks=4)
    with pytest.raises(AssertionError, match="summary pass only"):
        backward_dh_kernel.get_tir(2, 8, 128, 128, "bfloat16", gate_chunks=4)
    with pytest.raises(AssertionError, match="states-only"):
        forward_kernel.get_tir(2, 8, 128, 128, "bfloat16", emit_o=False)


def _forward_emulated(q, k, v, g, beta, h0, scale, l2norm):
    """forward.py's algebra in float64 for one sequence and v-head: prepare's factors (Ai, P, F,
    from zero-padded q/k rows) and the transposed chain on S^T, with the forward reading random junk
    in the pad rows of the last chunk, as it reads whatever follows in memory."""
    C = 64
    T, Kd = k.shape
    n_chunks = -(-T // C)
    pad = n_chunks * C - T
    junk = lambda *s: torch.randn(*s, dtype=torch.float64)
    q, k, v = torch.cat([q, junk(pad, Kd)]), torch.cat([k, junk(pad, Kd)]), torch.cat([v, junk(pad, v.shape[1])])
    valid = (torch.arange(n_chunks * C) < T).double()
    g = torch.cat([g, g.new_zeros(pad)])
    beta = torch.cat([beta, beta.new_zeros(pad)])
    St = h0.T.clone()
    o = torch.zeros(n_chunks * C, v.shape[1], dtype=torch.float64)
    low = torch.tril(torch.ones(C, C, dtype=torch.bool))
    zero = torch.zeros((), dtype=torch.float64)
    for c in range(n_chunks):
        sl = slice(c * C, (c + 1) * C)
        Q, Kc, Vc, b, m = q[sl], k[sl], v[sl], beta[sl], valid[sl][:, None]
        G = torch.cumsum(g[sl], 0)
        one = torch.ones(C, dtype=torch.float64)
        Rk = torch.rsqrt((Kc * m).pow(2).sum(1) + 1e-6) if l2norm else one
        Rq = torch.rsqrt((Q * m).pow(2).sum(1) + 1e-6) if l2norm else one
        Kn = Kc * m * Rk[:, None]
        A = torch.linalg.inv(torch.eye(C, dtype=torch.float64) + torch.tril(b[:, None] * (Kn @ Kn.T), -1))
        Gam = torch.where(low, torch.exp(G[:, None] - G[None, :]), zero)
        Ai = torch.where(low, A * Gam, zero)
        P = torch.where(low, scale * Rq[:, None] * Rk[None, :] * ((Q * m) @ (Kc * m).T) * Gam, zero)
        gk, ee, qs, gC = torch.exp(G) * Rk, torch.exp(G[-1] - G) * Rk, scale * torch.exp(G) * Rq, torch.exp(G[-1])
        Xt = St @ Kc.T
        Ot = St @ Q.T
        Dt = ((Vc.T - Xt * gk[None, :]) * b[None, :]) @ Ai.T
        St = gC * St + (Dt * ee[None, :]) @ Kc
        o[sl] = (Ot * qs[None, :] + Dt @ P.T).T
    return o[:T], St.T


@pytest.mark.parametrize("l2norm", [True, False], ids=["l2norm", "no-l2norm"])
@pytest.mark.parametrize("T", [1, 63, 64, 200])
def test_forward_algebra_matches_recurrence(T, l2norm):
    """The factorization forward.py computes equals the float64 token-by-token recurrence: a check of
    the algebra only, not of the kernel."""
    from qla_megatron.ops import recurrent_gated_delta_rule
    q, k, v, g, beta, h0 = make_inputs(1, T, 1, 2, 32, 16)
    if not l2norm:
        q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    scale = 32 ** -0.5
    ro, rs = recurrent_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=True,
                                        use_qk_l2norm_in_kernel=l2norm)
    for hv in range(2):
        o, s = _forward_emulated(q[0, :, 0], k[0, :, 0], v[0, :, hv], g[0, :, hv], beta[0, :, hv], h0[0, hv],
                            scale, l2norm)
        assert rel(o, ro[0, :, hv]) < 1e-10 and rel(s, rs[0, hv]) < 1e-10


@pytest.mark.parametrize("bounds,seg_len", [((0, 1000), 128), ((0, 300, 310, 1000, 1100, 1164), 128),
                                            ((0, 64, 640, 700), 64)])
@pytest.mark.parametrize("with_h0", [False, True])
def test_compose_matches_a_plain_walk(bounds, seg_len, with_h0):
    """segments.compose, the torch reference (the walk tables compose_kernel reads: summary and main-pass rows per sequence
    and step) gives every main-pass segment the start state of a plain per-sequence walk
    Z[j + 1] = M[j] Z[j] + S_ext[j] found from the segments' tokens (float64 on the CPU)."""
    plan = hchunk._make_plan(bounds, seg_len, torch.device("cpu"))
    N, HV, K, V = len(bounds) - 1, 2, 8, 4
    summ = torch.randn(plan.sum_segs.shape[0], HV, K, K + V, dtype=torch.float64) * 0.3
    h0 = torch.randn(N, HV, K, V, dtype=torch.float64) if with_h0 else None
    got = compose(plan.walk, summ.float(), h0.float() if with_h0 else None, plan.NS)
    seq_of = lambda t: max(n for n in range(N) if bounds[n] <= t)
    summary_at = {int(r[0]): int(r[4]) for r in plan.sum_segs}     # segment start token -> summary row
    for row, seg in enumerate(plan.segs.tolist()):
        n = seq_of(seg[0])
        z = h0[n] if with_h0 else torch.zeros(HV, K, V, dtype=torch.float64)
        for start in range(bounds[n], seg[0], seg_len):
            m = summ[summary_at[start]]
            z = m[..., :K] @ z + m[..., K:]
        assert torch.allclose(got[row].double(), z, atol=1e-4, rtol=1e-4), (row, seg)


def test_intra_cp_config_mode():
    from qla_megatron.ops.gated_delta_rule.intra_cp import IntraCPConfig
    assert IntraCPConfig().mode == "gate"
    with pytest.raises(ValueError, match="mode must be 'exact' or 'gate'"):
        IntraCPConfig(mode="fast")
    with pytest.raises(ValueError, match="warmup_chunks"):
        IntraCPConfig(mode="gate", warmup_chunks=0)




def _backward_emulated(q, k, v, g, beta, h0, do, dht, scale):
    """backward_dh.py's walk and backward_grads.py's per-chunk gradients, as their docstrings write
    them, in float64 for one sequence and v-head with l2norm: returns dq, dk, dv, dg, dbeta, dh0."""
    C = 64
    T = k.shape[0]
    chunks = [(t, min(C, T - t)) for t in range(0, T, C)]
    Rq, Rk = torch.rsqrt(q.pow(2).sum(1) + 1e-6), torch.rsqrt(k.pow(2).sum(1) + 1e-6)
    Qa, Ka = q * Rq[:, None], k * Rk[:, None]
    S, saved = h0.clone(), []
    for t0, m in chunks:                              # the forward (states pass), keeping each chunk's S
        Qn, Kn, b = Qa[t0:t0 + m], Ka[t0:t0 + m], beta[t0:t0 + m]
        G = torch.cumsum(g[t0:t0 + m], 0)
        Gam = torch.exp(G[:, None] - G[None, :]).tril()
        Lg = (b[:, None] * (Kn @ Kn.T) * Gam).tril(-1)
        Ai = torch.linalg.inv(torch.eye(m, dtype=q.dtype) + Lg)
        P = (scale * Gam * (Qn @ Kn.T)).tril()
        gam, e, gC = torch.exp(G), torch.exp(G[-1] - G), torch.exp(G[-1])
        Y = v[t0:t0 + m] - gam[:, None] * (Kn @ S)
        Vd = Ai @ (b[:, None] * Y)
        saved.append((S, Qn, Kn, b, Gam, Lg, Ai, P, gam, e, gC, Y, Vd))
        S = gC * S + (e[:, None] * Kn).T @ Vd
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dg, db = torch.zeros_like(g), torch.zeros_like(beta)
    dS = dht.clone()
    for (t0, m), (S, Qn, Kn, b, Gam, Lg, Ai, P, gam, e, gC, Y, Vd) in reversed(list(zip(chunks, saved))):
        dO, dSe = do[t0:t0 + m], dS
        dVd = P.T @ dO + e[:, None] * (Kn @ dSe)                       # backward_dh
        Tm = Ai.T @ dVd
        dv[t0:t0 + m] = b[:, None] * Tm
        dS = gC * dSe + (scale * gam[:, None] * Qn).T @ dO - (gam[:, None] * Kn).T @ (b[:, None] * Tm)
        dLg = -(Tm @ Vd.T).tril(-1)                                     # backward_grads
        dP = (dO @ Vd.T).tril()
        dKK = dLg * b[:, None] * Gam
        dQn = scale * gam[:, None] * (dO @ S.T) + (scale * Gam * dP) @ Kn
        dKn = (scale * Gam * dP).T @ Qn - (gam * b)[:, None] * (Tm @ S.T) + e[:, None] * (Vd @ dSe.T) \
            + (dKK + dKK.T) @ Kn
        db[t0:t0 + m] = (Tm * Y).sum(1) + (dLg * Gam * (Kn @ Kn.T)).sum(1)
        ed = e * ((Kn @ dSe) * Vd).sum(1)
        MG = (dLg * Lg + dP * P).tril(-1)
        dG = scale * gam * (dO * (Qn @ S)).sum(1) - gam * b * (Tm * (Kn @ S)).sum(1) + MG.sum(1) - MG.sum(0)
        ed_before = torch.cat([ed.new_zeros(1), ed.cumsum(0)[:-1]])       # sum_{i < t} e_i <Kn dS, Vd>_i
        dg[t0:t0 + m] = dG.flip(0).cumsum(0).flip(0) + gC * (S * dSe).sum() + ed_before
        dq[t0:t0 + m] = Rq[t0:t0 + m, None] * (dQn - Qn * (Qn * dQn).sum(1, keepdim=True))
        dk[t0:t0 + m] = Rk[t0:t0 + m, None] * (dKn - Kn * (Kn * dKn).sum(1, keepdim=True))
    return dq, dk, dv, dg, db, dS


@pytest.mark.parametrize("T", [1, 64, 150])
def test_backward_algebra_matches_autograd(T):
    """The gradients backward_dh.py and backward_grads.py compute (their docstrings' formulas) equal
    autograd through the float64 token-by-token recurrence, strong-decay and zero-decay heads included:
    a check of the algebra only, not of the kernels."""
    from qla_megatron.ops import recurrent_gated_delta_rule
    q, k, v, g, beta, h0 = make_inputs(1, T, 1, 3, 32, 16, requires_grad=True)
    scale = 32 ** -0.5
    o, s = recurrent_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=True,
                                      use_qk_l2norm_in_kernel=True)
    do, dht = torch.randn_like(o), torch.randn_like(s)
    want = torch.autograd.grad((o, s), (q, k, v, g, beta, h0), (do, dht))
    got_q = got_k = 0
    for hv in range(3):
        dq, dk, dv, dg, db, dh0 = _backward_emulated(*(t.detach()[0, :, i] for t, i in
                                                       ((q, 0), (k, 0), (v, hv), (g, hv), (beta, hv))),
                                                     h0.detach()[0, hv], do[0, :, hv], dht[0, hv], scale)
        got_q, got_k = got_q + dq, got_k + dk                 # the v-heads of a qk-head sum their dq, dk
        for name, a, b in (("dv", dv, want[2][0, :, hv]), ("dg", dg, want[3][0, :, hv]),
                           ("dbeta", db, want[4][0, :, hv]), ("dh0", dh0, want[5][0, hv])):
            # relative, or absolute where strong decay leaves a gradient of ~1e-11 (T = 1)
            assert rel(a, b) < 1e-10 or (a - b).abs().max() < 1e-15, (name, hv, rel(a, b))
    assert rel(got_q, want[0][0, :, 0]) < 1e-10 and rel(got_k, want[1][0, :, 0]) < 1e-10


@pytest.mark.parametrize("bounds,seg_len", [((0, 1000), 128), ((0, 300, 310, 1000, 1100, 1164), 128),
                                            ((0, 64, 640, 700), 64)])
@pytest.mark.parametrize("with_dht", [False, True])
def test_backward_walk_matches_a_plain_reverse_walk(bounds, seg_len, with_dht):
    """The backward composition (plan.bwalk: summary rows of segments with a predecessor, walked last
    to first) gives every segment the end adjoint of a plain right-to-left walk
    dS_end[j - 1] = M_j^T dS_end[j] + dS_ext_j from dht; the backward segments write dh0 from each
    sequence's first segment and read their end adjoint from their own row (float64 on the CPU)."""
    plan = hchunk._make_plan(bounds, seg_len, torch.device("cpu"))
    N, HV, K, V = len(bounds) - 1, 2, 8, 4
    bsumm = torch.randn(plan.bsum_segs.shape[0], HV, K, K + V, dtype=torch.float64) * 0.3
    dht = torch.randn(N, HV, K, V, dtype=torch.float64) if with_dht else None
    got = compose(plan.bwalk, bsumm.float(), dht.float() if with_dht else None, plan.NS)
    seq_of = lambda t: max(n for n in range(N) if bounds[n] <= t)
    summary_at = {int(r[0]): int(r[4]) for r in plan.bsum_segs}     # segment start token -> summary row
    assert plan.bsegs[:, :4].equal(plan.segs[:, :4])
    for row, seg in enumerate(plan.bsegs.tolist()):
        n = seq_of(seg[0])
        assert seg[3] == row and seg[4] == (n if seg[0] == bounds[n] else -1)
        z = dht[n] if with_dht else torch.zeros(HV, K, V, dtype=torch.float64)
        starts = list(range(bounds[n], bounds[n + 1], seg_len))
        for start in reversed([t for t in starts if t > seg[0]]):      # the segments after this one
            m = bsumm[summary_at[start]]
            z = m[..., :K] @ z + m[..., K:]
        assert torch.allclose(got[row].double(), z, atol=1e-4, rtol=1e-4), (row, seg)


def test_plan_without_intra_cp():
    """One segment per sequence: no summaries; forward rows write the final state, backward rows dh0,
    both read row n (h0 / dht)."""
    plan = hchunk._make_plan((0, 100, 164, 300), None, torch.device("cpu"))
    assert plan.sum_segs is None and plan.bsum_segs is None and plan.walk is None and plan.bwalk is None
    assert plan.NC == 2 + 1 + 3
    rows = {s[0]: s for s in plan.segs.tolist()}
    brows = {s[0]: s for s in plan.bsegs.tolist()}
    for n, t in enumerate((0, 100, 164)):
        assert rows[t][3:] == [n, n] and brows[t][3:] == [n, n]


class _Recorder:
    """Stands in for a kernel factory: records its kwargs and the tensors its kernel is called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        def kern(*tensors):
            self.calls.append((kwargs, tensors))
        return kern


@pytest.mark.parametrize("summary,gate_chunks,emit_o", [(True, 0, True), (True, 4, True), (False, 0, True),
                                                        (False, 0, False)])
def test_forward_launcher(monkeypatch, summary, gate_chunks, emit_o):
    """The launcher builds the kernel for the pass it runs and hands the summary and states passes a
    one-row o (they write none) but the main pass a full one."""
    rec = _Recorder()
    monkeypatch.setattr(hchunk, "forward_kernel", rec)
    Tt, H, HV, K, V, NS = 200, 2, 4, 128, 128, 3
    q = k = torch.zeros(Tt, H, K, dtype=torch.bfloat16)
    v = torch.zeros(Tt, HV, V, dtype=torch.bfloat16)
    segs = torch.zeros(NS, 5, dtype=torch.int32)
    states = torch.zeros(4, HV, K, V, dtype=torch.bfloat16) if not emit_o else None
    o, _ = hchunk.forward(q, k, v, None, None, None, segs, n_final=NS if summary else 0, summary=summary,
                          gate_chunks=gate_chunks, states=states, emit_o=emit_o)
    kwargs, tensors = rec.calls[0]
    assert kwargs["summary"] == summary and kwargs["gate_chunks"] == gate_chunks and kwargs["emit_o"] == emit_o
    assert tuple(tensors[8].shape) == ((Tt, HV, V) if emit_o and not summary else (1, HV, V))
    assert (o is None) == (summary or not emit_o)
    assert kwargs["save_states"] == (states is not None) and (states is None or tensors[10] is states)


@pytest.mark.parametrize("summary", [False, True])
def test_backward_dh_launcher(monkeypatch, summary):
    rec = _Recorder()
    monkeypatch.setattr(hback, "backward_dh_kernel", rec)
    Tt, H, HV, K, V, NS = 200, 2, 4, 128, 128, 3
    q = k = torch.zeros(Tt, H, K, dtype=torch.bfloat16)
    do = torch.zeros(Tt, HV, V, dtype=torch.bfloat16)
    segs = torch.zeros(NS, 5, dtype=torch.int32)
    dst = torch.zeros(4, HV, K, V, dtype=torch.bfloat16)
    dv, dh0, sdc = hback.backward_dh(q, k, do, None, None, None, segs, n_final=NS, summary=summary,
                                     dstates=None if summary else dst, gate_chunks=4 if summary else 0)
    kwargs, tensors = rec.calls[0]
    assert kwargs["summary"] == summary and kwargs["has_terminal"] is False
    assert tuple(tensors[8].shape) == ((1, HV, V) if summary else (Tt, HV, V))
    assert tuple(dh0.shape) == (NS, HV, K, K + V if summary else V) and (dv is None) == summary
    assert summary or tensors[9] is dst
    assert kwargs["has_initial"] is False                          # no terminal adjoint: no correction
    if summary:
        assert sdc is None
    else:   # the zero rows backward_grads reads, the kernel's own buffer (no second allocation)
        assert tensors[13] is sdc and tuple(sdc.shape) == (4, HV, V) and sdc.dtype == torch.float32
        assert not sdc.any()


def test_backward_dh_launcher_end_chunk_term(monkeypatch):
    """With a terminal adjoint the main walk reads every chunk's start state and the segments' fp32
    starts, and returns the zeroed correction rows [NC, HV, V] it fills (backward_dh.py)."""
    rec = _Recorder()
    monkeypatch.setattr(hback, "backward_dh_kernel", rec)
    Tt, H, HV, K, V, NS, NC = 200, 2, 4, 128, 128, 3, 4
    q = k = torch.zeros(Tt, H, K, dtype=torch.bfloat16)
    do = torch.zeros(Tt, HV, V, dtype=torch.bfloat16)
    segs = torch.zeros(NS, 5, dtype=torch.int32)
    dst = torch.zeros(NC, HV, K, V, dtype=torch.bfloat16)
    states = torch.ones(NC, HV, K, V, dtype=torch.bfloat16)
    dht = torch.ones(NS, HV, K, V)
    for starts in (None, torch.ones(NS, HV, K, V)):
        rec.calls.clear()
        dv, dh0, sdc = hback.backward_dh(q, k, do, None, None, None, segs, dht=dht, n_final=NS, dstates=dst,
                                         states=states, starts=starts)
        kwargs, tensors = rec.calls[0]
        assert kwargs["has_terminal"] is True and kwargs["has_initial"] == (starts is not None)
        assert tensors[11] is states and tensors[13] is sdc and tuple(sdc.shape) == (NC, HV, V)
        assert (tensors[12] is starts) if starts is not None else tuple(tensors[12].shape) == (1, HV, K, V)
        assert sdc.dtype == torch.float32 and not sdc.any()


def test_kernel_set():
    """The precompile set names existing kernels with their launchers' arguments: the summaries are
    gate-driven with the default warm-up (or exact on request), the backward's are listed once."""
    from qla_megatron.ops.gated_delta_rule.intra_cp import IntraCPConfig
    items = hchunk.kernel_set(2, 8, 128, 128)
    assert all(name in hchunk._FACTORIES for name, _, _ in items)
    assert items[5][2]["gate_chunks"] == IntraCPConfig().warmup_chunks == 4
    assert hchunk.kernel_set(2, 8, 128, 128, gate_chunks=0)[5][2]["gate_chunks"] == 0
    assert len(hchunk.kernel_set(2, 8, 128, 128, backward=False)) == 9 and len(items) == 16
    assert len(hchunk.kernel_set(2, 8, 128, 64)) == 9                 # no backward for V = 64 (BACKWARD_V)
    assert ("compose", (8, 128, 256), dict(has_initial=True, BVc=hchunk.COMPOSE_BVC)) in items   # the fold
    assert hchunk.kernel_set(32, 32, 128, 128)[0][2] == dict(l2norm=True, HP=2, share_qk=False, min_blocks=2)
    bsum = [kw for name, _, kw in items if name == "backward_dh" and kw.get("summary")]
    assert bsum == [dict(summary=True, gate_chunks=4, BV=128)]


def test_intra_cp_launches_read_the_plan(monkeypatch):
    """Forward and backward with intra-card CP on packed sequences, kernels recorded instead of run: the
    summary passes read the device plan's sum_segs / bsum_segs (segment_plan.packed_tables, padding
    rows included) with the default warm-up, segments.compose launches compose_kernel with the plan's
    walk tables (forward, then reversed) and hands its rows to the main passes."""
    from qla_megatron.ops.gated_delta_rule.intra_cp import IntraCPConfig
    from qla_megatron.ops.gated_delta_rule.segment_plan import WARMUP_CHUNKS, packed_tables
    recs = {name: _Recorder() for name in ("prepare", "forward", "compose", "dh", "grads")}
    monkeypatch.setattr(hchunk, "prepare_kernel", recs["prepare"])
    monkeypatch.setattr(hchunk, "forward_kernel", recs["forward"])
    monkeypatch.setattr(hchunk, "compose_kernel", recs["compose"])
    monkeypatch.setattr(hback, "backward_dh_kernel", recs["dh"])
    monkeypatch.setattr(hback, "backward_grads_kernel", recs["grads"])
    monkeypatch.setattr(hchunk, "_num_sms", lambda index: 132)
    B, T, H, HV, K, V = 1, 700, 2, 4, 128, 128
    cu = torch.tensor([0, 200, 210, 700])          # 2 + 1 + 4 segments of 128: one padding row (8 rows)
    q = k = torch.zeros(B, T, H, K, dtype=torch.bfloat16)
    v = torch.zeros(B, T, HV, V, dtype=torch.bfloat16)
    g = beta = torch.zeros(B, T, HV)
    tables = packed_tables(cu, T, 128)
    assert tables.NS == 8 and tables.segs[-1].tolist() == [T, T, 13, 7, -1]
    o, ht, saved = hchunk.chunk_gated_delta_rule_fwd(q, k, v, g, beta, None, None, True, cu, True,
                                                     intra_cp=IntraCPConfig(segment_len=128), save_for_backward=True)
    (sum_kw, sum_t), (main_kw, main_t) = recs["forward"].calls
    assert sum_kw["summary"] and sum_kw["gate_chunks"] == WARMUP_CHUNKS and sum_t[6].equal(tables.sum_segs)
    assert not main_kw["summary"] and main_t[6].equal(tables.segs)
    (c_kw, c_t), = recs["compose"].calls
    assert c_t[0] is sum_t[9] and not c_kw["has_initial"]               # the summary pass's [M | S_ext]
    meta, srow, zrow = tables.walk
    assert c_t[2].equal(meta) and c_t[3].equal(srow) and c_t[4].equal(zrow)
    assert main_t[7] is c_t[5] and saved.starts is c_t[5]                 # composed starts -> main pass
    do = torch.zeros(B, T, HV, V, dtype=torch.bfloat16)
    hback.chunk_gated_delta_rule_bwd(saved, q, k, v, g, beta, do, None, True)
    (bs_kw, bs_t), (walk_kw, walk_t) = recs["dh"].calls
    assert bs_kw["summary"] and bs_kw["gate_chunks"] == WARMUP_CHUNKS and bs_t[6].equal(tables.bsum_segs)
    assert walk_t[6].equal(tables.bsegs)
    (_, bc_t) = recs["compose"].calls[1]
    bmeta, bsrow, bzrow = tables.bwalk
    assert bc_t[0] is bs_t[10] and bc_t[2].equal(bmeta) and bc_t[3].equal(bsrow) and bc_t[4].equal(bzrow)
    assert walk_t[7] is bc_t[5]                                           # end adjoints -> the walk


def test_gate_threshold_is_the_kernels():
    """The gate-driven threshold stated in segment_plan is the one the summary kernels use."""
    import math
    from qla_megatron.ops.gated_delta_rule.hopper.forward import GATE_DECAY
    from qla_megatron.ops.gated_delta_rule.segment_plan import GATE_LOG_THRESHOLD
    assert math.isclose(GATE_DECAY, math.exp(GATE_LOG_THRESHOLD), rel_tol=1e-12)


def test_piece_summary_launchers(monkeypatch):
    """hopper/pieces.py on the CPU with its launches recorded: the pieces cut into segments as the
    planner says and prepared once over the plan's chunk table, one summary row per segment (start,
    end, first chunk, 0, segment), forward and backward summaries from those factors, gate-driven as
    the config says, and each piece's segments folded (torch) into its summary; uncut pieces are
    returned as summarised."""
    from types import SimpleNamespace
    from qla_megatron.ops.gated_delta_rule import segments
    from qla_megatron.ops.gated_delta_rule.hopper import chunk as hchunk_mod
    from qla_megatron.ops.gated_delta_rule.hopper import pieces
    from qla_megatron.ops.gated_delta_rule.intra_cp import IntraCPConfig

    seen = {}
    HV, K = 4, 128

    def prepare(qf, kf, gf, bf, chunks, hv, scale, l2norm):
        seen["chunks"], seen["prepare"] = chunks.tolist(), (hv, scale, l2norm, tuple(qf.shape), tuple(gf.shape))
        seen["prepares"] = seen.get("prepares", 0) + 1
        return "Ai", "P", "F"

    def summary_rows(segs, n_final, summary, gate_chunks):
        seen["segs"], seen["launch"] = segs.tolist(), (n_final, summary, gate_chunks)
        out = torch.arange(n_final, dtype=torch.float32)[:, None, None, None].expand(n_final, HV, K, 2 * K)
        return out.contiguous()

    monkeypatch.setattr(pieces, "_num_sms", lambda index: 132)
    monkeypatch.setattr(hchunk_mod, "prepare", prepare)

    def factors(Ai, P, F):               # the summaries read the factors the stream was prepared with
        assert (Ai, P, F) == ("Ai", "P", "F")

    monkeypatch.setattr(pieces, "forward", lambda q, k, v, Ai, P, F, segs, *, n_final, summary, gate_chunks:
                        factors(Ai, P, F) or (None, summary_rows(segs, n_final, summary, gate_chunks)))
    monkeypatch.setattr(pieces, "backward_dh", lambda q, k, do, Ai, P, F, segs, *, n_final, summary, gate_chunks:
                        factors(Ai, P, F) or (None, summary_rows(segs, n_final, summary, gate_chunks), None))
    folded = []
    monkeypatch.setattr(pieces, "fold_summaries", lambda summ, plan, reverse=False, backend="torch": folded.append(
        (plan, reverse, backend)) or segments.fold_summaries(summ, plan, reverse))
    bounds = (0, 507, 1019)                     # two pieces, each ending in a partial chunk
    T = bounds[-1]
    q = k = torch.zeros(1, T, 2, K, dtype=torch.bfloat16)
    v = do = torch.zeros(1, T, HV, K, dtype=torch.bfloat16)
    g = beta = torch.zeros(1, T, HV)
    for cfg, cut in ((IntraCPConfig(segment_len=128), True), (IntraCPConfig(enabled=False), False),
                     (IntraCPConfig(segment_len=128, mode="exact"), True)):
        for bwd in (False, True):
            folded.clear()
            seen["prepares"] = 0
            local = pieces.prepare_local(q, k, v, g, beta, bounds, None, True, cfg)
            saved = SimpleNamespace(Ai="Ai", P="P", F="F", config=cfg)
            out = pieces.piece_backward_summaries(local, saved, do) if bwd else pieces.piece_summaries(local)
            assert seen["prepares"] == 1
            plan = pieces.plan_segments(bounds, 128 if cut else None)
            assert seen["segs"] == [[plan.bounds[i], plan.bounds[i + 1], plan.chunk0[i], 0, i] for i in range(plan.NS)]
            assert seen["chunks"] == [list(c) for c in plan.chunks]
            assert seen["launch"] == (plan.NS, True, cfg.gate_chunks)
            assert seen["prepare"] == (HV, K ** -0.5, True, (T, 2, K), (T, HV))
            assert tuple(out.shape) == (2, HV, K, 2 * K)
            assert bool(folded) == cut and (not cut or folded[0][1:] == (bwd, "tilelang"))
