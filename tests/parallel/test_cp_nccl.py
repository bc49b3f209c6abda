"""Cross-GPU context parallelism over NCCL on two GPUs (issue 14's equality runs): the op at CP = 2
on the Hopper kernels (bf16, 2/8 heads, K = V = 128, mixed decay), contiguous, zigzag and packed
sequences crossing the rank boundary; every rank's outputs and gradients are gathered into the whole
sequence and checked against the float64 recurrence with the tolerances of DESIGN §6. Skipped
unless two GPUs are there."""

import pytest
import torch
import torch.distributed as dist

from ..spawn import run_on_ranks

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (NCCL)")]


def _nccl_rank(rank, world, layout, T, cu, seed):
    from qla_megatron.parallel import cp_chunk_gated_delta_rule
    from qla_megatron.parallel.cp_emulation import _index
    from qla_megatron.parallel.cp_plan import cp_plan

    from ..ops.gdr_inputs import offsets, rel, rounded_inputs
    from ..ops.test_hopper_backward import Case

    torch.manual_seed(seed)                     # the same whole-sequence inputs on both ranks
    cu_t = torch.tensor(cu, dtype=torch.int64, device="cuda") if cu is not None else None   # boundaries
    low, _ = rounded_inputs(1, T, 2, 8, N=len(cu) - 1 if cu else None, h0=False)
    case = Case(low, None, cu_t, final=False)
    plan = cp_plan(layout, world, T // world, 1, tuple(cu) if cu is not None else None)
    idx = [_index(plan, r, T, low[0].device) for r in range(world)]
    leaves = [x[:, idx[rank]].detach().clone().requires_grad_(True) for x in low]
    o = cp_chunk_gated_delta_rule(*leaves, layout=layout, cu_seqlens=cu_t, use_qk_l2norm_in_kernel=True,
                                  backend="tilelang")
    grads = torch.autograd.grad(o, leaves, case.do[:, idx[rank]].to(o.dtype))

    def whole(x):                               # every rank's part back in sequence order
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        out = torch.empty((1, T) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
        for r, part in enumerate(parts):
            out[:, idx[r]] = part
        return out

    o_all = whole(o)
    assert torch.isfinite(o_all).all() and rel(o_all, case.o) <= 5e-3, rel(o_all, case.o)
    case.compare(f"nccl cp={world} {layout} varlen={cu is not None}", [whole(gr) for gr in grads])


@pytest.mark.parametrize("layout,T,cu", [
    pytest.param("contiguous", 4096, None, id="contiguous"),
    pytest.param("zigzag", 4096, None, id="zigzag"),
    pytest.param("contiguous", 4096, [0, 100, 3000, 3100, 4096], id="varlen-crossing"),
    pytest.param("zigzag", 4096, [0, 1024, 3072, 4096], id="zigzag-varlen"),
])
def test_cp2_over_nccl(layout, T, cu, fresh_seed):
    run_on_ranks(2, _nccl_rank, layout, T, cu, fresh_seed, backend="nccl")
