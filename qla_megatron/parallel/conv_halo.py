"""The short causal convolution of GDN under context parallelism: each local piece of a sequence
needs the W - 1 tokens before it (its halo), which another rank (or, in the zigzag layout, this one)
holds."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .collectives import all_gather_stacked
from .layouts import check_layout, global_segments, zigzag_owner


def _local_pieces(T: int, layout: str, cp: int, rank: int, cu_seqlens):
    """This rank's pieces as (length, key of the piece before it in its sequence or None); a key is
    (owner rank, piece index on that rank)."""
    if cu_seqlens is None:
        local = global_segments(layout, cp, rank)
        if T % len(local):
            raise ValueError(f"layout={layout!r} needs T_local divisible by {len(local)}, got T_local={T}")
        owner = {gi: (r, i) for r in range(cp) for i, gi in enumerate(global_segments(layout, cp, r))}
        return [(T // len(local), owner.get(gi - 1)) for gi in local]
    if layout != "zigzag":
        raise ValueError("the CP conv supports cu_seqlens with layout='zigzag' (Megatron's THD layout) only, "
                         f"got layout={layout!r}")
    from .cp_plan import zigzag_piece_lengths

    out = []
    for j, length in enumerate(zigzag_piece_lengths(cu_seqlens, cp)):
        n, slot = divmod(j, 2)
        gi = rank if slot == 0 else 2 * cp - 1 - rank
        prev = None
        if gi > 0:
            owner, prev_slot = zigzag_owner(gi - 1, cp)
            prev = (owner, 2 * n + prev_slot)
        out.append((length, prev))
    return out


def cp_causal_depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor, bias=None, cp_group=None,
                               layout: str = "contiguous", cu_seqlens=None, *, silu: bool = False,
                               fused: bool = False) -> torch.Tensor:
    """This rank's slice of the causal depthwise conv of the whole sequence(s).

    Args:
        x: [B, T_local, D], this rank's shard in `layout` (see layouts.py).
        weight: [D, 1, W] (nn.Conv1d(groups=D) weight); bias: [D] or None.
        cu_seqlens: global offsets of packed sequences (B = 1; zigzag layout only), as in
            cp_chunk_gated_delta_rule.
        silu: apply SiLU to the output.
        fused: run qla_megatron.layers.kernels.causal_conv1d_silu (CUDA tensors): one launch over all
            pieces, each with its halo as the initial state, x read in place; else torch's conv1d.
    Returns:
        [B, T_local, D]. Every rank all-gathers the last W - 1 tokens of each of its pieces (a few KB
        per piece), then convolves [halo | piece]; the first piece of a sequence gets zeros.
    """
    check_layout(layout)
    cp, rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    B, T, D = x.shape
    W = weight.shape[-1]
    pieces = _local_pieces(T, layout, cp, rank, cu_seqlens)
    if any(length < W - 1 for length, _ in pieces):
        raise ValueError(f"every local piece needs >= W - 1 = {W - 1} tokens for its conv halo, got piece "
                         f"lengths {sorted({length for length, _ in pieces})}")
    parts = x.split([length for length, _ in pieces], dim=1)
    tails = torch.stack([p[:, p.shape[1] - (W - 1):] for p in parts])       # [n_pieces, B, W - 1, D]
    gathered = all_gather_stacked(tails, cp_group)                         # [cp, n_pieces, B, W - 1, D]
    # zeros before a sequence, kept in the graph so that every rank joins the backward all-reduce
    halos = [gathered[prev] if prev is not None else gathered[0, 0] * 0 for _, prev in pieces]
    if fused:
        from qla_megatron.layers.kernels import causal_conv1d_silu

        bounds = [0]
        for length, _ in pieces:
            bounds.append(bounds[-1] + length)
        local_cu = torch.tensor(bounds, dtype=torch.int32).to(x.device, non_blocking=True)
        initial = torch.stack(halos, dim=1)                                  # [B, n_pieces, W - 1, D]
        return causal_conv1d_silu(x, weight, bias, cu_seqlens=local_cu, initial_state=initial, silu=silu)
    outs = []
    for part, halo in zip(parts, halos):
        with_halo = torch.cat([halo, part], dim=1).transpose(1, 2)          # [B, D, W - 1 + length]
        outs.append(F.conv1d(with_halo, weight, bias, groups=D).transpose(1, 2))
    y = torch.cat(outs, dim=1)
    return F.silu(y) if silu else y
