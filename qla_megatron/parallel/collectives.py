"""Differentiable collectives used by context parallelism (small tensors: segment summaries, halos)."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllGatherStacked(torch.autograd.Function):
    """x [*] on every rank -> [world, *]; backward sums the gradient over ranks, keeps own slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)  # every rank's use of x[r] sends its gradient to r
        return grad[dist.get_rank(ctx.group)], None


def all_gather_stacked(x: torch.Tensor, group=None) -> torch.Tensor:
    """Stack of every rank's x along a new dim 0, differentiable (gloo and NCCL)."""
    return _AllGatherStacked.apply(x, group)
