"""Short causal depthwise conv (+ SiLU) in Triton, token-major, packed sequences and a prepended halo.

    y[b, t, d] = act(bias[d] + sum_j weight[d, 0, W-1-j] * x[b, t-j, d])

where x[b, t-j] before t's sequence start is the sequence's initial state (the halo: the W - 1 tokens
before it, e.g. from the previous CP rank) or zero. x is read in place ([B, T, D] with any batch and
token strides, unit channel stride: the in_proj split view of the layer), y and dx are written
contiguous [B, T, D]. Sequence boundaries come from cu_seqlens on the device (a binary search per
token inside the kernel): nothing is read on the host. fp32 math in registers.

The backward saves nothing but the inputs. A program owns BD channels and walks consecutive tiles of
BT tokens; a tile is handled as rows (each token a [BD] vector, a few channels per thread) so that
every token shift is a static index into the tile's rows, not another load. Per tile it loads the x
rows t0-W+1 .. t0+BT+W-2 and the dy rows t0 .. t0+BT+W-2 once, recomputes the pre-activation and
dpre (dy * silu'(pre) with SiLU) of each row once from those registers (BT + W - 1 rows: dx of the
tile's last tokens needs dpre up to W - 1 tokens past it), and forms dx(t) = sum_s weight[W-1-s]
dpre(t+s) over t+s inside t's sequence. Each row's (sequence, start, end) comes from a scalar search
of cu_seqlens (before a sequence's start a row reads the halo row or 0; dpre past its end feeds
nothing). dweight / dbias accumulate elementwise in [BD] fp32 registers over every token the program
walks (no reduction across threads at all) and go out once per program as partials [programs, W + 1,
D] that torch sums (deterministic, no atomics); dinitial_state has its own small kernel. The loads
come first in each tile so they are all in flight together: it is a streaming kernel whose floor is
reading x and dy and writing dx. Tiles are the module constants FWD_TILE / BWD_TILE ((BT, BD,
num_warps)); FWD_TILES / BWD_TILES are candidates for a sweep (benchmarks/bench_layer_kernels.py
--conv-tiles).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tiles: (BT tokens, BD channels, num_warps); module constants so a benchmark can override them.
FWD_TILE = (32, 128, 4)
BWD_TILE = (8, 256, 4)
BWD_TOKENS = 512  # tokens one backward program walks (its dweight partial covers them), at most ...
BWD_MIN_PROGRAMS = 64  # ... while >= this many token programs per channel block remain
HALO_BD = 128
# candidates for a sweep (benchmarks/bench_layer_kernels.py --conv-tiles), the defaults first
FWD_TILES = [(32, 128, 4), (16, 128, 4), (32, 256, 8)]
BWD_TILES = [(8, 256, 4), (16, 256, 4), (8, 128, 2), (16, 512, 8), (4, 256, 4), (8, 512, 4)]


@triton.jit
def _seq_bounds(cu_ptr, t, T, N, LOG_N: tl.constexpr, VARLEN: tl.constexpr):
    """(sequence index, start, end) of token position t (a vector or a scalar)."""
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
    """Program (pid_t, pid_d, b) walks n_iters tiles of BT tokens x BD channels; dw partials
    [programs, W + 1, D] (row W: dbias). Every token row is a [BD] vector; the shifts are static
    indices into the tile's rows, so each x / dy row is loaded once per tile."""
    pid_t, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d = pid_d * BD + tl.arange(0, BD)
    dmask = d < D
    x_b = x_ptr + b.to(tl.int64) * sxb
    h_b = h_ptr + b.to(tl.int64) * shb
    dy_b = dy_ptr + b.to(tl.int64) * sdyb
    dx_b = dx_ptr + b.to(tl.int64) * sdxb
    ws = ()  # ws[j]: the weight of x(t - j)
    for j in tl.static_range(W):
        ws = ws + (tl.load(w_ptr + d * W + (W - 1 - j), mask=dmask, other=0.0).to(tl.float32),)
    if HAS_B:
        bias = tl.load(b_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BD], dtype=tl.float32)
    accs = ()  # accs[j] += dpre(t) * x(t - j) (dweight[W-1-j]); accs[W] += dpre(t) (dbias)
    for j in tl.static_range(W + 1):
        accs = accs + (tl.zeros([BD], dtype=tl.float32),)
    R: tl.constexpr = BT + W - 1  # rows whose dpre the tile needs: its BT tokens and W - 1 after
    for it in range(n_iters):
        t0 = (pid_t * n_iters + it) * BT
        # every load first (x rows t0-W+1 .. t0+R-1, dy rows t0 .. t0+R-1), masked by [0, T) only
        xr = ()
        for r in tl.static_range(-(W - 1), R):
            p = t0 + r
            xr = xr + (tl.load(x_b + p.to(tl.int64) * sxt + d, mask=dmask & (p >= 0) & (p < T), other=0.0),)
        dyr = ()
        for r in tl.static_range(R):
            p = t0 + r
            dyr = dyr + (tl.load(dy_b + p.to(tl.int64) * sdyt + d, mask=dmask & (p < T), other=0.0),)
        dps = ()
        ends = ()
        for r in tl.static_range(R):
            t = t0 + r
            seq, start, end = _seq_bounds(cu_ptr, t, T, N, LOG_N, VARLEN)
            xt = ()  # x(t - j) as seen from t's sequence: the halo row or 0 before its start
            for j in tl.static_range(W):
                v = xr[r - j + W - 1].to(tl.float32)
                if j > 0 and (VARLEN or HAS_H):
                    before = t - j < start
                    if HAS_H:
                        hv = tl.load(h_b + seq.to(tl.int64) * shn + (W - 1 - start + t - j) * sht + d,
                                     mask=dmask & before, other=0.0).to(tl.float32)
                        v = tl.where(before, hv, v)
                    else:
                        v = tl.where(before, 0.0, v)
                xt = xt + (v,)
            dp = dyr[r].to(tl.float32)
            if SILU:
                pre = bias + ws[0] * xt[0]
                for j in tl.static_range(1, W):
                    pre += ws[j] * xt[j]
                sig = tl.sigmoid(pre)
                dp = dp * sig * (1.0 + pre * (1.0 - sig))
            dps = dps + (dp,)
            ends = ends + (end,)
            if r < BT:
                new = ()
                for j in tl.static_range(W):
                    new = new + (accs[j] + dp * xt[j],)
                accs = new + (accs[W] + dp,)
            if r >= W - 1:  # dx(q), q = r-W+1: sum_s w[W-1-s] dpre(q + s) over q + s in q's sequence
                dx = ws[0] * dps[r - W + 1]
                for s in tl.static_range(1, W):
                    if VARLEN:
                        dx += ws[s] * tl.where(t - W + 1 + s < ends[r - W + 1], dps[r - W + 1 + s], 0.0)
                    else:
                        dx += ws[s] * dps[r - W + 1 + s]  # rows past T have dpre 0
                tl.store(dx_b + (t - W + 1).to(tl.int64) * sdxt + d, dx.to(dx_ptr.dtype.element_ty),
                         mask=dmask & (t - W + 1 < T))
    prog = (b * tl.num_programs(0) + pid_t).to(tl.int64)
    out = dw_ptr + prog * (W + 1) * D + d
    for j in tl.static_range(W):
        tl.store(out + (W - 1 - j) * D, accs[j], mask=dmask)
    tl.store(out + W * D, accs[W], mask=dmask)


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
        BT, BD, nw = FWD_TILE
        grid = (triton.cdiv(T, BT), triton.cdiv(D, BD), B)
        _conv_fwd_kernel[grid](x, w, bias if bias is not None else w, h, cu, y, T, D, N,
                               x.stride(0), x.stride(1), *hs, y.stride(0), y.stride(1),
                               W=W, BT=BT, BD=BD, LOG_N=log_n, VARLEN=cu_seqlens is not None,
                               HAS_H=initial_state is not None, HAS_B=bias is not None, SILU=silu, num_warps=nw)
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
        BT, BD, nw = BWD_TILE
        n_tb = triton.cdiv(T, BT)
        n_iters = max(1, min(BWD_TOKENS // BT, n_tb // BWD_MIN_PROGRAMS))
        grid = (triton.cdiv(n_tb, n_iters), triton.cdiv(D, BD), B)
        dx = torch.empty(B, T, D, device=x.device, dtype=x.dtype)
        dwb = torch.empty(B * grid[0], W + 1, D, device=x.device, dtype=torch.float32)
        _conv_bwd_kernel[grid](x, w, bias if has_b else w, hp, cu, dy, dx, dwb, T, D, N, n_iters,
                               x.stride(0), x.stride(1), *hs, dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1),
                               W=W, BT=BT, BD=BD, LOG_N=max(1, N.bit_length()), VARLEN=varlen,
                               HAS_H=h is not None, HAS_B=has_b, SILU=ctx.silu, num_warps=nw)
        dwb = dwb.sum(0)
        dweight = dwb[:W].t().reshape(D, 1, W).to(weight.dtype)
        dbias = dwb[W].to(bias.dtype) if has_b else None
        dh = None
        if h is not None:
            dh = torch.empty(B, N, W - 1, D, device=x.device, dtype=h.dtype)
            if W > 1:
                _conv_bwd_halo_kernel[(N, triton.cdiv(D, HALO_BD), B)](
                    x, w, bias if has_b else w, h, cu, dy, dh, T, D,
                    x.stride(0), x.stride(1), *hs, dy.stride(0), dy.stride(1), dh.stride(0), dh.stride(1),
                    dh.stride(2), W=W, BH=4, BD=HALO_BD, VARLEN=varlen, HAS_B=has_b, SILU=ctx.silu)
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
