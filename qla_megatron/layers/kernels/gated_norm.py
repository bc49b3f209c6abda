"""Gated RMSNorm in Triton: y = x * rsqrt(mean(x^2) + eps) * weight * SiLU(gate) over each row of V.

Rows are (b, s, h) of x and gate [B, S, HV, V] read in place (any strides, unit stride on V: the
layer's z is a split view of in_proj's output); y is written straight into the caller's layout
(the layer passes out_proj's [S, B, HV * V]), so neither an fp32 copy nor a transpose of the whole
activation is made. fp32 math in registers; only rstd (fp32, one per row) is saved. dweight is summed
per program into an fp32 [programs, V] buffer that torch reduces (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R = 16


@triton.jit
def _row_offsets(r, S, HV, s_b, s_s, s_h):
    h = r % HV
    bs = r // HV
    return (bs // S).to(tl.int64) * s_b + (bs % S).to(tl.int64) * s_s + h.to(tl.int64) * s_h


@triton.jit
def _gated_norm_fwd_kernel(x_ptr, g_ptr, w_ptr, y_ptr, rstd_ptr, R, S, HV, V, eps,
                           sxb, sxs, sxh, sgb, sgs, sgh, syb, sys, syh,
                           BR: tl.constexpr, BV: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    v = tl.arange(0, BV)
    rmask, vmask = r < R, v < V
    mask = rmask[:, None] & vmask[None, :]
    x = tl.load(x_ptr + _row_offsets(r, S, HV, sxb, sxs, sxh)[:, None] + v[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    gate = tl.load(g_ptr + _row_offsets(r, S, HV, sgb, sgs, sgh)[:, None] + v[None, :], mask=mask, other=0.0)
    gate = gate.to(tl.float32)
    w = tl.load(w_ptr + v, mask=vmask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / V + eps)
    y = x * rstd[:, None] * w[None, :] * (gate * tl.sigmoid(gate))
    tl.store(y_ptr + _row_offsets(r, S, HV, syb, sys, syh)[:, None] + v[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask)
    tl.store(rstd_ptr + r, rstd, mask=rmask)


@triton.jit
def _gated_norm_bwd_kernel(x_ptr, g_ptr, w_ptr, rstd_ptr, dy_ptr, dx_ptr, dg_ptr, dw_ptr, R, S, HV, V, n_iters,
                           sxb, sxs, sxh, sgb, sgs, sgh, sdyb, sdys, sdyh,
                           BR: tl.constexpr, BV: tl.constexpr):
    """Program p walks n_iters blocks of rows; dx, dgate contiguous [R, V]; dweight partials [programs, V]."""
    pid = tl.program_id(0)
    v = tl.arange(0, BV)
    vmask = v < V
    w = tl.load(w_ptr + v, mask=vmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BV], dtype=tl.float32)
    for it in range(n_iters):
        r = (pid * n_iters + it) * BR + tl.arange(0, BR)
        rmask = r < R
        mask = rmask[:, None] & vmask[None, :]
        x = tl.load(x_ptr + _row_offsets(r, S, HV, sxb, sxs, sxh)[:, None] + v[None, :], mask=mask, other=0.0)
        gate = tl.load(g_ptr + _row_offsets(r, S, HV, sgb, sgs, sgh)[:, None] + v[None, :], mask=mask, other=0.0)
        dy = tl.load(dy_ptr + _row_offsets(r, S, HV, sdyb, sdys, sdyh)[:, None] + v[None, :], mask=mask, other=0.0)
        x, gate, dy = x.to(tl.float32), gate.to(tl.float32), dy.to(tl.float32)
        rstd = tl.load(rstd_ptr + r, mask=rmask, other=0.0)
        xhat = x * rstd[:, None]
        sig = tl.sigmoid(gate)
        sg = gate * sig
        dgate = dy * xhat * w[None, :] * sig * (1.0 + gate * (1.0 - sig))
        dw += tl.sum(dy * xhat * sg, axis=0)
        u = dy * w[None, :] * sg  # d loss / d xhat
        dx = rstd[:, None] * (u - xhat * (tl.sum(u * xhat, axis=1) / V)[:, None])
        out = r.to(tl.int64)[:, None] * V + v[None, :]
        tl.store(dx_ptr + out, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dg_ptr + out, dgate.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid * V + v, dw, mask=vmask)


def _strides3(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _alloc(x, out_layout):
    """(output, its [B, S, HV, V] view) in the requested layout."""
    B, S, HV, V = x.shape
    if out_layout == "bshv":
        out = torch.empty(B, S, HV, V, device=x.device, dtype=x.dtype)
        return out, out
    out = torch.empty(S, B, HV * V, device=x.device, dtype=x.dtype)
    return out, out.view(S, B, HV, V).transpose(0, 1)


class _GatedRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, weight, eps, out_layout):
        B, S, HV, V = x.shape
        R = B * S * HV
        out, view = _alloc(x, out_layout)
        rstd = torch.empty(B, S, HV, device=x.device, dtype=torch.float32)
        BV = triton.next_power_of_2(V)
        _gated_norm_fwd_kernel[(triton.cdiv(R, BLOCK_R),)](
            x, gate, weight, out, rstd, R, S, HV, V, eps, *_strides3(x), *_strides3(gate), *_strides3(view),
            BR=BLOCK_R, BV=BV)
        ctx.save_for_backward(x, gate, weight, rstd)
        ctx.out_layout = out_layout
        return out

    @staticmethod
    def backward(ctx, dy):
        x, gate, weight, rstd = ctx.saved_tensors
        B, S, HV, V = x.shape
        R = B * S * HV
        dy = dy.contiguous()
        if ctx.out_layout == "sbd":
            dy = dy.view(S, B, HV, V).transpose(0, 1)
        n_blocks = triton.cdiv(R, BLOCK_R)
        n_iters = max(1, min(64, n_blocks // 1024))  # >= 1024 programs; dweight partials stay small
        grid = (triton.cdiv(n_blocks, n_iters),)
        dx = torch.empty(B, S, HV, V, device=x.device, dtype=x.dtype)
        dgate = torch.empty(B, S, HV, V, device=x.device, dtype=gate.dtype)
        dw = torch.empty(grid[0], V, device=x.device, dtype=torch.float32)
        _gated_norm_bwd_kernel[grid](x, gate, weight, rstd, dy, dx, dgate, dw, R, S, HV, V, n_iters,
                                     *_strides3(x), *_strides3(gate), *_strides3(dy),
                                     BR=BLOCK_R, BV=triton.next_power_of_2(V))
        return dx, dgate, dw.sum(0).to(weight.dtype), None, None


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float,
                   out_layout: str = "bshv") -> torch.Tensor:
    """y = rmsnorm(x) * weight * SiLU(gate) over the last dim; differentiable in x, gate and weight.

    Args:
        x, gate: [B, S, HV, V] (any strides, unit stride on V), fp32/bf16/fp16.
        weight: [V]. eps: added to mean(x^2).
        out_layout: "bshv" returns [B, S, HV, V] contiguous; "sbd" returns [S, B, HV * V] contiguous
            (out_proj's input layout in the layer: the transpose is the kernel's store pattern).

    Returns:
        y in x's dtype. Example: gated_rms_norm(o, z, norm.weight, 1e-5, out_layout="sbd").
    """
    if x.dim() != 4 or gate.shape != x.shape:
        raise ValueError(f"x and gate must both be [B, S, HV, V], got {tuple(x.shape)} and {tuple(gate.shape)}")
    B, S, HV, V = x.shape
    if weight.shape != (V,):
        raise ValueError(f"weight must be [V={V}], got shape {tuple(weight.shape)}")
    if x.stride(-1) != 1 or gate.stride(-1) != 1:
        raise ValueError(f"x and gate need unit stride on V, got strides {x.stride()} and {gate.stride()}")
    if V > 8192:
        raise ValueError(f"the fused gated norm holds a row in registers: V must be <= 8192, got V={V}")
    if out_layout not in ("bshv", "sbd"):
        raise ValueError(f"out_layout must be 'bshv' or 'sbd', got {out_layout!r}")
    return _GatedRMSNormFn.apply(x, gate, weight, float(eps), out_layout)
