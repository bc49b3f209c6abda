"""Short causal depthwise conv (+ SiLU) in Triton, token-major, packed sequences and a prepended halo.

    y[b, t, d] = act(bias[d] + sum_j weight[d, 0, W-1-j] * x[b, t-j, d])

where x[b, t-j] before t's sequence start is the sequence's initial state (the halo: the W - 1 tokens
before it, e.g. from the previous CP rank) or zero. x is read in place ([B, T, D] with any batch and
token strides, unit channel stride: the in_proj split view of the layer), y and dx are written
contiguous [B, T, D]. Sequence boundaries come from cu_seqlens on the device (a binary search per
token inside the kernel): nothing is read on the host. fp32 math in registers.

The backward recomputes the pre-activation at the W positions each token feeds, so nothing but the
inputs is saved. dweight / dbias are summed per program in registers into an fp32 [programs, W, D]
buffer and reduced by torch (deterministic, no atomics); dinitial_state has its own small kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T, BLOCK_D = 32, 128


@triton.jit
def _seq_bounds(cu_ptr, t, T, N, LOG_N: tl.constexpr, VARLEN: tl.constexpr):
    """(sequence index, start, end) of every token position t (a vector)."""
    if VARLEN:
        lo = tl.zeros_like(t)
        hi = tl.zeros_like(t) + N  # invariant: cu[lo] <= t < cu[hi]
        for _ in tl.static_range(LOG_N):
            mid = (lo + hi) // 2
            go_right = tl.load(cu_ptr + mid).to(tl.int32) <= t
            lo = tl.where(go_right, mid, lo)
            hi = tl.where(go_right, hi, mid)
        start = tl.load(cu_ptr + lo).to(tl.int32)
        end = tl.load(cu_ptr + lo + 1).to(tl.int32)
        return lo, start, end
    zero = tl.zeros_like(t)
    return zero, zero, zero + T


@triton.jit
def _x_at(x_ptr, h_ptr, p, seq, start, d, mask, sxt, shn, sht, W: tl.constexpr, HAS_H: tl.constexpr):
    """x at token positions p (any p >= start - (W - 1)) for channels d: the token itself inside its
    sequence, the halo row before it, else 0. Returned in fp32, shape [BT, BD]."""
    inside = p >= start
    v = tl.load(x_ptr + p.to(tl.int64)[:, None] * sxt + d[None, :], mask=mask & inside[:, None], other=0.0).to(tl.float32)
    if HAS_H:
        row = W - 1 - (start - p)  # halo row of position p < start
        hv = tl.load(h_ptr + seq.to(tl.int64)[:, None] * shn + row[:, None] * sht + d[None, :],
                     mask=mask & (~inside)[:, None], other=0.0).to(tl.float32)
        v += hv
    return v


@triton.jit
def _pre_at(x_ptr, h_ptr, w_ptr, b_ptr, p, seq, start, d, mask, dmask, sxt, shn, sht,
            W: tl.constexpr, HAS_H: tl.constexpr, HAS_B: tl.constexpr):
    """The pre-activation at token positions p (fp32 [BT, BD])."""
    acc = tl.zeros(mask.shape, dtype=tl.float32)
    if HAS_B:
        acc += tl.load(b_ptr + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(W):
        wj = tl.load(w_ptr + d * W + (W - 1 - j), mask=dmask, other=0.0).to(tl.float32)
        acc += wj[None, :] * _x_at(x_ptr, h_ptr, p - j, seq, start, d, mask, sxt, shn, sht, W, HAS_H)
    return acc


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, h_ptr, cu_ptr, y_ptr, T, D, N,
                     sxb, sxt, shb, shn, sht, syb, syt,
                     W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, LOG_N: tl.constexpr,
                     VARLEN: tl.constexpr, HAS_H: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr):
    pid_t, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BT + tl.arange(0, BT)
    d = pid_d * BD + tl.arange(0, BD)
    tmask, dmask = t < T, d < D
    mask = tmask[:, None] & dmask[None, :]
    seq, start, _ = _seq_bounds(cu_ptr, t, T, N, LOG_N, VARLEN)
    x_b = x_ptr + b.to(tl.int64) * sxb
    h_b = h_ptr + b.to(tl.int64) * shb
    pre = _pre_at(x_b, h_b, w_ptr, b_ptr, t, seq, start, d, mask, dmask, sxt, shn, sht, W, HAS_H, HAS_B)
    y = pre * tl.sigmoid(pre) if SILU else pre
    tl.store(y_ptr + b.to(tl.int64) * syb + t.to(tl.int64)[:, None] * syt + d[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dpre_at(x_ptr, h_ptr, w_ptr, b_ptr, dy_ptr, p, seq, start, end, d, dmask, sxt, shn, sht, sdyt,
             W: tl.constexpr, HAS_H: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr):
    """d loss / d pre-activation at positions p, zero where p is outside [start, end)."""
    mask = ((p >= start) & (p < end))[:, None] & dmask[None, :]
    dy = tl.load(dy_ptr + p.to(tl.int64)[:, None] * sdyt + d[None, :], mask=mask, other=0.0).to(tl.float32)
    if SILU:
        pre = _pre_at(x_ptr, h_ptr, w_ptr, b_ptr, p, seq, start, d, mask, dmask, sxt, shn, sht, W, HAS_H, HAS_B)
        s = tl.sigmoid(pre)
        dy = dy * s * (1.0 + pre * (1.0 - s))
    return dy


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, h_ptr, cu_ptr, dy_ptr, dx_ptr, dw_ptr, T, D, N, n_iters,
                     sxb, sxt, shb, shn, sht, sdyb, sdyt, sdxb, sdxt,
                     W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, LOG_N: tl.constexpr,
                     VARLEN: tl.constexpr, HAS_H: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr):
    """Program (pid_t, pid_d, b) walks n_iters token blocks; dw partials [programs, W + 1, D] (row W: dbias)."""
    pid_t, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d = pid_d * BD + tl.arange(0, BD)
    dmask = d < D
    x_b = x_ptr + b.to(tl.int64) * sxb
    h_b = h_ptr + b.to(tl.int64) * shb
    dy_b = dy_ptr + b.to(tl.int64) * sdyb
    dbias = tl.zeros([BD], dtype=tl.float32)
    dw0 = tl.zeros([BD], dtype=tl.float32)
    dw1 = tl.zeros([BD], dtype=tl.float32)
    dw2 = tl.zeros([BD], dtype=tl.float32)
    dw3 = tl.zeros([BD], dtype=tl.float32)  # W <= 4 (checked by the launcher)
    for it in range(n_iters):
        t = (pid_t * n_iters + it) * BT + tl.arange(0, BT)
        tmask = t < T
        mask = tmask[:, None] & dmask[None, :]
        seq, start, end = _seq_bounds(cu_ptr, t, T, N, LOG_N, VARLEN)
        end = tl.where(tmask, end, start)  # tokens past T feed nothing
        dx = tl.zeros([BT, BD], dtype=tl.float32)
        for s in tl.static_range(W):
            dp = _dpre_at(x_b, h_b, w_ptr, b_ptr, dy_b, t + s, seq, start, end, d, dmask, sxt, shn, sht, sdyt,
                          W, HAS_H, HAS_B, SILU)
            ws = tl.load(w_ptr + d * W + (W - 1 - s), mask=dmask, other=0.0).to(tl.float32)
            dx += ws[None, :] * dp
            if s == 0:  # dweight[W-1-j] += dpre(t) * x(t-j)
                dbias += tl.sum(dp, axis=0)
                for j in tl.static_range(W):
                    xj = _x_at(x_b, h_b, t - j, seq, start, d, mask, sxt, shn, sht, W, HAS_H)
                    part = tl.sum(dp * xj, axis=0)
                    if W - 1 - j == 0:
                        dw0 += part
                    elif W - 1 - j == 1:
                        dw1 += part
                    elif W - 1 - j == 2:
                        dw2 += part
                    else:
                        dw3 += part
        tl.store(dx_ptr + b.to(tl.int64) * sdxb + t.to(tl.int64)[:, None] * sdxt + d[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=mask)
    prog = (b * tl.num_programs(0) + pid_t).to(tl.int64)
    out = dw_ptr + prog * (W + 1) * D + d
    tl.store(out, dw0, mask=dmask)
    if W > 1:
        tl.store(out + D, dw1, mask=dmask)
    if W > 2:
        tl.store(out + 2 * D, dw2, mask=dmask)
    if W > 3:
        tl.store(out + 3 * D, dw3, mask=dmask)
    tl.store(out + W * D, dbias, mask=dmask)


@triton.jit
def _conv_bwd_halo_kernel(x_ptr, w_ptr, b_ptr, h_ptr, cu_ptr, dy_ptr, dh_ptr, T, D,
                          sxb, sxt, shb, shn, sht, sdyb, sdyt, sdhb, sdhn, sdht,
                          W: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, VARLEN: tl.constexpr,
                          HAS_B: tl.constexpr, SILU: tl.constexpr):
    """dhalo[b, n, W-1-m] = sum_{i < W-m} weight[W-1-(i+m)] * dpre(start_n + i), m = 1 .. W-1."""
    n, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d = pid_d * BD + tl.arange(0, BD)
    dmask = d < D
    i = tl.arange(0, BH)  # the first BH >= W - 1 tokens of the sequence
    if VARLEN:
        start = tl.load(cu_ptr + n).to(tl.int32)
        end = tl.load(cu_ptr + n + 1).to(tl.int32)
    else:
        start, end = 0, T
    seq = tl.zeros([BH], dtype=tl.int32) + n
    starts = tl.zeros([BH], dtype=tl.int32) + start
    ends = tl.where(i < W - 1, tl.zeros([BH], dtype=tl.int32) + end, starts)
    x_b = x_ptr + b.to(tl.int64) * sxb
    h_b = h_ptr + b.to(tl.int64) * shb
    dp = _dpre_at(x_b, h_b, w_ptr, b_ptr, dy_ptr + b.to(tl.int64) * sdyb, starts + i, seq, starts, ends, d, dmask,
                  sxt, shn, sht, sdyt, W, True, HAS_B, SILU)  # [BH, BD], zero past W - 2 or the end
    for m in tl.static_range(1, W):
        # weight index W-1-(i+m) for i in [0, W-m)
        k = W - 1 - (i + m)
        wk = tl.load(w_ptr + d[None, :] * W + k[:, None], mask=(k >= 0)[:, None] & dmask[None, :], other=0.0)
        dh = tl.sum(wk.to(tl.float32) * dp, axis=0)
        tl.store(dh_ptr + b.to(tl.int64) * sdhb + n * sdhn + (W - 1 - m) * sdht + d,
                 dh.to(dh_ptr.dtype.element_ty), mask=dmask)


def _check(x, weight, bias, cu_seqlens, initial_state):
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, D], got shape {tuple(x.shape)}")
    B, T, D = x.shape
    if x.stride(-1) != 1:
        raise ValueError(f"x needs unit stride on its channel dim, got strides {x.stride()}")
    if weight.dim() != 3 or weight.shape[0] != D or weight.shape[1] != 1:
        raise ValueError(f"weight must be [D={D}, 1, W], got shape {tuple(weight.shape)}")
    W = weight.shape[-1]
    if not 1 <= W <= 4:
        raise ValueError(f"weight's kernel size W must be 1..4 for the Triton conv, got W={W}")
    if bias is not None and bias.shape != (D,):
        raise ValueError(f"bias must be [D={D}], got shape {tuple(bias.shape)}")
    if cu_seqlens is not None and (cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2
                                   or cu_seqlens.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor of >= 2 offsets, got "
                         f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    N = 1 if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (B, N, W - 1, D):
        raise ValueError(f"initial_state must be [B={B}, N={N}, W-1={W - 1}, D={D}], got shape "
                         f"{tuple(initial_state.shape)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("cu_seqlens", cu_seqlens),
                    ("initial_state", initial_state)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    return B, T, D, W, N


class _CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, cu_seqlens, silu):
        B, T, D, W, N = _check(x, weight, bias, cu_seqlens, initial_state)
        y = torch.empty(B, T, D, device=x.device, dtype=x.dtype)
        w = weight.reshape(D, W)
        h = initial_state if initial_state is not None else x  # a dummy pointer when absent
        if h.dim() == 3:
            hs = (0, 0, 0)
        else:
            if h.stride(-1) != 1:
                h = h.contiguous()
            hs = (h.stride(0), h.stride(1), h.stride(2))
        cu = cu_seqlens if cu_seqlens is not None else x
        log_n = max(1, (N).bit_length())
        grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(D, BLOCK_D), B)
        _conv_fwd_kernel[grid](x, w, bias if bias is not None else w, h, cu, y, T, D, N,
                               x.stride(0), x.stride(1), *hs, y.stride(0), y.stride(1),
                               W=W, BT=BLOCK_T, BD=BLOCK_D, LOG_N=log_n, VARLEN=cu_seqlens is not None,
                               HAS_H=initial_state is not None, HAS_B=bias is not None, SILU=silu)
        ctx.save_for_backward(x, weight, bias, h if initial_state is not None else None, cu_seqlens)
        ctx.silu, ctx.N = silu, N
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, h, cu_seqlens = ctx.saved_tensors
        B, T, D = x.shape
        W, N = weight.shape[-1], ctx.N
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        w = weight.reshape(D, W)
        hs = (h.stride(0), h.stride(1), h.stride(2)) if h is not None else (0, 0, 0)
        hp = h if h is not None else x
        cu = cu_seqlens if cu_seqlens is not None else x
        varlen, has_b = cu_seqlens is not None, bias is not None
        n_tb = triton.cdiv(T, BLOCK_T)
        n_iters = max(1, min(16, n_tb // 64))  # >= 64 token programs per channel block, dw partials short
        grid = (triton.cdiv(n_tb, n_iters), triton.cdiv(D, BLOCK_D), B)
        dx = torch.empty(B, T, D, device=x.device, dtype=x.dtype)
        dwb = torch.empty(B * grid[0], W + 1, D, device=x.device, dtype=torch.float32)
        _conv_bwd_kernel[grid](x, w, bias if has_b else w, hp, cu, dy, dx, dwb, T, D, N, n_iters,
                               x.stride(0), x.stride(1), *hs, dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1),
                               W=W, BT=BLOCK_T, BD=BLOCK_D, LOG_N=max(1, N.bit_length()), VARLEN=varlen,
                               HAS_H=h is not None, HAS_B=has_b, SILU=ctx.silu)
        dwb = dwb.sum(0)
        dweight = dwb[:W].t().reshape(D, 1, W).to(weight.dtype)
        dbias = dwb[W].to(bias.dtype) if has_b else None
        dh = None
        if h is not None:
            dh = torch.empty(B, N, W - 1, D, device=x.device, dtype=h.dtype)
            if W > 1:
                _conv_bwd_halo_kernel[(N, triton.cdiv(D, BLOCK_D), B)](
                    x, w, bias if has_b else w, h, cu, dy, dh, T, D,
                    x.stride(0), x.stride(1), *hs, dy.stride(0), dy.stride(1), dh.stride(0), dh.stride(1),
                    dh.stride(2), W=W, BH=4, BD=BLOCK_D, VARLEN=varlen, HAS_B=has_b, SILU=ctx.silu)
        return dx, dweight, dbias, dh, None, None


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       cu_seqlens: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                       silu: bool = True) -> torch.Tensor:
    """Fused causal depthwise conv (+ SiLU), differentiable in x, weight, bias and initial_state.

    Args:
        x: [B, T, D] on a CUDA device (or any device under TRITON_INTERPRET=1), fp32/bf16/fp16, unit
            stride on D (batch and token strides free: a split view of in_proj's output is read in place).
        weight: [D, 1, W] (nn.Conv1d(groups=D) weight), W <= 4; bias: [D] or None.
        cu_seqlens: int32/int64 [N + 1] offsets of sequences packed along T, shared by every batch
            row, on x's device; the conv restarts at every offset. None: one sequence per row (N = 1).
        initial_state: [B, N, W - 1, D], the W - 1 tokens before each sequence (the CP halo), or None
            (zeros).
        silu: apply SiLU to the conv output.

    Returns:
        y [B, T, D] contiguous, x's dtype. Example: causal_conv1d_silu(x, conv.weight, conv.bias).
    """
    return _CausalConv1dFn.apply(x, weight, bias, initial_state, cu_seqlens, silu)
