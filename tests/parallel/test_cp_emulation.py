"""Cross-GPU CP emulated in one process (parallel/cp_emulation.py: cp.py's phases, the all-gathers
replaced by stacking): on the CPU in float64 equal to the single-process op, outputs and every
gradient (1e-10), for the shapes of test_cp.py's gloo runs; on one GPU with the Hopper kernels
(backend "tilelang", bf16) against the float64 recurrence with the tolerances of DESIGN §6."""

import pytest
import torch

from qla_megatron.ops import chunk_gated_delta_rule
from qla_megatron.parallel import emulated_cp_chunk_gated_delta_rule

from ..ops.gdr_inputs import make_inputs, offsets, rel, rounded_inputs
from .test_cp import CASES, whole_sequence


@pytest.mark.parametrize("world,layout,T_local,cu", CASES)
def test_emulated_equals_single_process(world, layout, T_local, cu):
    cu_t, full, do, o_ref, want = whole_sequence(world, T_local, cu)
    o = emulated_cp_chunk_gated_delta_rule(*full, cp=world, layout=layout, cu_seqlens=cu_t,
                                           use_qk_l2norm_in_kernel=True)
    assert rel(o, o_ref) <= 1e-10
    got = torch.autograd.grad((o * do).sum(), full)
    for name, a, b in zip(("q", "k", "v", "g", "beta"), got, want):
        assert rel(a, b) <= 1e-10, name


def test_graph_kept_only_for_a_backward(monkeypatch):
    """The ranks' op graphs (kept for the backward, cp.forward_run) are built only where a backward can
    follow: not under torch.no_grad, not for inputs that need no gradient."""
    import qla_megatron.parallel.cp_emulation as emu_mod
    kept, run = [], emu_mod.forward_run

    def recording(*a, keep_graph, **kw):
        kept.append(keep_graph)
        return run(*a, keep_graph=keep_graph, **kw)
    monkeypatch.setattr(emu_mod, "forward_run", recording)
    full = make_inputs(1, 64, 1, 2, 8, 8, torch.float64, initial_state=False, requires_grad=True)[:5]
    for grad, inputs, want in ((False, full, False), (True, [t.detach() for t in full], False), (True, full, True)):
        kept.clear()
        with torch.set_grad_enabled(grad):
            emulated_cp_chunk_gated_delta_rule(*inputs, cp=2)
        assert kept == [want, want], (grad, kept)


def test_emulated_bad_inputs():
    q, k, v, g, beta, _ = make_inputs(1, 66, 1, 2, 8, 8, torch.float32, initial_state=False)
    with pytest.raises(ValueError, match="cp must be an int >= 1"):
        emulated_cp_chunk_gated_delta_rule(q, k, v, g, beta, cp=0)
    with pytest.raises(ValueError, match="T=66 must be a multiple of cp=4"):
        emulated_cp_chunk_gated_delta_rule(q, k, v, g, beta, cp=4)
    with pytest.raises(ValueError, match="layout must be one of"):
        emulated_cp_chunk_gated_delta_rule(q, k, v, g, beta, cp=2, layout="ring")
    with pytest.raises(ValueError, match="multiple of 2 \\* cp = 4"):
        emulated_cp_chunk_gated_delta_rule(q, k, v, g, beta, cp=2, layout="zigzag",
                                           cu_seqlens=torch.tensor([0, 30, 66]))


GPU_CASES = [
    pytest.param(2, "contiguous", None, id="cp2-contiguous"),
    pytest.param(4, "zigzag", None, id="cp4-zigzag"),
    pytest.param(4, "contiguous", [0, 5, 1500, 1700, 2048], id="cp4-varlen-crossing"),
    pytest.param(2, "zigzag", [0, 512, 1536, 2048], id="cp2-zigzag-varlen"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("world,layout,cu", GPU_CASES)
def test_emulated_on_hopper_kernels(world, layout, cu):
    """bf16, 2/8 heads, K = V = 128, 2048 tokens (mixed decay: a zero-decay and a strong-decay head):
    o and every gradient of the emulated ranks on the Hopper kernels against the float64 recurrence."""
    from ..ops.test_hopper_backward import Case, _grads
    from qla_megatron.ops.gated_delta_rule.hopper.chunk import poison_outputs
    cu_t = torch.tensor(cu, dtype=torch.int64, device="cuda") if cu is not None else None   # boundaries
    low, _ = rounded_inputs(1, 2048, 2, 8, N=len(cu) - 1 if cu else None, h0=False)
    case = Case(low, None, cu_t, final=False)

    def emulated(q, k, v, g, beta, s0):
        return emulated_cp_chunk_gated_delta_rule(q, k, v, g, beta, cp=world, layout=layout, cu_seqlens=cu_t,
                                                  use_qk_l2norm_in_kernel=True, backend="tilelang"), None

    with poison_outputs():
        o, got = _grads(emulated, low, None, case.do, None)
    assert torch.isfinite(o).all() and rel(o, case.o) <= 5e-3, rel(o, case.o)
    case.compare(f"emulated cp={world} {layout} varlen={cu is not None}", got)


def test_kernel_path_plumbing(monkeypatch):
    """The path taken under backend "tilelang" (hopper/pieces.py: the local stream prepared once, its
    pieces' summaries, the run from composed starts, the backward summaries and the backward from the
    same saved state; the compose kernel), with each step replaced by its torch reference, on the
    CPU: the same results as the single-process op, so the rows sent and received, the start and end
    adjoint rows and the [M | S_ext] / [M^T | dS_ext] layouts the kernels must return are right, and
    every rank prepares its stream once a forward. The kernels themselves: test_emulated_on_hopper_kernels."""
    import qla_megatron.parallel.cp as cp_mod
    import qla_megatron.parallel.cp_emulation as emu_mod
    from qla_megatron.ops import segment_summary
    from qla_megatron.ops.gated_delta_rule.hopper import pieces

    calls = []

    class Local:
        def __init__(self, inputs, bounds, scale, l2norm):
            self.inputs, self.cu, self.scale, self.l2norm = inputs, torch.tensor(bounds), scale, l2norm

    def prepare_local(q, k, v, g, beta, bounds, scale, l2norm, cfg):
        calls.append("prepare")
        return Local((q, k, v, g, beta), bounds, scale, l2norm)

    def piece_summaries(local):
        calls.append("fwd")
        _, k, v, g, beta = local.inputs
        ext, M = segment_summary(k, v, g, beta, local.cu, use_qk_l2norm_in_kernel=local.l2norm)
        return torch.cat([M, ext], dim=-1)

    def run_local(local, h0, keep):
        assert h0.shape[0] == local.cu.numel() - 1
        leaves = [t.detach().requires_grad_(True) for t in local.inputs]
        with torch.enable_grad():
            o, fin = chunk_gated_delta_rule(*leaves, scale=local.scale, initial_state=h0.double(),
                                            output_final_state=True, cu_seqlens=local.cu,
                                            use_qk_l2norm_in_kernel=local.l2norm)
        return o.detach(), ((leaves, o, fin) if keep else None)

    def piece_backward_summaries(local, saved, do):
        calls.append("bwd")
        q, k, v, g, beta = local.inputs
        _, M = segment_summary(k, torch.zeros_like(v), g, beta, local.cu, use_qk_l2norm_in_kernel=local.l2norm)
        z = torch.zeros(local.cu.numel() - 1, M.shape[1], k.shape[-1], v.shape[-1], dtype=M.dtype,
                        requires_grad=True)
        with torch.enable_grad():
            o, _ = chunk_gated_delta_rule(q, k, v, g, beta, scale=local.scale, initial_state=z,
                                          cu_seqlens=local.cu, use_qk_l2norm_in_kernel=local.l2norm)
            dext, = torch.autograd.grad(o, z, do)
        return torch.cat([M.transpose(-1, -2), dext], dim=-1)

    def backward_local(local, saved, do, dht):
        leaves, o, fin = saved
        return torch.autograd.grad((o, fin), leaves, (do.to(o.dtype), dht.to(fin.dtype)))

    compose = cp_mod.compose
    monkeypatch.setattr(cp_mod, "on_kernels", lambda flat, run: True)
    monkeypatch.setattr(emu_mod, "on_kernels", lambda flat, run: True)
    monkeypatch.setattr(cp_mod, "compose", lambda *a, backend: compose(*a))
    for name, fn in (("prepare_local", prepare_local), ("piece_summaries", piece_summaries),
                     ("run_local", run_local), ("piece_backward_summaries", piece_backward_summaries),
                     ("backward_local", backward_local)):
        monkeypatch.setattr(pieces, name, fn)
    for world, layout, T_local, cu in [(4, "contiguous", 40, [0, 5, 120, 130, 160]), (4, "zigzag", 40, None),
                                       (2, "zigzag", 80, [0, 8, 136, 160])]:
        cu_t, full, do, o_ref, want = whole_sequence(world, T_local, cu)
        calls.clear()
        o = emulated_cp_chunk_gated_delta_rule(*full, cp=world, layout=layout, cu_seqlens=cu_t,
                                               use_qk_l2norm_in_kernel=True)
        got = torch.autograd.grad((o * do).sum(), full)
        assert "fwd" in calls and "bwd" in calls and calls.count("prepare") == world   # once a rank
        assert rel(o, o_ref) <= 1e-10
        for name, a, b in zip(("q", "k", "v", "g", "beta"), got, want):
            assert rel(a, b) <= 1e-10, (layout, cu, name)
