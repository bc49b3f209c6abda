"""Chunked gated delta rule in PyTorch, in the gate-free form of DESIGN §1.

Per chunk of C = 64 tokens of one v-head (G = in-chunk cumsum of g, gamma = exp(G),
Gamma_ij = exp(G_i - G_j) for i >= j else 0):

    A      = (I + StrictLower(diag(beta) K K^T))^-1          no gate: computed once per chunk
    Vd     = (Gamma . A) diag(beta) (V - diag(gamma) K S)    Gamma . A = diag(gamma) A diag(gamma)^-1
    O      = scale (diag(gamma) Q S + (Gamma . Q K^T) Vd)
    S_next = gamma_C S + K^T diag(exp(G_C - G)) Vd

Every decay factor is the exponential of a difference of cumulative log-gates, each <= 1 for g <= 0,
so strong decay underflows to 0 instead of forming 0/0.

Sequences (batch rows or varlen pieces) are laid out as whole chunks, each padded to a multiple of C
with tokens that leave the state unchanged (g = 0, beta = 0, k = v = 0). All gate-free and in-chunk
quantities are computed for every chunk at once; only the state recurrence walks chunk by chunk,
advancing every sequence that still has a chunk at that position together. Memory is linear in T.
"""

from __future__ import annotations

import torch

CHUNK_SIZE = 64


def chunk_scan(k, v, g, beta, bounds, *, q=None, scale=1.0, initial_state=None, chunk_size=CHUNK_SIZE):
    """Run the gated delta rule over packed sequences.

    Args:
        k: [T, H, K], v: [T, HV, V], g, beta: [T, HV], q: [T, H, K] or None (no output then);
            all in the compute dtype, q/k already L2-normalised if asked for.
        bounds: N + 1 token offsets of the sequences in the packed stream (a python list).
        scale: applied to q. initial_state: [N, HV, K, V] or None (zeros).

    Returns:
        (o [T, HV, V] or None, final state [N, HV, K, V]), differentiable through torch autograd.
    """
    C = chunk_size
    T, H, K = k.shape
    HV, V = v.shape[1], v.shape[2]
    G = HV // H
    N = len(bounds) - 1
    dev, dt = k.device, k.dtype

    lens = [bounds[n + 1] - bounds[n] for n in range(N)]
    nchunks = [-(-L // C) for L in lens]
    chunk_off = [0]
    for nc in nchunks:
        chunk_off.append(chunk_off[-1] + nc)
    NC = chunk_off[-1]

    # Position of every token in the chunk-padded layout [NC * C].
    seq_of = torch.repeat_interleave(torch.arange(N, device=dev), torch.tensor(lens, device=dev))
    bounds_t = torch.tensor(bounds, device=dev)
    pos = torch.tensor(chunk_off[:-1], device=dev)[seq_of] * C + torch.arange(T, device=dev) - bounds_t[seq_of]

    def to_chunks(x):
        padded = x.new_zeros((NC * C,) + tuple(x.shape[1:])).index_copy(0, pos, x)
        return padded.view((NC, C) + tuple(x.shape[1:]))

    # Head-major chunk views. qk heads broadcast over the G v-heads that share them (no repeat).
    kc = to_chunks(k).permute(0, 2, 1, 3).unsqueeze(2)                   # [NC, H, 1, C, K]
    vc = to_chunks(v).view(NC, C, H, G, V).permute(0, 2, 3, 1, 4)       # [NC, H, G, C, V]
    gc = to_chunks(g).view(NC, C, H, G).permute(0, 2, 3, 1)             # [NC, H, G, C]
    bc = to_chunks(beta).view(NC, C, H, G).permute(0, 2, 3, 1)          # [NC, H, G, C]

    lower = torch.ones(C, C, dtype=torch.bool, device=dev).tril()
    strict = lower.tril(-1)
    eye = torch.eye(C, dtype=dt, device=dev)

    # Gate-free inverse, one C x C per (chunk, v-head).
    kkt = kc @ kc.transpose(-1, -2)                                      # [NC, H, 1, C, C]
    L = (bc.unsqueeze(-1) * kkt).masked_fill(~strict, 0)                 # [NC, H, G, C, C]
    A = torch.linalg.solve_triangular(L + eye, eye.expand_as(L), upper=False, unitriangular=True)

    Gcum = gc.cumsum(-1)                                                 # [NC, H, G, C]
    Gamma = torch.exp((Gcum.unsqueeze(-1) - Gcum.unsqueeze(-2)).masked_fill(~lower, float("-inf")))
    Ag = Gamma * A                                                       # gated inverse by scaling
    gamma = torch.exp(Gcum).unsqueeze(-1)                                # [NC, H, G, C, 1]
    to_end = torch.exp(Gcum[..., -1:] - Gcum).unsqueeze(-1)              # [NC, H, G, C, 1]
    gamma_C = torch.exp(Gcum[..., -1])[..., None, None]                  # [NC, H, G, 1, 1]
    bcol = bc.unsqueeze(-1)                                              # [NC, H, G, C, 1]
    if q is not None:
        qc = to_chunks(q).permute(0, 2, 1, 3).unsqueeze(2) * scale       # [NC, H, 1, C, K]
        qkg = (qc @ kc.transpose(-1, -2)) * Gamma                        # [NC, H, G, C, C]

    # The state walk. Longest sequences first, so the ones still running at chunk j are a prefix.
    # Chunks are gathered once into walk order and split per step: the backward of split is one
    # concatenation, where per-step indexing would cost a full-size zero gradient at every step.
    order = sorted(range(N), key=lambda n: -nchunks[n])
    sorted_nc = [nchunks[n] for n in order]
    steps = sorted_nc[0] if N else 0
    active_at = [sum(1 for nc in sorted_nc if nc > j) for j in range(steps + 1)]
    walk = torch.tensor([chunk_off[n] + j for j in range(steps) for n in order[:active_at[j]]], device=dev)

    def per_step(x):
        return x[walk].split(active_at[:steps])

    k_s, v_s, Ag_s, b_s = per_step(kc), per_step(vc), per_step(Ag), per_step(bcol)
    gamma_s, to_end_s, gC_s = per_step(gamma), per_step(to_end), per_step(gamma_C)
    if q is not None:
        q_s, qkg_s = per_step(qc), per_step(qkg)
    S = (initial_state.to(dt) if initial_state is not None
         else k.new_zeros(N, HV, K, V))[torch.tensor(order, device=dev)].view(N, H, G, K, V)
    finished, o_parts = [], []
    for j in range(steps):
        kj = k_s[j]
        Vd = Ag_s[j] @ (b_s[j] * (v_s[j] - gamma_s[j] * (kj @ S)))
        if q is not None:
            o_parts.append(gamma_s[j] * (q_s[j] @ S) + qkg_s[j] @ Vd)
        S = gC_s[j] * S + kj.transpose(-1, -2) @ (to_end_s[j] * Vd)
        if active_at[j + 1] < active_at[j]:
            S, done = S.split([active_at[j + 1], active_at[j] - active_at[j + 1]])
            finished.append(done)
    final_sorted = torch.cat(finished[::-1]).view(N, HV, K, V)
    inverse = torch.empty(N, dtype=torch.long, device=dev)
    inverse[torch.tensor(order, device=dev)] = torch.arange(N, device=dev)
    final = final_sorted[inverse]

    if q is None:
        return None, final
    oc = torch.cat(o_parts)[torch.argsort(walk)]                          # [NC, H, G, C, V]
    o = oc.permute(0, 3, 1, 2, 4).reshape(NC * C, HV, V)[pos]
    return o, final
