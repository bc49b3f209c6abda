"""The "tilelang" backend: Hopper (sm90) TileLang kernels, forward and backward (hopper/).

Served: CUDA device of compute capability 9.0, K = 128, any HV = n * H, batch or varlen, initial
state, l2norm, q/k/v in bf16 or fp16; V = 64, 128 or 256 for the forward, V = 128 when a backward
will follow (hopper/chunk.py BACKWARD_V). Everything else returns the reason, so
backend="auto" falls back to torch and backend="tilelang" raises ValueError with it. Nothing here
touches the GPU or imports TileLang at import time.
"""

from __future__ import annotations

import functools

import torch

from . import backends

SUPPORTED_K = (128,)


@functools.lru_cache(maxsize=None)
def _capability(index: int):
    return torch.cuda.get_device_capability(index)


def unsupported(info: backends.CallInfo):
    if info.device.type != "cuda":
        return f"needs a CUDA device (Hopper, sm90), got device {info.device}"
    cap = _capability(info.device.index if info.device.index is not None else torch.cuda.current_device())
    if cap != (9, 0):
        return f"needs compute capability 9.0 (H100/H200), got {cap[0]}.{cap[1]}"
    from .hopper.chunk import BACKWARD_V, VERIFIED
    if info.dtype not in VERIFIED["dtypes"]:
        return f"serves q, k, v in {[str(d) for d in VERIFIED['dtypes']]}, got {info.dtype}"
    if info.K not in SUPPORTED_K:
        return f"supports head dim K in {SUPPORTED_K}, got K={info.K}"
    if info.V not in VERIFIED["V"]:
        return f"supports value dim V in {VERIFIED['V']}, got V={info.V}"
    if info.requires_grad and info.V not in BACKWARD_V:
        return f"its backward supports value dim V in {BACKWARD_V}, got V={info.V}"
    return None


def run(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel,
        options):
    """Runs the Hopper kernels with the call's intra-card CP config (options.intra_cp)."""
    from .hopper.autograd import run as hopper_run
    return hopper_run(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                      use_qk_l2norm_in_kernel, intra_cp=options.intra_cp)


backends.register(backends.Backend(name="tilelang", unsupported=unsupported, run=run))
