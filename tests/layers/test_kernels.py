"""The layer's Triton kernels (qla_megatron.layers.kernels): conv + SiLU, gated RMSNorm, decay head.

CPU (CI): every check of kernel_checks.py runs under Triton's interpreter in a subprocess
(TRITON_INTERPRET=1 must be set before the kernels are defined, so it stays out of this process),
fp32 and bf16, forward and every gradient against float64 torch. GPU (`-m gpu`): the same checks at
real sizes, and the layer with the kernels against its torch path, both against the float64 layer.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .kernel_checks import SMALL, check_conv, check_gate_head, check_gated_norm, rel
from .mcore_setup import build_ours, gdn_config, set_model_parallel

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("family", ["conv", "gated_norm", "gate_head", "cp_conv", "layer"])
def test_kernels_interpreted(family, fresh_seed):
    env = dict(os.environ, TRITON_INTERPRET="1", QLA_TEST_SEED=str(fresh_seed), PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, "-m", "tests.layers.kernel_checks", family], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    dtypes = 1 if family == "layer" else 2
    assert run.stdout.count(f"{family} torch.") == dtypes * len(SMALL[family])  # every case ran and printed


def test_bad_input_names_the_argument():
    from qla_megatron.layers.kernels import causal_conv1d_silu, gate_head, gated_rms_norm

    x, w = torch.randn(1, 10, 8), torch.randn(8, 1, 4)
    with pytest.raises(ValueError, match=r"weight must be \[D=8, 1, W\]"):
        causal_conv1d_silu(x, torch.randn(6, 1, 4))
    with pytest.raises(ValueError, match=r"kernel size W must be 1..4.*W=5"):
        causal_conv1d_silu(x, torch.randn(8, 1, 5))
    with pytest.raises(ValueError, match=r"initial_state must be \[B=1, N=2, W-1=3, D=8\]"):
        causal_conv1d_silu(x, w, cu_seqlens=torch.tensor([0, 4, 10]), initial_state=torch.randn(1, 1, 3, 8))
    with pytest.raises(ValueError, match=r"cu_seqlens must be a 1-D int32/int64"):
        causal_conv1d_silu(x, w, cu_seqlens=torch.tensor([0.0, 10.0]))
    with pytest.raises(ValueError, match=r"x needs unit stride on its channel dim"):
        causal_conv1d_silu(torch.randn(1, 8, 10).transpose(1, 2), w)
    with pytest.raises(ValueError, match=r"bias must be \[D=8\]"):
        causal_conv1d_silu(x, w, torch.randn(3))
    o = torch.randn(1, 5, 2, 16)
    with pytest.raises(ValueError, match=r"weight must be \[V=16\]"):
        gated_rms_norm(o, o, torch.randn(8), 1e-6)
    with pytest.raises(ValueError, match=r"out_layout must be 'bshv' or 'sbd', got 'x'"):
        gated_rms_norm(o, o, torch.randn(16), 1e-6, out_layout="x")
    with pytest.raises(ValueError, match=r"x and gate must both be \[B, S, HV, V\]"):
        gated_rms_norm(o, o[..., :8], torch.randn(16), 1e-6)
    a = torch.randn(1, 5, 4)
    with pytest.raises(ValueError, match=r"A_log and dt_bias must be \[HV=4\]"):
        gate_head(a, a, torch.randn(3), torch.randn(4))


def test_layer_cpu_path_never_takes_the_kernels(single_rank, monkeypatch):
    """On the CPU the layer runs the torch path whatever triton_kernels says (the CPU tests compare
    it with Megatron's layer)."""
    import qla_megatron.layers.gated_delta_net as gdn

    def refuse(*a, **kw):
        raise AssertionError("a Triton kernel was called on CPU tensors")

    for name in ("causal_conv1d_silu", "gate_head", "gated_rms_norm"):
        monkeypatch.setattr(gdn, name, refuse)
    layer = build_ours(gdn_config(), set_model_parallel(tp=1))
    assert layer.triton_kernels and not layer.uses_kernels(torch.randn(2))
    out, _ = layer(torch.randn(20, 1, 32), None)
    out.sum().backward()


# --- GPU --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [
    pytest.param(dict(B=1, T=32768, D=8192, lengths=[1, 3, 1000, 4093, 27671], halo=True), id="T32768-D8192-varlen-halo"),
    pytest.param(dict(B=2, T=4099, D=2304, halo=True), id="B2-T4099-D2304-halo"),
    pytest.param(dict(B=1, T=8191, D=1030, W=3, lengths=[8191], bias=False, strided=False), id="W3-T8191-D1030"),
    pytest.param(dict(B=1, T=1000, D=300, lengths=[5] * 200, silu=False), id="200seqs-nosilu"),
])
def test_conv_gpu(dtype, case):
    check_conv("cuda", dtype, **case)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [
    pytest.param(dict(B=1, S=32768, HV=32, V=128, out_layout="sbd"), id="S32768-HV32-V128-sbd"),
    pytest.param(dict(B=3, S=1001, HV=5, V=128), id="B3-S1001-HV5"),
    pytest.param(dict(B=2, S=999, HV=4, V=96, out_layout="sbd"), id="B2-V96-sbd"),
])
def test_gated_norm_gpu(dtype, case):
    check_gated_norm("cuda", dtype, **case)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [pytest.param(dict(B=1, S=32768, HV=32), id="S32768-HV32"),
                                  pytest.param(dict(B=3, S=1001, HV=6), id="B3-S1001-HV6")])
def test_gate_head_gpu(dtype, case):
    check_gate_head("cuda", dtype, **case)


def _layer_step(layer, x, packed, cot):
    x = x.detach().clone().requires_grad_(True)
    out, _ = layer(x, None, packed_seq_params=packed)
    (out * cot.to(out.dtype)).sum().backward()
    return [out.detach(), x.grad] + [p.grad for _, p in sorted(layer.named_parameters())]


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_layer_kernels_vs_torch_path(single_rank, packed):
    """bf16 layer with the kernels and with its torch path (triton_kernels=False), the same weights,
    both against the float64 layer: output, input gradient and every weight gradient; the kernels'
    error no worse than twice the torch path's (+ 1e-4), the bf16 rule of the style guide."""
    from megatron.core.packed_seq_params import PackedSeqParams

    pg = set_model_parallel(tp=1)
    config = gdn_config(hidden=256, hk=2, hv=4, dk=128, dv=128)
    base = build_ours(config, pg, backend="torch", conv_bias=True)

    def copy_of_base():
        layer = build_ours(config, pg, backend="torch", conv_bias=True)
        layer.load_state_dict(base.state_dict(), strict=True)
        return layer
    T = 1500
    x = torch.randn(T, 1, 256, device="cuda")
    cot = torch.randn(T, 1, 256, device="cuda", dtype=torch.float64)
    params = None
    if packed:
        cu = torch.tensor([0, 3, 700, 701, 1500], device="cuda", dtype=torch.int32)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    ref = _layer_step(copy_of_base().cuda().double(), x.double(), params, cot)
    fused_layer = copy_of_base().cuda().bfloat16()
    torch_layer = copy_of_base().cuda().bfloat16()
    torch_layer.triton_kernels = False
    assert fused_layer.uses_kernels(x.bfloat16()) and not torch_layer.uses_kernels(x.bfloat16())
    got = _layer_step(fused_layer, x.bfloat16(), params, cot)
    eager = _layer_step(torch_layer, x.bfloat16(), params, cot)
    names = ["out", "dx"] + [n for n, _ in sorted(base.named_parameters())]
    for name, g, e, r in zip(names, got, eager, ref):
        assert torch.isfinite(g).all(), name
        err, err_torch = rel(g, r), rel(e, r)
        print(f"{name}: kernels {err:.2e}, torch path {err_torch:.2e}")
        assert err <= 2 * err_torch + 1e-4, f"{name}: kernels {err:.2e}, torch path {err_torch:.2e}"
