"""Chunked gated delta rule in PyTorch, in the gate-free form of DESIGN §1, with its backward.

Per chunk of C = 64 tokens of one v-head (G = in-chunk cumsum of g, gamma = exp(G),
Gamma_ij = exp(G_i - G_j) for i >= j else 0, d = exp(G_C - G), Qs = scale Q):

    A      = (I + StrictLower(diag(beta) K K^T))^-1          no gate: computed once per chunk
    X      = V - diag(gamma) K S
    Vd     = (Gamma . A) diag(beta) X                        Gamma . A = diag(gamma) A diag(gamma)^-1
    O      = diag(gamma) Qs S + (Gamma . Qs K^T) Vd
    S_next = gamma_C S + K^T diag(d) Vd

Every decay factor is the exponential of a difference of cumulative log-gates, each <= 1 for g <= 0,
so strong decay underflows to 0 instead of forming 0/0.

Plan (the one the Hopper kernels follow): all gate-free and in-chunk terms are computed for every
chunk at once; only the state walks chunk by chunk. The forward keeps each chunk's start state; the
backward walks the chunks in reverse with the state adjoint dS,

    dVd    = (Gamma . Qs K^T)^T dO + diag(d) K dS_next
    dX     = diag(beta) (Gamma . A)^T dVd
    dS     = gamma_C dS_next + Qs^T diag(gamma) dO - K^T diag(gamma) dX

and then forms every input gradient for all chunks at once from (S, dS_next, dVd).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import ChunkLayout, chunk_layout

CHUNK_SIZE = 64


def chunk_scan(k, v, g, beta, bounds, *, q=None, scale=1.0, initial_state=None, chunk_size=CHUNK_SIZE):
    """Run the gated delta rule over packed sequences.

    Args:
        k: [T, H, K], v: [T, HV, V], g, beta: [T, HV], q: [T, H, K] or None (no output then);
            all in the compute dtype, q/k already L2-normalised if asked for.
        bounds: N + 1 token offsets of the sequences in the packed stream.
        scale: applied to q. initial_state: [N, HV, K, V] or None (zeros).

    Returns:
        (o [T, HV, V] or None, final state [N, HV, K, V]); differentiable in every tensor input.
    """
    opts = ScanOptions(bounds=tuple(int(b) for b in bounds), scale=float(scale), chunk_size=chunk_size)
    if initial_state is None:
        initial_state = k.new_zeros(len(bounds) - 1, v.shape[1], k.shape[2], v.shape[2])
    o, final = ChunkScanFunction.apply(q, k, v, g, beta, initial_state.to(k.dtype), opts)
    return (o if q is not None else None), final


@dataclass(frozen=True)
class ScanOptions:
    bounds: tuple
    scale: float
    chunk_size: int


class ChunkScanFunction(torch.autograd.Function):
    """(q | None, k, v, g, beta, initial_state, opts) -> (o, final); o is empty when q is None."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, opts: ScanOptions):
        lay = chunk_layout(opts.bounds, opts.chunk_size, k.device)
        ch = ChunkTerms(lay, q, k, v, g, beta, opts.scale)
        o_c, final, S_start = forward_walk(lay, ch, h0)
        ctx.save_for_backward(q, k, v, g, beta, S_start)
        ctx.opts, ctx.lay = opts, lay
        o = lay.to_tokens(o_c.permute(0, 3, 1, 2, 4)).flatten(1, 2) if q is not None else k.new_empty(0)
        return o, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dfinal):
        q, k, v, g, beta, S_start = ctx.saved_tensors
        lay, opts = ctx.lay, ctx.opts
        ch = ChunkTerms(lay, q, k, v, g, beta, opts.scale)
        dO = ch.head_major_v(lay.to_chunks(do)) if q is not None else None
        dS_end, dVd, dh0 = backward_walk(lay, ch, dO, dfinal)
        grads = chunk_gradients(ch, S_start, dS_end, dVd, dO)
        dq = None
        if q is not None:
            dq = lay.to_tokens(grads["dq"].sum(2).transpose(1, 2)) * opts.scale
        dk = lay.to_tokens(grads["dk"].sum(2).transpose(1, 2))
        dv = lay.to_tokens(grads["dv"].permute(0, 3, 1, 2, 4)).flatten(1, 2)
        dg = lay.to_tokens(grads["dg"].permute(0, 3, 1, 2)).flatten(1, 2)
        dbeta = lay.to_tokens(grads["dbeta"].permute(0, 3, 1, 2)).flatten(1, 2)
        return dq, dk, dv, dg, dbeta, dh0, None


class ChunkTerms:
    """Head-major chunk views and every per-chunk term that does not depend on the state.
    qk heads broadcast over the HV // H v-heads that share them (never repeated in memory)."""

    def __init__(self, lay: ChunkLayout, q, k, v, g, beta, scale):
        NC, C = lay.NC, lay.C
        self.H, self.K = k.shape[1], k.shape[2]
        self.G, self.V = v.shape[1] // self.H, v.shape[2]
        self.kc = lay.to_chunks(k).permute(0, 2, 1, 3).unsqueeze(2)          # [NC, H, 1, C, K]
        self.vc = self.head_major_v(lay.to_chunks(v))                         # [NC, H, G, C, V]
        gc = lay.to_chunks(g).view(NC, C, self.H, self.G).permute(0, 2, 3, 1)     # [NC, H, G, C]
        bc = lay.to_chunks(beta).view(NC, C, self.H, self.G).permute(0, 2, 3, 1)
        dev, dt = k.device, k.dtype
        self.lower = torch.ones(C, C, dtype=torch.bool, device=dev).tril()
        self.strict = self.lower.tril(-1)
        eye = torch.eye(C, dtype=dt, device=dev)

        self.kkt = self.kc @ self.kc.transpose(-1, -2)                        # [NC, H, 1, C, C]
        L = (bc.unsqueeze(-1) * self.kkt).masked_fill(~self.strict, 0)        # [NC, H, G, C, C]
        self.A = torch.linalg.solve_triangular(L + eye, eye.expand_as(L), upper=False, unitriangular=True)
        Gcum = gc.cumsum(-1)
        self.Gamma = torch.exp((Gcum.unsqueeze(-1) - Gcum.unsqueeze(-2)).masked_fill(~self.lower, float("-inf")))
        self.Ag = self.Gamma * self.A                                         # gated inverse by scaling
        self.gamma = torch.exp(Gcum).unsqueeze(-1)                            # [NC, H, G, C, 1]
        self.to_end = torch.exp(Gcum[..., -1:] - Gcum).unsqueeze(-1)          # [NC, H, G, C, 1]
        self.gamma_C = torch.exp(Gcum[..., -1])[..., None, None]              # [NC, H, G, 1, 1]
        self.bcol = bc.unsqueeze(-1)                                          # [NC, H, G, C, 1]
        self.qc = self.qk = self.qkg = None
        if q is not None:
            self.qc = lay.to_chunks(q).permute(0, 2, 1, 3).unsqueeze(2) * scale   # [NC, H, 1, C, K]
            self.qk = self.qc @ self.kc.transpose(-1, -2)                     # [NC, H, 1, C, C]
            self.qkg = self.qk * self.Gamma                                   # [NC, H, G, C, C]

    def head_major_v(self, x):
        """[NC, C, HV, V] -> [NC, H, G, C, V]."""
        return x.view(x.shape[0], x.shape[1], self.H, self.G, x.shape[-1]).permute(0, 2, 3, 1, 4)


def forward_walk(lay: ChunkLayout, ch: ChunkTerms, h0):
    """Walk the chunks in order. Returns o [NC, H, G, C, V] (None without q), the final states
    [N, HV, K, V] and every chunk's start state [NC, H, G, K, V]."""
    H, G, K, V = ch.H, ch.G, ch.K, ch.V
    S_start = h0.new_empty(lay.NC, H, G, K, V)
    o_c = h0.new_empty(lay.NC, H, G, lay.C, V) if ch.qc is not None else None
    final = h0.new_empty(lay.N, H, G, K, V)
    S = h0[lay.order].view(lay.N, H, G, K, V)
    for j in range(lay.steps):
        idx, a, a_next = lay.step_chunks(j), lay.active_at[j], lay.active_at[j + 1]
        S = S[:a]
        S_start[idx] = S
        kj = ch.kc[idx]
        Vd = ch.Ag[idx] @ (ch.bcol[idx] * (ch.vc[idx] - ch.gamma[idx] * (kj @ S)))
        if o_c is not None:
            o_c[idx] = ch.gamma[idx] * (ch.qc[idx] @ S) + ch.qkg[idx] @ Vd
        S = ch.gamma_C[idx] * S + kj.transpose(-1, -2) @ (ch.to_end[idx] * Vd)
        final[a_next:a] = S[a_next:a]
    return o_c, final[lay.inverse].view(lay.N, H * G, K, V), S_start


def backward_walk(lay: ChunkLayout, ch: ChunkTerms, dO, dfinal):
    """Walk the chunks in reverse with the state adjoint. Returns the adjoint at every chunk's end
    [NC, H, G, K, V], dVd [NC, H, G, C, V] and the initial-state gradient [N, HV, K, V]."""
    H, G, K, V = ch.H, ch.G, ch.K, ch.V
    dS_end = ch.kc.new_empty(lay.NC, H, G, K, V)
    dVd_all = ch.kc.new_empty(lay.NC, H, G, lay.C, V)
    dfinal = dfinal.to(ch.kc.dtype)[lay.order].view(lay.N, H, G, K, V)
    dS = dfinal[:0]
    for j in reversed(range(lay.steps)):
        idx, a, a_next = lay.step_chunks(j), lay.active_at[j], lay.active_at[j + 1]
        dS = torch.cat([dS, dfinal[a_next:a]])        # sequences whose last chunk is j start here
        dS_end[idx] = dS
        kj = ch.kc[idx]
        dVd = ch.to_end[idx] * (kj @ dS)
        if dO is not None:
            dVd = dVd + ch.qkg[idx].transpose(-1, -2) @ dO[idx]
        dVd_all[idx] = dVd
        dX = ch.bcol[idx] * (ch.Ag[idx].transpose(-1, -2) @ dVd)
        dS = ch.gamma_C[idx] * dS - kj.transpose(-1, -2) @ (ch.gamma[idx] * dX)
        if dO is not None:
            dS = dS + ch.qc[idx].transpose(-1, -2) @ (ch.gamma[idx] * dO[idx])
    return dS_end, dVd_all, dS[lay.inverse].view(lay.N, H * G, K, V)


def chunk_gradients(ch: ChunkTerms, S, dS_end, dVd, dO):
    """Input gradients of every chunk at once (head-major, before the sum over shared qk heads)."""
    KS = ch.kc @ S                                                        # [NC, H, G, C, V]
    X = ch.vc - ch.gamma * KS
    bX = ch.bcol * X
    Vd = ch.Ag @ bX
    AgT_dVd = ch.Ag.transpose(-1, -2) @ dVd
    dX = ch.bcol * AgT_dVd
    dbeta = (AgT_dVd * X).sum(-1)
    dAg = (dVd @ bX.transpose(-1, -2)).masked_fill(~ch.lower, 0)
    dGamma = ch.A * dAg
    At = ch.A.transpose(-1, -2)
    dL = -(At @ (ch.Gamma * dAg) @ At).masked_fill(~ch.strict, 0)
    dbeta = dbeta + (dL * ch.kkt).sum(-1)
    E = ch.bcol * dL                                                      # d(K K^T) from L
    dk = E @ ch.kc + E.transpose(-1, -2) @ ch.kc
    dk = dk - (ch.gamma * dX) @ S.transpose(-1, -2)
    dk = dk + ch.to_end * (Vd @ dS_end.transpose(-1, -2))
    dgamma = -(KS * dX).sum(-1)
    dd = ((ch.kc @ dS_end) * Vd).sum(-1)
    dgamma_C = (S * dS_end).sum((-1, -2))
    dq = None
    if dO is not None:
        dP = (dO @ Vd.transpose(-1, -2)).masked_fill(~ch.lower, 0)
        dQK = ch.Gamma * dP
        dGamma = dGamma + ch.qk * dP
        dq = ch.gamma * (dO @ S.transpose(-1, -2)) + dQK @ ch.kc
        dk = dk + dQK.transpose(-1, -2) @ ch.qc
        dgamma = dgamma + ((ch.qc @ S) * dO).sum(-1)
    # Straight to g, without forming dG = d loss / d G: token m's g enters G_i for every i >= m, so
    #   exp(G_i)              -> dg_m += sum_{i >= m} gamma_i dgamma_i
    #   exp(G_C)              -> dg_m += gamma_C dgamma_C
    #   exp(G_C - G_i)        -> dg_m += sum_{i < m} d_i dd_i
    #   exp(G_a - G_b), a > b -> dg_m += sum_{a >= m > b} Gamma_ab dGamma_ab
    # Each is a sum of the terms that really depend on g_m; the reverse cumsum of dG would add and
    # cancel row and column sums of Gamma . dGamma, losing digits to cancellation.
    gdg = ch.gamma.squeeze(-1) * dgamma
    dg = gdg.flip(-1).cumsum(-1).flip(-1) + (ch.gamma_C[..., 0, 0] * dgamma_C).unsqueeze(-1)
    d_dd = ch.to_end.squeeze(-1) * dd
    dg = dg + (d_dd.cumsum(-1) - d_dd)
    X = (ch.Gamma * dGamma).masked_fill(~ch.strict, 0)                  # [.., a, b], a > b
    below = torch.nn.functional.pad(X.cumsum(-1)[..., :-1], (1, 0))    # [a, m] = sum_{b < m} X_ab
    dg = dg + below.masked_fill(~ch.lower, 0).sum(-2)                  # sum over a >= m
    return dict(dq=dq, dk=dk, dv=dX, dg=dg, dbeta=dbeta)
