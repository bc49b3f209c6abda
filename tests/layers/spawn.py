"""run_on_ranks for the layer tests: every rank first patches megatron-core for a CPU-only torch."""

from __future__ import annotations

from ..spawn import run_on_ranks as _run_on_ranks


def _with_megatron(rank, world_size, fn, *args):
    from . import mcore_setup  # noqa: F401  (enable_megatron_on_cpu at import, in this process)

    fn(rank, world_size, *args)


def run_on_ranks(world_size: int, fn, *args, backend: str = "gloo") -> None:
    """fn(rank, world_size, *args) on every rank; a failure on any rank fails the caller. backend:
    "gloo" (CPU) or "nccl" (rank r on cuda:r)."""
    _run_on_ranks(world_size, _with_megatron, fn, *args, backend=backend)
