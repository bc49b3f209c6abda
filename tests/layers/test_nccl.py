"""The layer over NCCL on two GPUs (issue 14's equality runs): bf16 on the Hopper kernels at CP = 2
(both layouts, packed) and at TP = 2 with and without SP, against the same layer in float64 on the
whole sequence at TP = CP = 1: output, input gradient and every weight gradient (CP: summed over the
ranks; TP: the rank's shard). The bf16 rule of test_kernels: the split layer's error at most twice
the same bf16 layer's on one GPU, + 1e-4. Skipped unless two GPUs are there."""

import pytest
import torch
import torch.distributed as dist

from .spawn import run_on_ranks

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (NCCL)")]


def _step(layer, x, packed, cot):
    x = x.detach().clone().requires_grad_(True)
    out, _ = layer(x, None, packed_seq_params=packed)
    (out * cot.to(out.dtype)).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


def _nccl_rank(rank, world, mode, layout, T, cu, seed):
    from megatron.core import parallel_state
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from qla_megatron.parallel import shard

    from .mcore_setup import build_ours, gdn_config, rel_err, shard_state_dict

    tp, cp, sp = (world, 1, mode == "tp-sp") if mode.startswith("tp") else (1, world, False)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    split_pg = ProcessGroupCollection.use_mpu_process_groups()
    alone = [dist.new_group([r]) for r in range(world)][rank]           # new_group is collective
    one_pg = ProcessGroupCollection(tp=alone, cp=alone)
    hidden = 512
    full = gdn_config(hidden=hidden, hk=2, hv=8, dk=128, dv=128)
    base = build_ours(full, one_pg, backend="torch")
    state = base.state_dict()
    torch.manual_seed(seed)                      # the same batch on both ranks
    x = torch.randn(T, 1, hidden, device="cuda")
    cot = torch.randn(T, 1, hidden, device="cuda", dtype=torch.float64)
    packed = None
    if cu is not None:
        cu_t = torch.tensor(cu, dtype=torch.int32, device="cuda")
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t)

    ref_layer = build_ours(full, one_pg, backend="torch").cuda().double()
    ref_layer.load_state_dict(state, strict=True)
    ref = _step(ref_layer, x.double(), packed, cot)
    one_layer = build_ours(gdn_config(hidden=hidden, hk=2, hv=8, dk=128, dv=128, dtype=torch.bfloat16), one_pg,
                           backend="tilelang").cuda()
    one_layer.load_state_dict(state, strict=True)
    one = _step(one_layer, x.bfloat16(), packed, cot)

    cfg = gdn_config(hidden=hidden, hk=2, hv=8, dk=128, dv=128, dtype=torch.bfloat16, tp=tp, sp=sp)
    kw = dict(cp_layout=layout) if cp > 1 else {}
    split = build_ours(cfg, split_pg, backend="tilelang", **kw).cuda()
    split.load_state_dict(shard_state_dict(state, split, tp, rank if tp > 1 else 0), strict=True)
    cu_cpu = torch.tensor(cu) if cu is not None else None
    if cp > 1:
        def mine(t):
            return shard(t, layout, cp, rank, dim=0, cu_seqlens=cu_cpu)
    elif sp:
        def mine(t):
            return t.chunk(tp, dim=0)[rank]
    else:
        def mine(t):
            return t
    out, dx, grads = _step(split, mine(x).bfloat16(), packed, mine(cot))
    checks = [("out", out, mine(one[0]), mine(ref[0])), ("dx", dx, mine(one[1]), mine(ref[1]))]
    want_one = shard_state_dict(one[2], split, tp, rank) if tp > 1 else one[2]
    want_ref = shard_state_dict(ref[2], split, tp, rank) if tp > 1 else ref[2]
    for name, gr in grads.items():
        if cp > 1:                               # the weights are shared: their gradient sums over CP
            gr = gr.clone()
            dist.all_reduce(gr, group=split_pg.cp)
        checks.append((f"d{name}", gr, want_one[name], want_ref[name]))
    for name, got, single, want in checks:
        assert torch.isfinite(got).all(), name
        err, err_one = rel_err(got, want), rel_err(single, want)
        print(f"{mode} {layout} {name}: split {err:.2e}, one GPU {err_one:.2e}", flush=True)
        assert err <= 2 * err_one + 1e-4, f"{mode} {name}: split {err:.2e}, one GPU {err_one:.2e}"


@pytest.mark.parametrize("mode,layout,T,cu", [
    pytest.param("cp", "zigzag", 4096, None, id="cp2-zigzag"),
    pytest.param("cp", "contiguous", 4096, None, id="cp2-contiguous"),
    pytest.param("cp", "zigzag", 4096, [0, 1024, 3072, 4096], id="cp2-zigzag-packed"),
    pytest.param("tp", None, 4096, None, id="tp2"),
    pytest.param("tp-sp", None, 4096, None, id="tp2-sp"),
])
def test_layer_over_nccl(mode, layout, T, cu, fresh_seed):
    run_on_ranks(2, _nccl_rank, mode, layout, T, cu, fresh_seed, backend="nccl")
