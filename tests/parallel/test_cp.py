"""Cross-GPU context parallelism on real gloo ranks against the single-process op (float64): the
local outputs and every local input gradient equal the matching slices of the unsplit result. The
gradients come from cp.py's dual backward (end adjoints composed right to left across the ranks),
which test_backward_is_the_dual checks is what runs."""

import pytest
import torch

from qla_megatron.ops import chunk_gated_delta_rule
from qla_megatron.parallel import cp_chunk_gated_delta_rule, shard

from ..ops.gdr_inputs import make_inputs, rel
from ..spawn import run_on_ranks


def whole_sequence(world, T_local, cu):
    """Float64 inputs of the whole sequence (2 rows, or packed by cu), a cotangent do, and the
    single-process op's output and gradients for it: (cu_t, inputs, do, o, grads)."""
    B = 1 if cu is not None else 2
    T = world * T_local
    cu_t = torch.tensor(cu, dtype=torch.int64) if cu is not None else None
    full = make_inputs(B, T, 2, 4, 16, 16, torch.float64, initial_state=False, requires_grad=True)[:5]
    do = torch.randn(B, T, 4, 16, dtype=torch.float64)
    o_ref, _ = chunk_gated_delta_rule(*full, cu_seqlens=cu_t, use_qk_l2norm_in_kernel=True)
    return cu_t, full, do, o_ref, torch.autograd.grad((o_ref * do).sum(), full)


def _check_rank(rank, world, layout, T_local, cu, seed):
    torch.manual_seed(seed)  # the same global inputs on every rank
    cu_t, full, do, o_ref, grads_ref = whole_sequence(world, T_local, cu)

    def mine(t):
        return shard(t, layout, world, rank, cu_seqlens=cu_t)

    local = [mine(t.detach()).requires_grad_(True) for t in full]
    o = cp_chunk_gated_delta_rule(*local, layout=layout, cu_seqlens=cu_t, use_qk_l2norm_in_kernel=True)
    assert rel(o, mine(o_ref)) <= 1e-10
    (o * mine(do)).sum().backward()
    for name, t, ref in zip(("q", "k", "v", "g", "beta"), local, grads_ref):
        assert rel(t.grad, mine(ref)) <= 1e-10, name


CASES = [
    pytest.param(2, "contiguous", 70, None, id="cp2-contiguous-T70"),
    pytest.param(2, "zigzag", 130, None, id="cp2-zigzag-T130"),
    pytest.param(4, "contiguous", 64, None, id="cp4-contiguous-T64"),
    pytest.param(4, "zigzag", 40, None, id="cp4-zigzag-T40"),
    # [5, 120) spans ranks 0, 1 (whole shard) and 2, ending at rank 3's first token
    pytest.param(4, "contiguous", 40, [0, 5, 120, 130, 160], id="cp4-varlen-crossing"),
    # sequences starting on rank boundaries, one spanning two whole shards, a short one on rank 2
    pytest.param(4, "contiguous", 40, [0, 40, 100, 103, 160], id="cp4-varlen-boundaries"),
    pytest.param(3, "contiguous", 50, None, id="cp3-contiguous-T50"),
    # Megatron's THD layout: every sequence (a multiple of 2 cp) split into 2 cp pieces on its own
    pytest.param(2, "zigzag", 80, [0, 8, 136, 160], id="cp2-zigzag-varlen"),
    pytest.param(4, "zigzag", 70, [0, 200, 208, 280], id="cp4-zigzag-varlen"),
]


@pytest.mark.parametrize("world,layout,T_local,cu", CASES)
def test_cp_equals_single_process(world, layout, T_local, cu, fresh_seed):
    run_on_ranks(world, _check_rank, layout, T_local, cu, fresh_seed)


def _dual_rank(rank, world):
    q, k, v, g, beta, _ = make_inputs(1, 64, 1, 2, 8, 8, torch.float64, initial_state=False, requires_grad=True)
    o = cp_chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
    assert type(o.grad_fn).__name__ == "_StatePassingBackward"
    # the graph ends at the inputs: no summary, gather or composition to differentiate through
    assert {type(f).__name__ for f, _ in o.grad_fn.next_functions if f is not None} == {"AccumulateGrad"}
    o.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v, g, beta))


def test_backward_is_the_dual():
    run_on_ranks(2, _dual_rank)


def _errors_rank(rank, world):
    q, k, v, g, beta, _ = make_inputs(1, 33, 1, 2, 8, 8, torch.float32, initial_state=False)
    with pytest.raises(ValueError, match="layout must be one of"):
        cp_chunk_gated_delta_rule(q, k, v, g, beta, layout="ring")
    with pytest.raises(ValueError, match="even local length"):
        cp_chunk_gated_delta_rule(q, k, v, g, beta, layout="zigzag")
    with pytest.raises(ValueError, match="cu_seqlens must end at T=66"):
        cp_chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 33]))
    with pytest.raises(ValueError, match="multiple of 2 \\* cp = 4"):
        cp_chunk_gated_delta_rule(q, k, v, g, beta, layout="zigzag", cu_seqlens=torch.tensor([0, 30, 66]))
    with pytest.raises(ValueError, match="cp_group must be a torch.distributed ProcessGroup"):
        cp_chunk_gated_delta_rule(q, k, v, g, beta, cp_group="x")
    with pytest.raises(ValueError, match="initial_state is not supported"):
        cp_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=torch.zeros(1, 2, 8, 8))
    # cu_seqlens that differ between ranks: caught by the debug check (check_finite), on every rank
    from qla_megatron.ops import GDNOptions
    cu = torch.tensor([0, 10, 66]) if rank == 0 else torch.tensor([0, 20, 66])
    with pytest.raises(ValueError, match="cu_seqlens must be the same on every rank"):
        cp_chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu, options=GDNOptions(check_finite=True))
    cu = torch.tensor([0, 10, 66]) if rank == 0 else torch.tensor([0, 10, 20, 66])
    with pytest.raises(ValueError, match="lengths differ"):
        cp_chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu, options=GDNOptions(check_finite=True))
    # shards of unequal length: caught by the same debug check, on every rank
    T = 33 if rank == 0 else 32
    with pytest.raises(ValueError, match="one shape on every rank"):
        cp_chunk_gated_delta_rule(q[:, :T], k[:, :T], v[:, :T], g[:, :T], beta[:, :T],
                                  options=GDNOptions(check_finite=True))


def test_cp_bad_inputs():
    run_on_ranks(2, _errors_rank)


def _conv_rank(rank, world, layout, T_local, cu, seed):
    import torch.nn.functional as F

    from qla_megatron.parallel import cp_causal_depthwise_conv1d

    torch.manual_seed(seed)
    B = 1 if cu is not None else 2
    cu_t = torch.tensor(cu) if cu is not None else None
    x = torch.randn(B, world * T_local, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 1, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64)
    bounds = cu if cu is not None else [0, world * T_local]
    want = torch.cat([F.conv1d(x[:, a:b].transpose(1, 2), w, bias, padding=3, groups=6)[..., :b - a]
                      for a, b in zip(bounds[:-1], bounds[1:])], dim=2).transpose(1, 2)
    dy = torch.randn_like(want)
    dx_ref, dw_ref = torch.autograd.grad((want * dy).sum(), (x, w))

    def mine(t):
        return shard(t, layout, world, rank, cu_seqlens=cu_t)

    x_local = mine(x.detach()).requires_grad_(True)
    w_local = w.detach().clone().requires_grad_(True)
    y = cp_causal_depthwise_conv1d(x_local, w_local, bias, layout=layout, cu_seqlens=cu_t)
    assert rel(y, mine(want)) <= 1e-12
    (y * mine(dy)).sum().backward()
    assert rel(x_local.grad, mine(dx_ref)) <= 1e-12
    torch.distributed.all_reduce(w_local.grad)  # weights are shared: their gradient sums over ranks
    assert rel(w_local.grad, dw_ref) <= 1e-12


@pytest.mark.parametrize("world,layout,T_local,cu", [
    pytest.param(2, "contiguous", 20, None, id="cp2-contiguous"),
    pytest.param(4, "zigzag", 16, None, id="cp4-zigzag"),
    pytest.param(2, "zigzag", 40, [0, 16, 80], id="cp2-zigzag-varlen"),
])
def test_cp_conv_equals_single_process(world, layout, T_local, cu, fresh_seed):
    run_on_ranks(world, _conv_rank, layout, T_local, cu, fresh_seed)


def test_layout_shard_roundtrip():
    from qla_megatron.parallel import unshard
    x = torch.arange(2 * 24).view(2, 24)
    for layout in ("contiguous", "zigzag"):
        parts = [shard(x, layout, 3, r) for r in range(3)]
        assert torch.equal(unshard(parts, layout), x)
    assert shard(x, "zigzag", 3, 0)[0].tolist() == [0, 1, 2, 3, 20, 21, 22, 23]
    with pytest.raises(ValueError, match="equal pieces"):
        shard(x[:, :23], "zigzag", 3, 0)
    for cp, rank, what in ((3, 3, "rank must be"), (3, -1, "rank must be"), (0, 0, "cp must be"),
                           (2.0, 0, "cp must be")):
        with pytest.raises(ValueError, match=what):
            shard(x, "contiguous", cp, rank)
    with pytest.raises(ValueError, match="layout must be one of"):
        shard(x, "ring", 2, 0)
    parts = [shard(x, "zigzag", 3, r) for r in range(3)]
    with pytest.raises(ValueError, match="same shape"):
        unshard([parts[0], parts[1], parts[2][:, :-2]], "zigzag")
    with pytest.raises(ValueError, match="non-empty list of tensors"):
        unshard([], "zigzag")
    with pytest.raises(ValueError, match="2 equal pieces a rank"):
        unshard([p[:, :-1] for p in parts], "zigzag")
