"""The packed plan's Triton builder (hopper/packed_plan.py) against the torch builder
(segment_plan.packed_tables, itself checked against the host plan in test_packed_plan.py): every
table equal, padding rows included, for the cases of test_packed_plan.py, random packings, int32 and
int64 offsets, and offsets outside the contract (where the torch builder's in-bounds tables are the
reference). Run by the CPU tests under TRITON_INTERPRET=1 in a subprocess
(`python -m tests.ops.packed_plan_checks`, the variable must be set before the kernels are defined)
and by the GPU test on CUDA. Raises AssertionError naming the table, the packing and the segment length.
"""

from __future__ import annotations

import os
import random

import torch

from qla_megatron.ops.gated_delta_rule.hopper.packed_plan import packed_tables_device
from qla_megatron.ops.gated_delta_rule.segment_plan import packed_tables

from .test_packed_plan import CASES, SEG_LENS, _offsets, _random_lens

TABLES = ("chunks", "segs", "bsegs", "sum_segs", "bsum_segs")


def check_one(cu: torch.Tensor, T: int, seg, device) -> None:
    want = packed_tables(cu, T, seg)
    got = packed_tables_device(cu.to(device), T, seg)
    what = f"cu_seqlens={cu.tolist()} T={T} segment_len={seg}"
    assert (got.NC, got.NS) == (want.NC, want.NS), f"NC, NS {(got.NC, got.NS)} != {(want.NC, want.NS)}: {what}"
    pairs = [(name, getattr(got, name), getattr(want, name)) for name in TABLES]
    for walk in ("walk", "bwalk"):
        g, w = getattr(got, walk), getattr(want, walk)
        assert (g is None) == (w is None), f"{walk}: {what}"
        if w is not None:
            pairs += [(f"{walk}.{f}", a, b) for f, a, b in zip(w._fields, g, w)]
    for name, g, w in pairs:
        assert (g is None) == (w is None), f"{name}: {what}"
        if w is not None:
            assert g.dtype == torch.int32 and g.is_contiguous(), f"{name} dtype / layout: {what}"
            assert g.shape == w.shape and torch.equal(g.cpu(), w), f"{name}:\n{g.cpu()}\n!=\n{w}\n{what}"


def check_all(device, seed: int, n_random: int = 60, n_invalid: int = 60) -> int:
    """Every check; returns how many (packing, segment length) pairs were compared."""
    n = 0
    for lens in CASES:
        for seg in SEG_LENS:
            cu = _offsets(lens)
            check_one(cu, int(cu[-1]), seg, device)
            n += 1
    rng = random.Random(seed)
    for _ in range(n_random):
        lens, seg = _random_lens(rng), rng.choice(SEG_LENS)
        cu = _offsets(lens, rng.choice([torch.int32, torch.int64]))
        check_one(cu, int(cu[-1]), seg, device)
        n += 1
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_invalid):   # outside the contract: unsorted, negative, past T, repeated offsets
        T = int(torch.randint(1, 600, (1,), generator=gen))
        N = int(torch.randint(1, 12, (1,), generator=gen))
        cu = torch.randint(-50, T + 50, (N + 1,), generator=gen)
        check_one(cu, T, rng.choice((None, 64, 192)), device)
        n += 1
    return n


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1 (or call check_all on CUDA)"
    print(f"packed plan: {check_all('cpu', int(os.environ.get('QLA_TEST_SEED', '0')))} pairs equal")
