"""The layer's GDNOptions: taken from its spec, handed to every op call; the debug checks off by
default, so a forward + backward of fixed shapes reads nothing on the host (CPU proxy below; the
CUDA-graph capture on a GPU)."""

import contextlib

import pytest
import torch
from megatron.core.transformer.spec_utils import build_module

import qla_megatron.layers.gated_delta_net as gdn_module
from qla_megatron.layers import get_gdn_layer_spec, get_hybrid_block_spec
from qla_megatron.layers.gated_delta_net import GatedDeltaNet
from qla_megatron.ops import GDNOptions, IntraCPConfig, default_options

from .mcore_setup import build_ours, gdn_config, rel_err, set_model_parallel

MINE = GDNOptions(intra_cp=IntraCPConfig(segment_len=128, mode="exact"), check_finite=True)


def step(layer, x):
    """One training step's worth of work: forward, a loss, backward. Returns out, dx, weight grads."""
    x = x.detach().clone().requires_grad_(True)
    out, _ = layer(x, None)
    (out.float() * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


def test_layer_options_default_and_explicit(single_rank):
    pg = set_model_parallel(tp=1)
    assert build_ours(gdn_config(), pg).options is default_options()
    assert build_ours(gdn_config(), pg, options=MINE).options is MINE
    with pytest.raises(ValueError, match=r"options must be a qla_megatron.ops.GDNOptions or None, got bool"):
        build_ours(gdn_config(), pg, options=True)


def test_layer_hands_its_options_to_the_op(single_rank, monkeypatch):
    seen = []
    op = gdn_module.chunk_gated_delta_rule
    monkeypatch.setattr(gdn_module, "chunk_gated_delta_rule",
                        lambda *a, **kw: seen.append(kw["options"]) or op(*a, **kw))
    layer = build_ours(gdn_config(), set_model_parallel(tp=1), options=MINE)
    layer(torch.randn(20, 1, 32), None)
    assert seen == [MINE]


def test_specs_carry_the_options(single_rank):
    pg = set_model_parallel(tp=1)
    config = gdn_config(num_layers=4, experimental_attention_variant="gated_delta_net", linear_attention_freq=4)
    spec = get_gdn_layer_spec(backend="local", op_options=MINE)
    assert spec.params["options"] is MINE and get_gdn_layer_spec(backend="local").params["options"] is None
    layer = build_module(spec, config=config, layer_number=1, pg_collection=pg)
    assert isinstance(layer, GatedDeltaNet) and layer.options is MINE
    block = get_hybrid_block_spec(config, backend="local", op_options=MINE)
    gdn = [s.submodules.self_attention for s in block.layer_specs
           if s.submodules.self_attention.module is GatedDeltaNet]
    assert len(gdn) == 3 and all(s.params["options"] is MINE for s in gdn)
    with pytest.raises(ValueError, match=r"op_options must be a qla_megatron.ops.GDNOptions or None, got dict"):
        get_gdn_layer_spec(backend="local", op_options={})


def test_nan_in_hidden_states(single_rank):
    """With check_finite the error names hidden_states (not q, which in_proj computes from it);
    without it (the default) the layer runs and the NaN reaches its output."""
    pg = set_model_parallel(tp=1)
    x = torch.randn(20, 1, 32).index_fill(0, torch.tensor([4]), float("nan"))
    with pytest.raises(ValueError, match=r"^hidden_states contains NaN or Inf"):
        build_ours(gdn_config(), pg, options=GDNOptions(check_finite=True))(x, None)
    out, _ = build_ours(gdn_config(), pg, options=GDNOptions())(x, None)
    assert torch.isnan(out[4:]).any()


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads():
    """Every Python-level way to read a tensor's values on the host raises HostRead: on a GPU each is
    a device sync. (Reads inside C++ ops are not seen: the CUDA-graph test covers those.)"""
    def refuse(name):
        def read(*args, **kwargs):
            raise HostRead(f"Tensor.{name} called")
        return read

    names = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    for n in names:
        setattr(torch.Tensor, n, refuse(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def test_training_step_reads_nothing_on_the_host(single_rank):
    """Default options: a forward + backward reads no tensor value on the host (the guard works:
    with check_finite on, the same step trips it)."""
    pg = set_model_parallel(tp=1)
    x = torch.randn(70, 2, 32)
    layer = build_ours(gdn_config(), pg)
    ref = step(layer, x)
    layer.zero_grad(set_to_none=True)
    with no_host_reads():
        got = step(layer, x)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    checked = build_ours(gdn_config(), pg, options=GDNOptions(check_finite=True))
    with pytest.raises(HostRead), no_host_reads():
        step(checked, x)


@pytest.mark.gpu
@pytest.mark.parametrize("op_backend", ["torch", "tilelang"])
def test_training_step_in_a_cuda_graph(single_rank, op_backend):
    """One training step of the layer (fixed shapes, bf16, K = V = 128) captured in a CUDA graph and
    replayed on new inputs: output, input gradient and every weight gradient equal an eager step's."""
    from qla_megatron.ops import which_backend

    pg = set_model_parallel(tp=1)
    layer = build_ours(gdn_config(hidden=256, hk=2, hv=4, dk=128, dv=128, dtype=torch.bfloat16), pg,
                       backend=op_backend).cuda()
    T = 256
    qk = torch.empty(1, T, 2, 128, device="cuda", dtype=torch.bfloat16)
    try:
        which_backend(qk, qk, qk.new_empty(1, T, 4, 128), backend=op_backend, requires_grad=True)
    except ValueError as e:
        pytest.skip(str(e))
    static_x = torch.randn(T, 1, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.linspace(-1, 1, T * 256, device="cuda").view(T, 1, 256)

    def graph_step():
        out, _ = layer(static_x, None)
        (out.float() * weight).sum().backward()
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles, plans and caches outside the capture
        for _ in range(3):
            layer.zero_grad(set_to_none=True)
            static_x.grad = None
            graph_step()
    torch.cuda.current_stream().wait_stream(side)
    layer.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = graph_step()

    for _ in range(2):
        x = torch.randn(T, 1, 256, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        replayed = (static_out.clone(), static_x.grad.clone(),
                    {n: p.grad.clone() for n, p in layer.named_parameters()})
        saved = {n: p.grad for n, p in layer.named_parameters()}
        layer.zero_grad(set_to_none=True)
        eager = step(layer, x)
        for n, p in layer.named_parameters():  # give the graph's gradient buffers back
            p.grad = saved[n]
        assert rel_err(replayed[0], eager[0]) <= 1e-6
        assert rel_err(replayed[1], eager[1]) <= 1e-6
        for n in eager[2]:
            assert rel_err(replayed[2][n], eager[2][n]) <= 1e-6, n
