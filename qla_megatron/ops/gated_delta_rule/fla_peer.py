"""The optional "fla" backend: flash-linear-attention's Triton kernels (fla-core), for cross-checks.

Explicit only (backend="fla"); never chosen by "auto" and never required. Note: on Hopper, FLA 0.6
hands the call to FlashQLA's kernels when flash-qla is importable, unless FLA_FLASH_QLA=0 is set
before the call; set it to compare with FLA's own Triton kernels.
"""

from __future__ import annotations

from . import backends


def _fla_function():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    except Exception:  # not installed, or its import fails on this machine
        return None
    return fla_chunk


def _unsupported(info: backends.CallInfo):
    if info.device.type != "cuda":
        return f"needs a CUDA device, inputs are on {info.device}"
    if _fla_function() is None:
        return "fla-core is not importable (pip install 'qla_megatron[peers]')"
    return None


def _run(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel,
         options=None):
    """FLA's function; `options` (GDNOptions) has nothing FLA takes and is ignored."""
    o, final = _fla_function()(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                               use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    return o, final


backends.register(backends.Backend(name="fla", unsupported=_unsupported, run=_run))
