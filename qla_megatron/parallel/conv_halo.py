"""The short causal convolution of GDN under context parallelism: each local segment needs the
W - 1 tokens before it (its halo), which another rank (or, in the zigzag layout, this one) holds."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .collectives import all_gather_stacked
from .layouts import check_layout, global_segments


def cp_causal_depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor, bias=None, cp_group=None,
                               layout: str = "contiguous") -> torch.Tensor:
    """This rank's slice of the causal depthwise conv of the whole sequence.

    Args:
        x: [B, T_local, D], this rank's shard in `layout` (see layouts.py).
        weight: [D, 1, W] (nn.Conv1d(groups=D) weight); bias: [D] or None.
    Returns:
        [B, T_local, D]. Every rank all-gathers the last W - 1 tokens of each of its segments (a few
        KB), then convolves [halo | segment]; the first segment of the sequence gets zeros.
    """
    check_layout(layout)
    cp, rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    B, T, D = x.shape
    W = weight.shape[-1]
    local = global_segments(layout, cp, rank)
    seg_len = T // len(local)
    if T % len(local) or seg_len < W - 1:
        raise ValueError(f"each local segment needs >= W - 1 = {W - 1} tokens (and equal halves for zigzag); "
                         f"got T_local={T} for layout {layout!r}")
    pieces = x.split(seg_len, dim=1)
    tails = torch.stack([p[:, seg_len - (W - 1):] for p in pieces])         # [n_local, B, W - 1, D]
    gathered = all_gather_stacked(tails, cp_group)                         # [cp, n_local, B, W - 1, D]
    owner = {gi: (r, i) for r in range(cp) for i, gi in enumerate(global_segments(layout, cp, r))}
    outs = []
    for piece, gi in zip(pieces, local):
        # zeros before the sequence, kept in the graph so that every rank joins the backward all-reduce
        halo = gathered[owner[gi - 1]] if gi > 0 else gathered[owner[0]] * 0
        with_halo = torch.cat([halo, piece], dim=1).transpose(1, 2)         # [B, D, W - 1 + seg_len]
        outs.append(F.conv1d(with_halo, weight, bias, groups=D).transpose(1, 2))
    return torch.cat(outs, dim=1)
