"""Checks of the layer's Triton kernels (qla_megatron.layers.kernels) against float64 torch
references, forward and every gradient, on fresh random inputs. Shared by the CPU tests (which run
them under TRITON_INTERPRET=1 in a subprocess: `python -m tests.layers.kernel_checks FAMILY`) and the
GPU tests (which call them on CUDA at real sizes). Each check raises AssertionError with the errors.

Tolerances (DESIGN §6): relative L2 error <= 1e-5 in fp32; in bf16 outputs <= 5e-3 and gradients
<= 1e-2, and also no worse than twice a bf16 torch run of the same reference (flash-attention's rule).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-3, 1e-2)}


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _rounded(ref, dtype):
    """ref in dtype as a kernel store makes it: round to nearest on a GPU; Triton's interpreter
    truncates float32 to bfloat16 (drops the low 16 bits), so there the floor is the truncation's."""
    if INTERPRET and dtype == torch.bfloat16:
        bits = ref.float().contiguous().view(torch.int32) & -65536
        return bits.view(torch.float32)
    return ref.to(dtype)


def check_close(name, got, ref, same_dtype_ref, tol):
    """got (kernel) vs ref (float64). A float32 result: <= 1e-5. A half result: <= tol and no worse
    than twice the error of the same-dtype torch run or of rounding the reference itself."""
    assert torch.isfinite(got).all(), f"{name}: not finite"
    err = rel(got, ref)
    if got.dtype == torch.float32:
        limit = TOL[torch.float32][0]
    else:
        floor = rel(_rounded(ref, got.dtype), ref)
        limit = min(tol, 2 * max(rel(same_dtype_ref, ref) if same_dtype_ref is not None else 0.0, floor))
    assert err <= limit, f"{name}: rel. L2 error {err:.2e} > {limit:.2e}"
    return err


# --- references (any dtype; float64 in, float64 out) ------------------------------------------------

def conv_ref(x, weight, bias, cu_seqlens, initial_state, silu=True):
    """Sequence by sequence with F.conv1d over [halo | sequence] (halo zeros when absent)."""
    B, T, D = x.shape
    W = weight.shape[-1]
    bounds = [0, T] if cu_seqlens is None else cu_seqlens.tolist()
    outs = []
    for n in range(len(bounds) - 1):
        if bounds[n + 1] == bounds[n]:
            continue  # an empty sequence: no tokens, its halo feeds nothing
        piece = x[:, bounds[n]:bounds[n + 1]]
        halo = initial_state[:, n] if initial_state is not None else x.new_zeros(B, W - 1, D)
        full = torch.cat([halo, piece], 1).transpose(1, 2)
        outs.append(F.conv1d(full, weight, bias, groups=D).transpose(1, 2))
    y = torch.cat(outs, 1)
    return F.silu(y) if silu else y


def gated_norm_ref(x, gate, weight, eps):
    xf = x.float() if x.dtype != torch.float64 else x
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight * F.silu(gate.to(xf.dtype))).to(x.dtype)


def gate_head_ref(a, b, A_log, dt_bias):
    gdt = torch.promote_types(a.dtype, torch.float32)
    g = -A_log.to(gdt).exp() * F.softplus(a.to(gdt) + dt_bias.to(gdt))
    return g, b.sigmoid()


# --- the checks ------------------------------------------------------------------------------------

def _grads(fn, inputs, cotangents):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward([o for o in outs], [c.to(o.dtype) for o, c in zip(outs, cotangents)])
    return [o.detach() for o in outs], [t.grad if t is not None and t.requires_grad else None for t in leaves]


def _compare(name, dtype, fn, ref_fn, inputs, out_shapes_fn, device):
    """fn on `inputs` (dtype) vs ref_fn on their float64 copies (and ref_fn in dtype), outputs and grads."""
    out_tol, grad_tol = TOL[dtype]
    with torch.no_grad():
        shapes = out_shapes_fn()
    cot = [torch.randn(s, device=device, dtype=torch.float64) for s in shapes]
    outs, grads = _grads(fn, inputs, cot)
    # The references get the cotangents the kernels got, rounded to each output's dtype (the same
    # inputs, DESIGN §6): else the floor below rounds a gradient no kernel can reach from its inputs.
    cot = [c.to(o.dtype).double() for c, o in zip(cot, outs)]
    outs_ref, grads_ref = _grads(ref_fn, [t.double() if t is not None and t.is_floating_point() else t
                                          for t in inputs], cot)
    outs_lo, grads_lo = (None, None)
    if dtype != torch.float32:
        outs_lo, grads_lo = _grads(ref_fn, inputs, cot)
    errs = {}
    for i, (o, r) in enumerate(zip(outs, outs_ref)):
        errs[f"out{i}"] = check_close(f"{name} out{i}", o, r, outs_lo[i] if outs_lo else None, out_tol)
    for i, (gk, gr) in enumerate(zip(grads, grads_ref)):
        if gr is None:
            assert gk is None, f"{name}: grad {i} should be None"
            continue
        assert gk is not None and gk.shape == gr.shape, f"{name}: grad {i} missing or misshapen"
        errs[f"grad{i}"] = check_close(f"{name} grad{i}", gk, gr, grads_lo[i] if grads_lo else None, grad_tol)
    if INTERPRET:  # the interpreter runs one program after another: nothing to learn from a rerun
        return errs
    # the same input again gives the same bits (DESIGN §6)
    outs2, grads2 = _grads(fn, inputs, cot)
    for a, b in zip(outs + [g for g in grads if g is not None], outs2 + [g for g in grads2 if g is not None]):
        assert torch.equal(a, b), f"{name}: a second run differs"
    return errs


def lengths_to_cu(lengths, device):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=device, dtype=torch.int64)


def check_conv(device, dtype, B, T, D, W=4, lengths=None, halo=False, bias=True, silu=True, strided=True,
               consts=None):
    """x as a split view of a wider token-major tensor (strided=True) like the layer's in_proj output.
    consts: module constants of kernels/conv.py (tiles) to set for this check, e.g. {"BWD_TILE": ...}."""
    from qla_megatron.layers.kernels import causal_conv1d_silu
    from qla_megatron.layers.kernels import conv as conv_module

    saved = {k: getattr(conv_module, k) for k in consts or {}}
    for k, v in (consts or {}).items():
        setattr(conv_module, k, v)
    try:
        return _check_conv(device, dtype, B, T, D, W, lengths, halo, bias, silu, strided, causal_conv1d_silu)
    finally:
        for k, v in saved.items():
            setattr(conv_module, k, v)


def _check_conv(device, dtype, B, T, D, W, lengths, halo, bias, silu, strided, causal_conv1d_silu):

    cu = lengths_to_cu(lengths, device) if lengths is not None else None
    N = 1 if cu is None else len(lengths)
    wide = torch.randn(T, B, D + 24, device=device, dtype=dtype)
    x = wide.transpose(0, 1)[..., 8:8 + D] if strided else torch.randn(B, T, D, device=device, dtype=dtype)
    weight = (torch.randn(D, 1, W, device=device) / W ** 0.5).to(dtype)
    b = torch.randn(D, device=device, dtype=dtype) if bias else None
    h = torch.randn(B, N, W - 1, D, device=device, dtype=dtype) if halo else None

    def fn(x, w, b, h):
        return causal_conv1d_silu(x, w, b, cu_seqlens=cu, initial_state=h, silu=silu)

    def ref(x, w, b, h):
        return conv_ref(x, w, b, cu, h, silu)

    return _compare(f"conv {dtype} B{B} T{T} D{D} W{W} {lengths} halo={halo}", dtype, fn, ref, [x, weight, b, h],
                    lambda: [(B, T, D)], device)


def check_gated_norm(device, dtype, B, S, HV, V, out_layout="bshv", eps=1e-6):
    from qla_megatron.layers.kernels import gated_rms_norm

    x = torch.randn(B, S, HV, V, device=device, dtype=dtype) * 3
    wide = torch.randn(S, B, HV * V + 16, device=device, dtype=dtype)
    gate = wide.transpose(0, 1)[..., 16:].reshape(B, S, HV, V)  # a strided view, as the layer's z
    assert not gate.is_contiguous() or B == 1 and S == 1
    weight = (1 + 0.5 * torch.randn(V, device=device)).to(dtype)

    def fn(x, g, w):
        return gated_rms_norm(x, g, w, eps, out_layout=out_layout)

    def ref(x, g, w):
        y = gated_norm_ref(x, g, w, eps)
        return y.reshape(B, S, HV * V).transpose(0, 1).contiguous() if out_layout == "sbd" else y

    shape = (S, B, HV * V) if out_layout == "sbd" else (B, S, HV, V)
    return _compare(f"gated_norm {dtype} B{B} S{S} HV{HV} V{V} {out_layout}", dtype, fn, ref, [x, gate, weight],
                    lambda: [shape], device)


def check_gate_head(device, dtype, B, S, HV):
    from qla_megatron.layers.kernels import gate_head

    wide = torch.randn(S, B, 2 * HV + 8, device=device, dtype=dtype) * 4
    wide[:, :, :HV].add_(torch.where(torch.rand(HV, device=device) < 0.25, 25.0, 0.0).to(dtype))  # softplus > 20
    a, b = wide.transpose(0, 1)[..., :HV], wide.transpose(0, 1)[..., HV:2 * HV]
    A_log = torch.empty(HV, device=device).uniform_(0, 16).log().to(dtype)
    dt_bias = torch.randn(HV, device=device, dtype=dtype)

    return _compare(f"gate_head {dtype} B{B} S{S} HV{HV}", dtype, gate_head, gate_head_ref, [a, b, A_log, dt_bias],
                    lambda: [(B, S, HV), (B, S, HV)], device)


def check_cp_conv(device, dtype, B, T, D, layout, lengths=None):
    """cp_causal_depthwise_conv1d(fused=True) (one kernel launch, halos as initial states) against its
    torch path (fused=False) in float64, on a one-rank process group: the zigzag layout still cuts
    every sequence into 2 pieces whose second takes its halo from the first, so the halo wiring and
    its gradient are exercised without a second rank."""
    import tempfile

    import torch.distributed as dist

    from qla_megatron.parallel import cp_causal_depthwise_conv1d

    if not dist.is_initialized():
        path = tempfile.mktemp(prefix="qla_gloo_")
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    cu = lengths_to_cu(lengths, device) if lengths is not None else None
    x = torch.randn(B, T, D, device=device, dtype=dtype)
    weight = (torch.randn(D, 1, 4, device=device) / 2).to(dtype)
    bias = torch.randn(D, device=device, dtype=dtype)

    def fused(x, w, b):
        return cp_causal_depthwise_conv1d(x, w, b, layout=layout, cu_seqlens=cu, silu=True, fused=True)

    def ref(x, w, b):
        return cp_causal_depthwise_conv1d(x, w, b, layout=layout, cu_seqlens=cu, silu=True, fused=False)

    return _compare(f"cp_conv {dtype} {layout} B{B} T{T} {lengths}", dtype, fused, ref, [x, weight, bias],
                    lambda: [(B, T, D)], device)


def check_layer(device, dtype, T, packed=False, recompute=False, B=1):
    """The layer with the kernels (uses_kernels forced on, as on CUDA) and its torch path, same
    weights and input, in float32, both against the float64 layer: output, input gradient and every
    weight gradient; the kernels' error <= 1e-5 or no worse than twice the torch path's (A_log and
    dt_bias gradients are sums with cancellation). Runs where the kernels run: under the interpreter
    on the CPU it checks the wiring (layouts, packed offsets, recompute)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from .mcore_setup import build_ours, gdn_config, init_single_process, set_model_parallel

    init_single_process()
    extra = dict(recompute_granularity="selective", recompute_modules=["gdn_norm_out"],
                 experimental_attention_variant="gated_delta_net", linear_attention_freq=1) if recompute else {}
    config, pg = gdn_config(hidden=32, hk=2, hv=4, dk=16, dv=16, **extra), set_model_parallel(tp=1)
    base = build_ours(config, pg, conv_bias=True, backend="torch").to(device)
    layers = []
    for _ in range(3):
        layer = build_ours(config, pg, conv_bias=True, backend="torch").to(device)
        layer.load_state_dict(base.state_dict(), strict=True)
        assert layer.recompute_norm_out == recompute
        layers.append(layer)
    fused, plain, ref = layers[0], layers[1], layers[2].double()
    fused.uses_kernels = lambda t: t.dtype == torch.float32  # the kernels wherever this layer runs
    params = None
    if packed:
        cu = torch.tensor([0, 1, 20, T], device=device, dtype=torch.int32)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    x = torch.randn(T, B, 32, device=device, dtype=torch.float64)
    cot = torch.randn(T, B, 32, device=device, dtype=torch.float64)
    results = []
    for layer in (fused, plain, ref):
        xi = x.to(next(layer.parameters()).dtype).requires_grad_(True)
        out, _ = layer(xi, None, packed_seq_params=params)
        (out * cot.to(out.dtype)).sum().backward()
        results.append([out.detach(), xi.grad] + [p.grad for _, p in sorted(layer.named_parameters())])
    names = ["out", "dx"] + [n for n, _ in sorted(base.named_parameters())]
    errs = {}
    for name, got, eager, want in zip(names, *results):
        assert got is not None and torch.isfinite(got).all(), name
        errs[name], err_torch = rel(got, want), rel(eager, want)
        assert errs[name] <= max(1e-5, 2 * err_torch), \
            f"layer {name}: kernels {errs[name]:.2e}, torch path {err_torch:.2e} vs float64"
    return errs


# --- small cases for the interpreter (CPU CI) ---------------------------------------------------------

SMALL = {
    "conv": [dict(B=2, T=37, D=20), dict(B=1, T=70, D=130, lengths=[1, 2, 30, 5, 32], halo=True, strided=False),
             dict(B=2, T=33, D=9, W=3, halo=True, bias=False, strided=False),
             dict(B=1, T=45, D=12, lengths=[3, 40, 2], silu=False, halo=True),
             dict(B=1, T=40, D=16, W=2, lengths=[40], bias=False), dict(B=1, T=20, D=8, W=1, lengths=[5, 15]),
             # boundaries at the backward's 8-token tile edges and just past them, an empty sequence,
             # two channel blocks (the second partial); a program walking several tiles (n_iters > 1)
             dict(B=1, T=41, D=300, lengths=[8, 8, 5, 0, 3, 17], halo=True),
             dict(B=1, T=24, D=10, lengths=[8, 1, 7, 8]),
             dict(B=2, T=70, D=40, lengths=[9, 3, 20, 38], halo=True,  # 4 x 32 tiles, 2 programs of 9 tiles
                  consts=dict(BWD_TILE=(4, 32, 1), BWD_MIN_PROGRAMS=2))],
    "gated_norm": [dict(B=2, S=7, HV=3, V=32), dict(B=1, S=5, HV=2, V=24, out_layout="sbd"),
                   dict(B=3, S=4, HV=2, V=16, out_layout="sbd")],
    "gate_head": [dict(B=2, S=35, HV=3), dict(B=1, S=70, HV=8)],
    "layer": [dict(T=45, B=2), dict(T=45, packed=True), dict(T=30, recompute=True)],
    "cp_conv": [dict(B=2, T=22, D=10, layout="zigzag"), dict(B=1, T=30, D=6, layout="zigzag", lengths=[10, 6, 14]),
                dict(B=2, T=9, D=5, layout="contiguous")],
}
CHECKS = {"conv": check_conv, "gated_norm": check_gated_norm, "gate_head": check_gate_head, "cp_conv": check_cp_conv, "layer": check_layer}


def main(family):
    torch.manual_seed(int(os.environ["QLA_TEST_SEED"]) if "QLA_TEST_SEED" in os.environ
                      else int.from_bytes(os.urandom(4), "little"))
    for dtype in (torch.float32,) if family == "layer" else (torch.float32, torch.bfloat16):
        for case in SMALL[family]:
            errs = CHECKS[family]("cpu", dtype, **case)
            print(family, dtype, case, {k: f"{v:.1e}" for k, v in errs.items()}, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
