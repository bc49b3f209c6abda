"""The elementwise head of the delta rule in Triton, one kernel each way:

    g = -exp(A_log) * softplus(a + dt_bias)     (fp32; softplus(x) = x above 20, as torch's)
    beta = sigmoid(b)                           (b's dtype)

a, b [B, S, HV] are read in place (the layer's alpha / beta split views of in_proj's output, any
strides, unit stride on HV). The backward writes da, db and sums dA_log, ddt_bias per program in fp32
([programs, HV] buffers that torch reduces: deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R = 64


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _gate_head_fwd_kernel(a_ptr, b_ptr, alog_ptr, dt_ptr, g_ptr, beta_ptr, R, S, HV,
                          sab, sas, sbb, sbs, BR: tl.constexpr, BH: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    h = tl.arange(0, BH)
    mask = (r < R)[:, None] & (h < HV)[None, :]
    ra = (r // S).to(tl.int64) * sab + (r % S).to(tl.int64) * sas
    rb = (r // S).to(tl.int64) * sbb + (r % S).to(tl.int64) * sbs
    a = tl.load(a_ptr + ra[:, None] + h[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rb[:, None] + h[None, :], mask=mask, other=0.0).to(tl.float32)
    A = tl.exp(tl.load(alog_ptr + h, mask=h < HV, other=0.0).to(tl.float32))
    dt = tl.load(dt_ptr + h, mask=h < HV, other=0.0).to(tl.float32)
    g = -A[None, :] * _softplus(a + dt[None, :])
    out = r.to(tl.int64)[:, None] * HV + h[None, :]
    tl.store(g_ptr + out, g, mask=mask)
    tl.store(beta_ptr + out, tl.sigmoid(b).to(beta_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_head_bwd_kernel(a_ptr, b_ptr, alog_ptr, dt_ptr, dg_ptr, dbeta_ptr, da_ptr, db_ptr,
                          dalog_ptr, ddt_ptr, R, S, HV, n_iters, sab, sas, sbb, sbs,
                          BR: tl.constexpr, BH: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.arange(0, BH)
    hmask = h < HV
    A = tl.exp(tl.load(alog_ptr + h, mask=hmask, other=0.0).to(tl.float32))
    dt = tl.load(dt_ptr + h, mask=hmask, other=0.0).to(tl.float32)
    dalog = tl.zeros([BH], dtype=tl.float32)
    ddt = tl.zeros([BH], dtype=tl.float32)
    for it in range(n_iters):
        r = (pid * n_iters + it) * BR + tl.arange(0, BR)
        mask = (r < R)[:, None] & hmask[None, :]
        ra = (r // S).to(tl.int64) * sab + (r % S).to(tl.int64) * sas
        x = tl.load(a_ptr + ra[:, None] + h[None, :], mask=mask, other=0.0).to(tl.float32) + dt[None, :]
        out = r.to(tl.int64)[:, None] * HV + h[None, :]
        dg = tl.load(dg_ptr + out, mask=mask, other=0.0).to(tl.float32)
        sp = _softplus(x)
        dalog += tl.sum(-A[None, :] * sp * dg, axis=0)  # d g / d A_log = g
        dx = dg * -A[None, :] * tl.where(x > 20.0, 1.0, tl.sigmoid(x))
        ddt += tl.sum(dx, axis=0)
        tl.store(da_ptr + out, dx.to(da_ptr.dtype.element_ty), mask=mask)
        rb = (r // S).to(tl.int64) * sbb + (r % S).to(tl.int64) * sbs
        beta = tl.sigmoid(tl.load(b_ptr + rb[:, None] + h[None, :], mask=mask, other=0.0).to(tl.float32))
        dbeta = tl.load(dbeta_ptr + out, mask=mask, other=0.0).to(tl.float32)
        tl.store(db_ptr + out, (dbeta * beta * (1.0 - beta)).to(db_ptr.dtype.element_ty), mask=mask)
    tl.store(dalog_ptr + pid * HV + h, dalog, mask=hmask)
    tl.store(ddt_ptr + pid * HV + h, ddt, mask=hmask)


class _GateHeadFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, A_log, dt_bias):
        B, S, HV = a.shape
        R = B * S
        g = torch.empty(B, S, HV, device=a.device, dtype=torch.float32)
        beta = torch.empty(B, S, HV, device=a.device, dtype=b.dtype)
        _gate_head_fwd_kernel[(triton.cdiv(R, BLOCK_R),)](
            a, b, A_log, dt_bias, g, beta, R, S, HV, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            BR=BLOCK_R, BH=triton.next_power_of_2(HV))
        ctx.save_for_backward(a, b, A_log, dt_bias)  # beta recomputed from b in fp32
        return g, beta

    @staticmethod
    def backward(ctx, dg, dbeta):
        a, b, A_log, dt_bias = ctx.saved_tensors
        B, S, HV = a.shape
        R = B * S
        dg = a.new_zeros(B, S, HV, dtype=torch.float32) if dg is None else dg.contiguous()
        dbeta = b.new_zeros(B, S, HV) if dbeta is None else dbeta.contiguous()
        n_blocks = triton.cdiv(R, BLOCK_R)
        n_iters = max(1, min(64, n_blocks // 1024))
        grid = (triton.cdiv(n_blocks, n_iters),)
        da = torch.empty(B, S, HV, device=a.device, dtype=a.dtype)
        db = torch.empty(B, S, HV, device=a.device, dtype=b.dtype)
        dalog = torch.empty(grid[0], HV, device=a.device, dtype=torch.float32)
        ddt = torch.empty(grid[0], HV, device=a.device, dtype=torch.float32)
        _gate_head_bwd_kernel[grid](a, b, A_log, dt_bias, dg, dbeta, da, db, dalog, ddt, R, S, HV, n_iters,
                                    a.stride(0), a.stride(1), b.stride(0), b.stride(1), BR=BLOCK_R, BH=triton.next_power_of_2(HV))
        return da, db, dalog.sum(0).to(A_log.dtype), ddt.sum(0).to(dt_bias.dtype)


def gate_head(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor):
    """(g, beta) = (-exp(A_log) * softplus(a + dt_bias) in fp32, sigmoid(b) in b's dtype).

    Args:
        a, b: [B, S, HV] (any batch and token strides, unit stride on HV), fp32/bf16/fp16.
        A_log, dt_bias: [HV].
    Differentiable in all four. Example: g, beta = gate_head(alpha, beta_raw, layer.A_log, layer.dt_bias).
    """
    if a.dim() != 3 or b.shape != a.shape:
        raise ValueError(f"a and b must both be [B, S, HV], got {tuple(a.shape)} and {tuple(b.shape)}")
    HV = a.shape[-1]
    if A_log.shape != (HV,) or dt_bias.shape != (HV,):
        raise ValueError(f"A_log and dt_bias must be [HV={HV}], got {tuple(A_log.shape)} and {tuple(dt_bias.shape)}")
    if a.stride(-1) != 1 or b.stride(-1) != 1:
        raise ValueError(f"a and b need unit stride on HV, got strides {a.stride()} and {b.stride()}")
    return _GateHeadFn.apply(a, b, A_log, dt_bias)
