"""Tensor and sequence parallelism on real gloo ranks: TP = 2 and 4 equal TP = 1 (weights split from
one model) for the output and every gradient; SP on equals SP off; packed sequences equal separate
sequences.

In float64: the question is whether the sharding is right, and in float32 the A_log / dt_bias
gradients are ill-conditioned (sums of dg with cancellation; see test_vs_megatron), so a different
but equally valid summation order at TP = 4 moves them by ~1e-4.
"""

import pytest
import torch

from .spawn import run_on_ranks

T, B, HIDDEN = 24, 2, 32
LENS = [5, 12, 7]  # packed: awkward lengths, total divisible by 4 for SP


def _reference(config_kw, x, w, packed_x, packed_w):
    """TP=1 layer: its state dict, and output / input grad / param grads for batched and packed input."""
    from .mcore_setup import build_ours, gdn_config, set_model_parallel

    pg = set_model_parallel(tp=1)
    layer = build_ours(gdn_config(**config_kw), pg)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = {k: v.clone() for k, v in layer.state_dict().items() if v is not None}

    def run(inputs, weights):
        layer.zero_grad()
        xs = [t.clone().requires_grad_(True) for t in inputs]
        outs = [layer(t, None)[0] for t in xs]
        sum((o * wt).sum() for o, wt in zip(outs, weights)).backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        return torch.cat(outs), torch.cat([t.grad for t in xs]), grads

    # Packed reference: each sequence on its own.
    seqs = list(torch.split(packed_x, LENS))
    return state, layer, run([x], [w]), run(seqs, list(torch.split(packed_w, LENS)))


def _check_rank(rank, world_size, seed):
    from megatron.core.packed_seq_params import PackedSeqParams

    from .mcore_setup import build_ours, gdn_config, rel_err, set_model_parallel, shard_state_dict

    tp = world_size
    config_kw = dict(hidden=HIDDEN, hk=4, hv=8, dk=8, dv=4, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)  # the same inputs on every rank
    x, w = (torch.randn(T, B, HIDDEN, generator=gen, dtype=torch.float64) for _ in range(2))
    total = sum(LENS)
    px, pw = (torch.randn(total, 1, HIDDEN, generator=gen, dtype=torch.float64) for _ in range(2))
    torch.manual_seed(seed)  # same TP=1 weights on every rank
    state, ref_layer, (out_ref, dx_ref, g_ref), (pout_ref, pdx_ref, pg_ref) = _reference(config_kw, x, w, px, pw)
    cu = torch.tensor([0] + torch.tensor(LENS).cumsum(0).tolist(), dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(LENS), max_seqlen_kv=max(LENS))

    for sp in (False, True):
        pg = set_model_parallel(tp=tp)
        layer = build_ours(gdn_config(**config_kw, tp=tp, sp=sp), pg)
        layer.load_state_dict(shard_state_dict(state, layer, tp, rank), strict=True)

        for inp, wt, params, (o_ref, d_ref, gr_ref) in (
                (x, w, None, (out_ref, dx_ref, g_ref)), (px, pw, packed, (pout_ref, pdx_ref, pg_ref))):
            cut = (lambda t: t.chunk(tp, dim=0)[rank]) if sp else (lambda t: t)
            layer.zero_grad()
            xi = cut(inp).clone().requires_grad_(True)
            out, bias = layer(xi, None, packed_seq_params=params)
            assert bias is None
            (out * cut(wt)).sum().backward()
            what = f"tp={tp} sp={sp} packed={params is not None}"
            assert rel_err(out, cut(o_ref)) <= 1e-10, what
            assert rel_err(xi.grad, cut(d_ref)) <= 1e-10, what
            grads = {n: p.grad for n, p in layer.named_parameters()}
            want = shard_state_dict(gr_ref, layer, tp, rank)
            assert grads.keys() == want.keys()
            for name in grads:
                assert rel_err(grads[name], want[name]) <= 1e-10, f"{what} d{name}"


@pytest.mark.parametrize("tp", [2, 4], ids=["TP2", "TP4"])
def test_tp_sp_packed_equal_tp1(tp, fresh_seed):
    run_on_ranks(tp, _check_rank, fresh_seed)


def test_packed_equals_separate_single_rank(single_rank):
    """TP=1, one process: packed sequences (int32 cu_seqlens, as Megatron passes them) equal separate."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from .mcore_setup import build_ours, gdn_config, rel_err, set_model_parallel

    pg = set_model_parallel(tp=1)
    layer = build_ours(gdn_config(hk=2, hv=4), pg)
    lens = [1, 63, 65, 3]
    xs = [torch.randn(n, 1, 32) for n in lens]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    packed, _ = layer(torch.cat(xs), None, packed_seq_params=params)
    separate = torch.cat([layer(t, None)[0] for t in xs])
    assert rel_err(packed, separate) <= 1e-6
