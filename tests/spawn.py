"""Run a test body on N ranks with real process groups (torch.multiprocessing spawn): gloo on the CPU,
or NCCL with rank r on cuda:r."""

from __future__ import annotations

import os
import tempfile

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world_size, init_file, fn, args, backend="gloo"):
    if backend == "nccl":
        import torch
        torch.cuda.set_device(rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    fn(rank, world_size, *args)
    # Leave together and close the group: a gloo group torn down by interpreter exit while a peer
    # still talks to it can abort the process ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


def run_on_ranks(world_size: int, fn, *args, backend: str = "gloo") -> None:
    """fn(rank, world_size, *args) on every rank; a failure on any rank fails the caller. backend:
    "gloo" (CPU) or "nccl" (one GPU a rank)."""
    fd, init_file = tempfile.mkstemp(prefix="qla_gloo_")
    os.close(fd)
    os.remove(init_file)  # the file store creates it
    # Each rank is one process: one thread each keeps 4 ranks from fighting over 2 cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        mp.spawn(_entry, args=(world_size, init_file, fn, args, backend), nprocs=world_size, join=True)
    finally:
        if os.path.exists(init_file):
            os.remove(init_file)
