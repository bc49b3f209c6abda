"""The torch chunked op against the float64 token-by-token recurrence: o, final state, all gradients."""

import pytest
import torch

from qla_megatron.ops import chunk_gated_delta_rule, recurrent_gated_delta_rule

from .gdr_inputs import grads_of, make_inputs, rel

NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def run_both(B, T, H, HV, K, V, dtype, profile="mixed", initial_state=True, cu_seqlens=None,
             l2norm=True, tol=None):
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    inputs = make_inputs(B, T, H, HV, K, V, dtype, profile, initial_state, N=N, requires_grad=True)
    if not l2norm:  # normalised keys keep the delta rule stable when the op does not normalise
        with torch.no_grad():
            inputs[1].copy_(torch.nn.functional.normalize(inputs[1], dim=-1))
    ref_inputs = [t.detach().double().requires_grad_(True) if t is not None else None for t in inputs]
    kw = dict(output_final_state=True, cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=l2norm)
    do = torch.randn(B, T, HV, V, dtype=torch.float64)
    ds = torch.randn(N, HV, K, V, dtype=torch.float64)

    def chunk(q, k, v, g, beta, h0):
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, backend="torch", **kw)

    def ref(q, k, v, g, beta, h0):
        return recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, **kw)

    o, s, dx = grads_of(chunk, inputs, do, ds)
    o_ref, s_ref, dx_ref = grads_of(ref, ref_inputs, do, ds)
    assert o.dtype == dtype and o.shape == (B, T, HV, V)
    assert s.shape == (N, HV, K, V)
    assert s.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = tol or (1e-10 if dtype == torch.float64 else 1e-5)
    errors = {"o": rel(o, o_ref), "final_state": rel(s, s_ref)}
    names = [n for n, t in zip(NAMES, inputs) if t is not None]
    errors.update({f"d{n}": rel(a, b) for n, a, b in zip(names, dx, dx_ref)})
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f"relative L2 errors above {tol}: {bad}"
    return errors


LENGTHS = [1, 5, 63, 64, 65, 127, 128, 129, 200]


@pytest.mark.parametrize("T", LENGTHS, ids=[f"T{t}" for t in LENGTHS])
def test_lengths_fp64(T):
    run_both(B=2, T=T, H=2, HV=4, K=32, V=32, dtype=torch.float64)


@pytest.mark.parametrize("H,HV", [(4, 4), (2, 4), (2, 8), (1, 4)], ids=["gva1:1", "gva1:2", "gva1:4", "H1-HV4"])
def test_grouped_value_heads(H, HV):
    run_both(B=1, T=100, H=H, HV=HV, K=32, V=16, dtype=torch.float64)


@pytest.mark.parametrize("K,V", [(64, 128), (128, 64)], ids=["K64-V128", "K128-V64"])
def test_k_ne_v(K, V):
    run_both(B=1, T=70, H=1, HV=2, K=K, V=V, dtype=torch.float64)


@pytest.mark.parametrize("initial_state", [False, True], ids=["no-h0", "h0"])
@pytest.mark.parametrize("profile", ["mixed", "none"], ids=["strong+zero-decay", "no-decay"])
def test_decay_profiles(initial_state, profile):
    run_both(B=2, T=150, H=2, HV=4, K=32, V=32, dtype=torch.float64, profile=profile,
             initial_state=initial_state)


def test_without_l2norm_in_kernel():
    run_both(B=1, T=130, H=2, HV=4, K=32, V=32, dtype=torch.float64, l2norm=False)


def test_varlen_with_length_one_sequences():
    cu = torch.tensor([0, 1, 2, 66, 131, 132, 262, 269], dtype=torch.int64)
    run_both(B=1, T=269, H=2, HV=4, K=32, V=32, dtype=torch.float64, cu_seqlens=cu)


def test_varlen_equals_separate_sequences():
    lens = [1, 70, 64, 3]
    q, k, v, g, beta, h0 = make_inputs(1, sum(lens), 2, 4, 16, 16, torch.float64, N=len(lens))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                  cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    for n in range(len(lens)):
        a, b = int(cu[n]), int(cu[n + 1])
        o_n, s_n = chunk_gated_delta_rule(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b],
                                          initial_state=h0[n:n + 1], output_final_state=True,
                                          use_qk_l2norm_in_kernel=True)
        assert rel(o[:, a:b], o_n) <= 1e-12 and rel(s[n:n + 1], s_n) <= 1e-12


@pytest.mark.parametrize("T", [64, 130], ids=["T64", "T130"])
def test_float32(T):
    run_both(B=2, T=T, H=2, HV=4, K=64, V=64, dtype=torch.float32)


def test_float32_varlen():
    cu = torch.tensor([0, 1, 66, 200], dtype=torch.int64)
    run_both(B=1, T=200, H=1, HV=2, K=64, V=32, dtype=torch.float32, cu_seqlens=cu)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_inputs_compute_in_float32(dtype):
    """Half inputs: o comes back in their dtype; inside, float32 (so the only error beyond 1e-5 is the
    final rounding of o to the half dtype)."""
    q, k, v, g, beta, h0 = make_inputs(1, 130, 2, 4, 64, 64, dtype)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                  use_qk_l2norm_in_kernel=True)
    o_ref, s_ref = recurrent_gated_delta_rule(*(t.double() for t in (q, k, v, g, beta)),
                                              initial_state=h0.double(), output_final_state=True,
                                              use_qk_l2norm_in_kernel=True)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert rel(s, s_ref) <= 1e-5
    assert rel(o, o_ref) <= 2 * rel(o_ref.to(dtype), o_ref) + 1e-5


def test_scale_and_positive_gates():
    """A custom scale, and g > 0 (allowed: the state grows) on some tokens."""
    q, k, v, g, beta, h0 = make_inputs(1, 90, 1, 2, 16, 16, torch.float64)
    g = g.clamp(min=-0.5) + 0.3 * torch.rand_like(g)
    kw = dict(scale=0.37, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, **kw)
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, **kw)
    assert rel(o, o_ref) <= 1e-10 and rel(s, s_ref) <= 1e-10


def test_gradcheck_small():
    q, k, v, g, beta, h0 = make_inputs(1, 67, 1, 2, 4, 3, torch.float64, requires_grad=True)

    def f(q, k, v, g, beta, h0):
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                      use_qk_l2norm_in_kernel=True)

    assert torch.autograd.gradcheck(f, (q, k, v, g, beta, h0), fast_mode=True)


def test_gradcheck_varlen():
    cu = torch.tensor([0, 1, 9, 12], dtype=torch.int64)
    q, k, v, g, beta, h0 = make_inputs(1, 12, 1, 2, 3, 2, torch.float64, N=3, requires_grad=True)

    def f(q, k, v, g, beta, h0):
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                      cu_seqlens=cu, use_qk_l2norm_in_kernel=True)

    assert torch.autograd.gradcheck(f, (q, k, v, g, beta, h0))


def test_chunk_layout_cached_per_packing():
    """The torch backend builds a packing's index tensors once (no host-to-device copies or device
    waits on a repeated shape: CUDA graphs need that); built under inference_mode they still serve a
    later training call, whose gradients match a fresh build's."""
    from qla_megatron.ops.gated_delta_rule.torch.layout import _cached_layout, chunk_layout

    _cached_layout.cache_clear()
    cu = torch.tensor([0, 70, 75, 200])
    with torch.inference_mode():
        lay = chunk_layout([0, 70, 75, 200], 64, "cpu")
    assert not lay.pos.is_inference()
    assert chunk_layout((0, 70, 75, 200), 64, torch.device("cpu")) is lay
    assert chunk_layout((0, 70, 200), 64, "cpu") is not lay
    inputs = make_inputs(1, 200, 2, 4, 8, 8, torch.float64, N=3, requires_grad=True)

    def grads():
        o, s = chunk_gated_delta_rule(*inputs[:5], initial_state=inputs[5], cu_seqlens=cu, output_final_state=True)
        return torch.autograd.grad((o.square().sum() + s.sum()), inputs)

    cached = grads()
    _cached_layout.cache_clear()
    fresh = grads()
    assert all(torch.equal(a, b) for a, b in zip(cached, fresh))
