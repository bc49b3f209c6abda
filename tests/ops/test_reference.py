"""The float64 reference itself, against the recurrence written with explicit K x K matrices."""

import torch

from qla_megatron.ops import recurrent_gated_delta_rule

from .gdr_inputs import make_inputs, rel


def dense_recurrence(q, k, v, g, beta, h0, scale):
    """S_t = exp(g_t)(I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T per head, o_t = S_t^T scale q_t."""
    B, T, H, K = q.shape
    HV = v.shape[2]
    o = torch.zeros(B, T, HV, v.shape[3], dtype=torch.float64)
    S_all = h0.clone()
    for b in range(B):
        for h in range(HV):
            hq = h // (HV // H)  # grouped value heads: v-head h reads qk-head h // (HV / H)
            S = S_all[b, h]
            for t in range(T):
                kt = k[b, t, hq][:, None]
                transition = torch.exp(g[b, t, h]) * (torch.eye(K, dtype=torch.float64) - beta[b, t, h] * kt @ kt.T)
                S = transition @ S + beta[b, t, h] * kt @ v[b, t, h][None, :]
                o[b, t, h] = S.T @ (scale * q[b, t, hq])
            S_all[b, h] = S
    return o, S_all


def test_reference_matches_dense_recurrence():
    q, k, v, g, beta, h0 = make_inputs(2, 9, 2, 4, 5, 3, torch.float64)
    k = torch.nn.functional.normalize(k, dim=-1)
    o, s = recurrent_gated_delta_rule(q, k, v, g, beta, scale=0.7, initial_state=h0, output_final_state=True)
    o_ref, s_ref = dense_recurrence(q, k, v, g, beta, h0, 0.7)
    assert rel(o, o_ref) <= 1e-13 and rel(s, s_ref) <= 1e-13


def test_reference_varlen_restarts_each_sequence():
    q, k, v, g, beta, h0 = make_inputs(1, 7, 1, 2, 4, 4, torch.float64, N=2)
    cu = torch.tensor([0, 3, 7])
    o, s = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                      cu_seqlens=cu)
    for n, (a, b) in enumerate([(0, 3), (3, 7)]):
        o_n, s_n = dense_recurrence(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b],
                                    h0[n:n + 1], 4 ** -0.5)
        assert rel(o[:, a:b], o_n) <= 1e-13 and rel(s[n:n + 1], s_n) <= 1e-13
