"""CPU checks of the Hopper forward's variant switch ($QLA_MEGATRON_HOPPER_FORWARD): which factory each
value picks, that a bad value raises a ValueError naming the variable, and that the precompile list of
the rs variant names kernels that exist. Builds TileLang's IR for the rs kernels (front end only: no
CUDA is generated or compiled, no GPU is touched); checks the rs algebra against the recurrence in
float64, and the intra-CP plans (composition, gate-driven warm-ups)."""

import pytest
import torch

from qla_megatron.ops.gated_delta_rule.hopper import chunk as hchunk
from qla_megatron.ops.gated_delta_rule.hopper.forward import forward_kernel


def test_default_is_the_register_state_kernel(monkeypatch):
    from qla_megatron.ops.gated_delta_rule.hopper.forward_rs import forward_rs_kernel
    monkeypatch.delenv(hchunk.FORWARD_ENV, raising=False)
    assert hchunk.forward_variant() == "rs"
    assert hchunk.forward_factory() is forward_rs_kernel
    monkeypatch.setenv(hchunk.FORWARD_ENV, "")
    assert hchunk.forward_factory() is forward_rs_kernel


def test_env_picks_fused(monkeypatch):
    from qla_megatron.ops.gated_delta_rule.hopper.forward_rs import forward_rs_kernel
    monkeypatch.setenv(hchunk.FORWARD_ENV, "fused")
    assert hchunk.forward_variant() == "fused"
    assert hchunk.forward_factory() is forward_kernel
    assert hchunk.forward_variant("rs") == "rs"
    assert hchunk.forward_factory("rs") is forward_rs_kernel       # an explicit argument wins


def test_bad_values_raise(monkeypatch):
    monkeypatch.setenv(hchunk.FORWARD_ENV, "WS2")
    with pytest.raises(ValueError, match="QLA_MEGATRON_HOPPER_FORWARD='WS2'"):
        hchunk.forward_variant()
    with pytest.raises(ValueError, match="variant='tma'"):
        hchunk.forward_variant("tma")
    with pytest.raises(ValueError, match="variant='ws'"):          # removed, superseded by rs
        hchunk.forward_variant("ws")


def test_op_reads_the_switch_before_any_gpu_work(monkeypatch):
    monkeypatch.setenv(hchunk.FORWARD_ENV, "nope")
    q = k = torch.zeros(1, 4, 1, 128)
    v = torch.zeros(1, 4, 2, 128)
    g = beta = torch.zeros(1, 4, 2)
    with pytest.raises(ValueError, match=hchunk.FORWARD_ENV):
        hchunk.chunk_gated_delta_rule_fwd(q, k, v, g, beta, None, None, True, None, True)


def test_rs_forward_set_and_ir():
    rs = hchunk.forward_set(2, 8, 128, 128, variant="rs")
    assert rs[0] == ("prepare_rs", (2, 8, 128, "bfloat16"), dict(l2norm=True, HP=4, share_qk=True))
    assert hchunk.prepare_heads(16, 48) == dict(HP=3, share_qk=True)
    assert hchunk.prepare_heads(16, 32) == dict(HP=2, share_qk=True)
    assert hchunk.prepare_heads(4, 40) == dict(HP=2, share_qk=True)          # HV / H = 10
    # HV = H: two v-heads a program still, each with its own qk-head pass; other odd HV / H: one
    assert hchunk.forward_set(32, 32, 128, 128)[0][2] == dict(l2norm=True, HP=2, share_qk=False, min_blocks=2)
    assert hchunk.prepare_heads(3, 15) == dict(HP=1, share_qk=True)
    assert hchunk.prepare_heads(3, 3) == dict(HP=1, share_qk=True)
    assert [n for n, _, _ in rs[1:]] == ["forward_rs"] * 5 + ["compose"] * 2
    assert [kw["has_initial"] for _, _, kw in rs[6:]] == [False, True]
    for l2norm in (True, False):      # rs is the default
        assert hchunk.forward_set(2, 8, 128, 128, l2norm=l2norm) == \
            hchunk.forward_set(2, 8, 128, 128, l2norm=l2norm, variant="rs")
    from qla_megatron.ops.gated_delta_rule.hopper.forward_rs import forward_rs_kernel
    from qla_megatron.ops.gated_delta_rule.hopper.prepare_rs import prepare_rs_kernel
    f = forward_rs_kernel.get_tir(2, 8, 128, 128, "bfloat16", has_initial=True)
    assert [p.name.removesuffix("_handle") for p in f.params] == \
        ["q", "k", "v", "Ag", "P", "F", "segs", "h0", "o", "ht", "states"]
    f = prepare_rs_kernel.get_tir(2, 8, 128, "bfloat16", l2norm=True, HP=4)
    assert [p.name.removesuffix("_handle") for p in f.params] == \
        ["q", "k", "g", "beta", "chunks", "sc", "Ag", "P", "F"]
    with pytest.raises(AssertionError):
        prepare_rs_kernel.get_tir(3, 9, 128, "bfloat16", HP=2)      # HV / H = 3 is odd: no shared pair
    with pytest.raises(AssertionError):
        prepare_rs_kernel.get_tir(3, 9, 128, "bfloat16", HP=2, share_qk=False)   # HV = 9 is odd
    for kw in (dict(HP=2, share_qk=False), dict(HP=3)):      # a qk-pass per v-head; 256 threads
        f = prepare_rs_kernel.get_tir(16, 48, 128, "bfloat16", **kw)
        assert f.params[-1].name.removesuffix("_handle") == "F"


def _rs_emulated(q, k, v, g, beta, h0, scale, l2norm):
    """forward_rs.py's algebra in float64 for one sequence and v-head: prepare's factors (Ag, P, F,
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
        Ag = torch.where(low, A * Gam * b[None, :], zero)
        P = torch.where(low, scale * Rq[:, None] * Rk[None, :] * ((Q * m) @ (Kc * m).T) * Gam, zero)
        gk, ee, qs, gC = torch.exp(G) * Rk, torch.exp(G[-1] - G) * Rk, scale * torch.exp(G) * Rq, torch.exp(G[-1])
        Xt = St @ Kc.T
        Ot = St @ Q.T
        Dt = (Vc.T - Xt * gk[None, :]) @ Ag.T
        St = gC * St + (Dt * ee[None, :]) @ Kc
        o[sl] = (Ot * qs[None, :] + Dt @ P.T).T
    return o[:T], St.T


@pytest.mark.parametrize("l2norm", [True, False], ids=["l2norm", "no-l2norm"])
@pytest.mark.parametrize("T", [1, 63, 64, 200])
def test_rs_algebra_matches_recurrence(T, l2norm):
    """The factorization forward_rs.py computes equals the float64 token-by-token recurrence: a check of
    the algebra only, not of the kernel."""
    from qla_megatron.ops import recurrent_gated_delta_rule
    from .gdr_inputs import make_inputs, rel
    q, k, v, g, beta, h0 = make_inputs(1, T, 1, 2, 32, 16)
    if not l2norm:
        q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    scale = 32 ** -0.5
    ro, rs = recurrent_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=True,
                                        use_qk_l2norm_in_kernel=l2norm)
    for hv in range(2):
        o, s = _rs_emulated(q[0, :, 0], k[0, :, 0], v[0, :, hv], g[0, :, hv], beta[0, :, hv], h0[0, hv],
                            scale, l2norm)
        assert rel(o, ro[0, :, hv]) < 1e-10 and rel(s, rs[0, hv]) < 1e-10


@pytest.mark.parametrize("bounds,seg_len", [((0, 1000), 128), ((0, 300, 310, 1000, 1100, 1164), 128),
                                            ((0, 64, 640, 700), 64)])
@pytest.mark.parametrize("with_h0", [False, True])
def test_compose_starts_matches_a_plain_walk(bounds, seg_len, with_h0):
    """compose_starts (the walk tables compose_kernel reads: summary and main-pass rows per sequence
    and step) gives every main-pass segment the start state of a plain per-sequence walk
    Z[j + 1] = M[j] Z[j] + S_ext[j] found from the segments' tokens (float64 on the CPU)."""
    plan = hchunk._make_plan(bounds, seg_len, torch.device("cpu"))
    N, HV, K, V = len(bounds) - 1, 2, 8, 4
    summ = torch.randn(plan.sum_segs.shape[0], HV, K, K + V, dtype=torch.float64) * 0.3
    h0 = torch.randn(N, HV, K, V, dtype=torch.float64) if with_h0 else None
    got = hchunk.compose_starts(plan, summ.float(), h0.float() if with_h0 else None, K)
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


@pytest.mark.parametrize("summary,gate_chunks", [(True, 0), (True, 4), (False, 0)])
def test_forward_rs_launcher(monkeypatch, summary, gate_chunks):
    """The launcher builds the kernel for the pass it runs (gate_chunks reaches the summary kernel only)
    and hands the summary pass a one-row o (it writes none) but the main pass a full one. Checked on
    what the factory and the kernel receive (a recorder stands in for them)."""
    got = {}

    def factory(*args, **kwargs):
        got["kwargs"] = kwargs

        def kern(*tensors):
            got["o"] = tensors[8]
        return kern

    monkeypatch.setattr(hchunk, "forward_rs_kernel", factory)
    Tt, H, HV, K, V, NS = 200, 2, 4, 128, 128, 3
    q = k = torch.zeros(Tt, H, K, dtype=torch.bfloat16)
    v = torch.zeros(Tt, HV, V, dtype=torch.bfloat16)
    segs = torch.zeros(NS, 5, dtype=torch.int32)
    hchunk.forward_rs(q, k, v, None, None, None, segs, n_final=NS, summary=summary, gate_chunks=gate_chunks)
    assert got["kwargs"]["summary"] == summary and got["kwargs"]["gate_chunks"] == gate_chunks
    assert tuple(got["o"].shape) == ((1, HV, V) if summary else (Tt, HV, V))


def test_summary_gate_in_forward_set():
    """The rs forward set's summary kernel is gate-driven with the default config's warm-up length;
    gate_chunks=0 asks for the exact one; the kernel refuses gate_chunks outside summary mode."""
    from qla_megatron.ops.gated_delta_rule.hopper.forward_rs import forward_rs_kernel
    from qla_megatron.ops.gated_delta_rule.intra_cp import IntraCPConfig
    assert hchunk.forward_set(2, 8, 128, 128)[5][2]["gate_chunks"] == IntraCPConfig().warmup_chunks == 4
    assert hchunk.forward_set(2, 8, 128, 128, gate_chunks=0)[5][2]["gate_chunks"] == 0
    with pytest.raises(AssertionError, match="summary pass only"):
        forward_rs_kernel.get_tir(2, 8, 128, 128, "bfloat16", gate_chunks=4)