"""The chunked gated delta rule: public function and backend dispatch.

Backends: "torch" (any device and float dtype; torch/chunk.py, the readable specification),
"tilelang" (Hopper kernels, registered when present), "fla" (optional peer, explicit only).
"""

from __future__ import annotations

import torch

from . import backends
from .inputs import check_inputs, default_scale, packed_stream, sequence_bounds
from .options import resolve_options
from .torch import chunk_scan


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, use_qk_l2norm_in_kernel=False, backend="auto", *, options=None):
    r"""Gated delta rule over chunks of 64 tokens.

        S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T (scale q_t)

    Args:
        q, k: [B, T, H, K].
        v: [B, T, HV, V]; HV must be a multiple of H: v-head h uses qk-head h // (HV // H), by
            indexing (q and k are never repeated in memory).
        g: [B, T, HV], per-token log decay (not cumulated); g <= 0 decays. g > 0 is allowed and
            computed as written (the state grows); exp of in-chunk gate sums above ~88 overflows
            float32 and the result is then Inf/NaN.
        beta: [B, T, HV], usually sigmoid outputs in (0, 1).
        scale: multiplies q; default K ** -0.5.
        initial_state: [N, HV, K, V] float32 (float64 allowed), N = B or len(cu_seqlens) - 1.
        output_final_state: also return the end state of every sequence.
        cu_seqlens: int64 [N + 1] offsets of sequences packed along T (B must be 1); lengths >= 1.
        use_qk_l2norm_in_kernel: L2-normalise q and k over K (eps 1e-6) inside the op.
        backend: "auto" (fastest backend that supports the call), "torch", "tilelang", "fla".
        options: GDNOptions (options.py): intra-card CP of the "tilelang" backend (on/off, segment
            length, "exact" or "gate" summaries, warm-up chunks; ignored by "torch" and "fla") and
            the NaN/Inf debug check. None: default_options() (the QLA_MEGATRON_* environment
            variables, read once per process).

    Returns:
        o: [B, T, HV, V] in q's dtype.
        final_state: [N, HV, K, V] float32 (float64 for float64 inputs), or None.

    Half-precision inputs compute in float32. Differentiable in q, k, v, g, beta and initial_state.
    Bad shapes, dtypes, cu_seqlens, backends or options raise ValueError naming the argument. With
    options.check_finite a NaN/Inf in any input raises ValueError naming it (a debug check: it reads
    every input again and syncs with the device); without it (the default) a non-finite input makes
    every later output of its sequence NaN. Without check_finite the checks read cu_seqlens' values
    only when it is on the CPU: on a GPU the "tilelang" backend builds its plan there from them
    (nothing waits for the device, packed or not), while "torch" and "fla" read them on the host
    (and "torch" checks them then).

    Example::

        >>> B, T, H, HV, K, V = 1, 1000, 4, 8, 128, 128
        >>> q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
        >>> v = torch.randn(B, T, HV, V)
        >>> g = -torch.nn.functional.softplus(torch.randn(B, T, HV))
        >>> beta = torch.rand(B, T, HV)
        >>> o, s = chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True,
        ...                               use_qk_l2norm_in_kernel=True)
        >>> # varlen: three sequences of 10, 500 and 490 tokens packed into one row
        >>> cu = torch.tensor([0, 10, 510, 1000])
        >>> o, s = chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu, output_final_state=True,
        ...                               use_qk_l2norm_in_kernel=True)
        >>> s.shape
        torch.Size([3, 8, 128, 128])
    """
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a string, one of {backends.known_backends()}, got {backend!r}")
    options = resolve_options(options)
    check_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens, check_finite=options.check_finite)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (q, k, v, g, beta, initial_state))
    chosen = backends.select(backend, _call_info(q, k, v, cu_seqlens, grad))
    return chosen.run(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                      use_qk_l2norm_in_kernel, options)


def which_backend(q, k, v, cu_seqlens=None, backend="auto", requires_grad=False) -> str:
    """Name of the backend that `chunk_gated_delta_rule` would run for these inputs (ValueError if none);
    requires_grad: for a call whose backward will run."""
    return backends.select(backend, _call_info(q, k, v, cu_seqlens, requires_grad)).name


def _call_info(q, k, v, cu_seqlens, requires_grad=False):
    return backends.CallInfo(device=q.device, dtype=q.dtype, H=k.shape[2], HV=v.shape[2],
                             K=k.shape[3], V=v.shape[3], varlen=cu_seqlens is not None,
                             requires_grad=requires_grad)


def chunk_gated_delta_rule_torch(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                 use_qk_l2norm_in_kernel, options=None):
    """The torch backend on validated inputs (hand-written backward: torch/chunk.py). It has no
    intra-card CP: `options` (GDNOptions) is accepted and ignored."""
    B, T, K = k.shape[0], k.shape[1], k.shape[3]
    out_dtype = q.dtype
    qf, kf, vf, gf, bf = packed_stream(q, k, v, g, beta, use_qk_l2norm_in_kernel)
    o, final = chunk_scan(kf, vf, gf, bf, sequence_bounds(B, T, cu_seqlens), q=qf,
                          scale=default_scale(scale, K), initial_state=initial_state)
    return o.view(v.shape).to(out_dtype), (final if output_final_state else None)


backends.register(backends.Backend(name="torch", unsupported=lambda info: None,
                                   run=chunk_gated_delta_rule_torch))
