"""Selective recompute of the gated out_norm ("gdn_norm_out" in recompute_modules): same output and
gradients as without it, and the same as Megatron's layer with it."""

import torch

from .mcore_setup import build_megatron, build_ours, gdn_config, rel_err, set_model_parallel
from .test_vs_megatron import run


def test_norm_out_recompute_changes_nothing(single_rank):
    pg = set_model_parallel(tp=1)
    plain = gdn_config(hk=2, hv=4)
    recomputed = gdn_config(hk=2, hv=4, recompute_granularity="selective", recompute_modules=["gdn_norm_out"],
                            experimental_attention_variant="gated_delta_net", linear_attention_freq=1)
    x = torch.randn(70, 2, plain.hidden_size)
    a, b = build_ours(plain, pg), build_ours(recomputed, pg)
    assert not a.recompute_norm_out and b.recompute_norm_out
    b.load_state_dict(a.state_dict(), strict=True)
    calls = []
    norm = b._gated_norm
    b._gated_norm = lambda o, z: calls.append(1) or norm(o, z)
    o1, _, dx1, g1 = run(a, x)
    o2, _, dx2, g2 = run(b, x)
    assert len(calls) == 2, "the norm must run in the forward and once more in the backward"
    assert torch.equal(o1, o2) and torch.equal(dx1, dx2)
    assert all(torch.equal(g1[n], g2[n]) for n in g1)

    theirs = build_megatron(plain, pg)  # its recompute path needs TE (fp8 bug), so without it
    theirs.load_state_dict(b.state_dict(), strict=True)
    o3, _, dx3, _ = run(theirs, x)
    assert rel_err(o2, o3) <= 1e-5 and rel_err(dx2, dx3) <= 1e-5
