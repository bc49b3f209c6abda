"""How a sequence is laid out over context-parallel ranks.

"contiguous": rank r holds tokens [r T/cp, (r + 1) T/cp).
"zigzag" (Megatron's load-balanced layout for causal attention): the sequence is cut into 2 cp equal
chunks and rank r holds chunks r and 2 cp - 1 - r, in that order.
"""

from __future__ import annotations

import torch

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def check_rank(cp, rank) -> None:
    """cp an int >= 1 and rank an int in [0, cp), else ValueError naming the argument."""
    if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1:
        raise ValueError(f"cp must be an int >= 1 (the number of context-parallel ranks), got {cp!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < cp:
        raise ValueError(f"rank must be an int in [0, cp) = [0, {cp}), got {rank!r}")


def global_segments(layout: str, cp: int, rank: int) -> list[int]:
    """Global indices (in sequence order) of the segments rank `rank` holds, in local order."""
    check_layout(layout)
    return [rank] if layout == "contiguous" else [rank, 2 * cp - 1 - rank]


def zigzag_owner(gi: int, cp: int) -> tuple[int, int]:
    """(rank, local slot) holding global segment gi of 2 cp in the zigzag layout."""
    return (gi, 0) if gi < cp else (2 * cp - 1 - gi, 1)


def shard(x: torch.Tensor, layout: str, cp: int, rank: int, dim: int = 1, cu_seqlens=None) -> torch.Tensor:
    """This rank's part of a full-sequence tensor (dim = the sequence dim). With cu_seqlens (packed
    sequences) and the zigzag layout, every sequence is split on its own (Megatron's THD layout)."""
    check_layout(layout)
    check_rank(cp, rank)
    if not isinstance(x, torch.Tensor) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"shard: x must be a tensor with a dim {dim}, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if cu_seqlens is not None and layout == "zigzag":
        bounds = cu_seqlens.tolist()
        return torch.cat([shard(x.narrow(dim, a, b - a), layout, cp, rank, dim)
                          for a, b in zip(bounds[:-1], bounds[1:])], dim=dim)
    pieces = x.chunk(len(global_segments(layout, cp, 0)) * cp, dim=dim)
    if len({p.shape[dim] for p in pieces}) != 1 or len(pieces) != len(global_segments(layout, cp, 0)) * cp:
        raise ValueError(f"sequence length {x.shape[dim]} must divide into "
                         f"{len(global_segments(layout, cp, 0)) * cp} equal pieces for layout {layout!r}, cp={cp}")
    return torch.cat([pieces[i] for i in global_segments(layout, cp, rank)], dim=dim)


def unshard(parts: list, layout: str, dim: int = 1) -> torch.Tensor:
    """Inverse of `shard`: the full-sequence tensor from every rank's part (in rank order). The parts
    must be tensors of one shape, their length along `dim` a multiple of the pieces a rank holds."""
    check_layout(layout)
    if not isinstance(parts, (list, tuple)) or not parts or not all(isinstance(p, torch.Tensor) for p in parts):
        raise ValueError(f"unshard: parts must be a non-empty list of tensors (one per rank), got {type(parts).__name__}")
    shapes = {tuple(p.shape) for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"unshard: every rank's part must have the same shape, got {sorted(shapes)}")
    cp = len(parts)
    n = len(global_segments(layout, cp, 0))
    if parts[0].shape[dim] % n:
        raise ValueError(f"unshard: layout {layout!r} holds {n} equal pieces a rank, but a part has length "
                         f"{parts[0].shape[dim]} along dim {dim}")
    ordered = [None] * (n * cp)
    for r, part in enumerate(parts):
        for piece, gi in zip(part.chunk(n, dim=dim), global_segments(layout, cp, r)):
            ordered[gi] = piece
    return torch.cat(ordered, dim=dim)
