"""The short causal depthwise convolution of GDN, with packed sequences kept apart."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                            cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """y[b, t, d] = bias[d] + sum_j weight[d, 0, W-1-j] * x[b, t-j, d], for t-j inside t's sequence.

    Args:
        x: [B, T, D] (D channels, each convolved on its own).
        weight: [D, 1, W], the `nn.Conv1d(groups=D)` weight.
        bias: [D] or None.
        cu_seqlens: int64 [N + 1] offsets of sequences packed along T (B must be 1), or None.

    Returns:
        [B, T, D], no activation.

    Packed sequences: every sequence gets W - 1 zeros in front of it (one gather-scatter), so one
    convolution runs over the whole pack and no token sees the end of the previous sequence.
    """
    B, T, D = x.shape
    W = weight.shape[-1]
    xt = x.transpose(1, 2)  # [B, D, T]: conv1d's layout
    if cu_seqlens is None:
        y = F.conv1d(xt, weight, bias, padding=W - 1, groups=D)[..., :T]
        return y.transpose(1, 2)
    if B != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (packed sequences), got x of shape {tuple(x.shape)}")
    N = cu_seqlens.numel() - 1
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    seq_id = torch.repeat_interleave(torch.arange(N, device=x.device), lengths, output_size=T)
    # Token t of sequence i sits at t + (i + 1)(W - 1) in the zero-separated buffer.
    where = torch.arange(T, device=x.device) + (seq_id + 1) * (W - 1)
    buffer = xt.new_zeros(1, D, T + N * (W - 1))
    buffer = buffer.index_copy(2, where, xt)
    y = F.conv1d(buffer, weight, bias, groups=D)  # valid conv: output i sees buffer[i : i + W]
    return y.index_select(2, where - (W - 1)).transpose(1, 2)
