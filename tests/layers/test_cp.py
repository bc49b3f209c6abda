"""The layer under cross-GPU context parallelism (real gloo ranks) against the same layer on the whole
sequence, float64: output and input gradient slices, and parameter gradients summed over CP ranks
(as Megatron's data-parallel x CP gradient all-reduce does)."""

import pytest
import torch
import torch.distributed as dist

from .spawn import run_on_ranks


def _cp_rank(rank, world, layout, T, cu, seed):
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    from qla_megatron.layers.cpu_compat import seed_model_parallel_rng
    from qla_megatron.parallel import shard

    from .mcore_setup import build_ours, gdn_config, rel_err

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=world)
    seed_model_parallel_rng(seed, 0)
    pg_cp = ProcessGroupCollection.use_mpu_process_groups()
    alone = [dist.new_group([r]) for r in range(world)][rank]    # new_group is collective: all ranks
    pg_one = ProcessGroupCollection(tp=alone, cp=alone)
    config = gdn_config(hk=2, hv=4, dtype=torch.float64)
    whole = build_ours(config, pg_one)
    split = build_ours(config, pg_cp, cp_layout=layout)
    split.load_state_dict(whole.state_dict(), strict=True)

    torch.manual_seed(seed)  # the same full-sequence batch on every rank
    B = 1 if cu is not None else 2
    packed = None
    if cu is not None:
        from megatron.core.packed_seq_params import PackedSeqParams

        cu_t = torch.tensor(cu, dtype=torch.int32)
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t)
    x = torch.randn(T, B, config.hidden_size, dtype=torch.float64)
    dy = torch.randn(T, B, config.hidden_size, dtype=torch.float64)

    def mine(t):
        return shard(t, layout, world, rank, dim=0, cu_seqlens=torch.tensor(cu) if cu is not None else None)

    x_full = x.clone().requires_grad_(True)
    (y_full, _), x_local = whole(x_full, None, packed_seq_params=packed), mine(x).requires_grad_(True)
    (y_full * dy).sum().backward()
    y_local, _ = split(x_local, None, packed_seq_params=packed)
    (y_local * mine(dy)).sum().backward()

    assert rel_err(y_local, mine(y_full)) <= 1e-10
    assert rel_err(x_local.grad, mine(x_full.grad)) <= 1e-10
    for (name, p), p_whole in zip(split.named_parameters(), whole.parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad, group=pg_cp.cp)
        assert rel_err(grad, p_whole.grad) <= 1e-10, name


@pytest.mark.parametrize("world,layout,T,cu", [
    pytest.param(2, "zigzag", 72, None, id="cp2-zigzag"),
    pytest.param(2, "contiguous", 70, None, id="cp2-contiguous"),
    pytest.param(4, "zigzag", 96, None, id="cp4-zigzag"),
    pytest.param(2, "zigzag", 96, [0, 16, 80, 96], id="cp2-zigzag-packed-thd"),
])
def test_layer_cp_equals_whole_sequence(world, layout, T, cu, fresh_seed):
    run_on_ranks(world, _cp_rank, layout, T, cu, fresh_seed)
