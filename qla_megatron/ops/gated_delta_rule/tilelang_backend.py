"""The "tilelang" backend: Hopper (sm90) TileLang kernels for the forward pass.

Served: CUDA device of compute capability 9.0, K = 128, any HV = n * H, batch or varlen, initial
state, l2norm, and whatever the selected forward variant was verified for on an H100
(hopper/chunk.py VERIFIED; the default "rs": q/k/v in bf16 or fp16, V = 64, 128 or 256). Everything
else returns the reason, so backend="auto" falls back to torch and backend="tilelang" raises
ValueError with it.

Gradients: the Hopper backward kernels are a separate issue. Until they land, backward recomputes the
forward through the torch backend (same math, fp32) and differentiates that: correct, but slower and
with the torch path's memory. Nothing here touches the GPU or imports TileLang at import time.
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
    from .hopper.chunk import VERIFIED, forward_variant
    variant = forward_variant()            # a bad $QLA_MEGATRON_HOPPER_FORWARD raises here, by name
    dtypes, values = VERIFIED[variant]["dtypes"], VERIFIED[variant]["V"]
    if info.dtype not in dtypes:
        return f"serves q, k, v in {[str(d) for d in dtypes]} (forward {variant!r}), got {info.dtype}"
    if info.K not in SUPPORTED_K:
        return f"supports head dim K in {SUPPORTED_K}, got K={info.K}"
    if info.V not in values:
        return f"supports value dim V in {values} (forward {variant!r}), got V={info.V}"
    return None


class _RecomputeInTorch(torch.autograd.Function):
    """Forward: the TileLang kernels. Backward: differentiate the torch backend's forward."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, opts):
        from .hopper.chunk import chunk_gated_delta_rule_fwd
        scale, output_final_state, cu_seqlens, l2 = opts
        o, ht = chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state, output_final_state,
                                           cu_seqlens, l2)
        ctx.save_for_backward(q, k, v, g, beta, initial_state)
        ctx.opts = opts
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        from .chunk import chunk_gated_delta_rule_torch
        scale, output_final_state, cu_seqlens, l2 = ctx.opts
        inputs = [t.detach().requires_grad_(t.requires_grad) if t is not None else None
                  for t in ctx.saved_tensors]
        with torch.enable_grad():
            o, ht = chunk_gated_delta_rule_torch(*inputs[:5], scale, inputs[5], output_final_state,
                                                 cu_seqlens, l2)
            outs, grads = [o], [do]
            if ht is not None and dht is not None:
                outs.append(ht)
                grads.append(dht)
            leaves = [t for t in inputs if t is not None and t.requires_grad]
            got = iter(torch.autograd.grad(outs, leaves, grads, allow_unused=True))
        return tuple(next(got) if (t is not None and t.requires_grad) else None for t in inputs) + (None,)


def run(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel):
    opts = (scale, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel)
    tensors = (q, k, v, g, beta, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _RecomputeInTorch.apply(q, k, v, g, beta, initial_state, opts)
    from .hopper.chunk import chunk_gated_delta_rule_fwd
    return chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state, output_final_state,
                                      cu_seqlens, use_qk_l2norm_in_kernel)


backends.register(backends.Backend(name="tilelang", unsupported=unsupported, run=run))
