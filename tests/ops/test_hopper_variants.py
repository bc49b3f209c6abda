"""CPU checks of the Hopper forward's variant switch ($QLA_MEGATRON_HOPPER_FORWARD): which factory each
value picks, that a bad value raises a ValueError naming the variable, and that the precompile list of
the ws variant names kernels that exist. Builds TileLang's IR for the ws kernel (front end only: no
CUDA is generated or compiled, no GPU is touched)."""

import pytest
import torch

from qla_megatron.ops.gated_delta_rule.hopper import chunk as hchunk
from qla_megatron.ops.gated_delta_rule.hopper.forward import forward_kernel
from qla_megatron.ops.gated_delta_rule.hopper.forward_ws import forward_ws_kernel


def test_default_is_the_verified_kernel(monkeypatch):
    monkeypatch.delenv(hchunk.FORWARD_ENV, raising=False)
    assert hchunk.forward_variant() == "fused"
    assert hchunk.forward_factory() is forward_kernel
    monkeypatch.setenv(hchunk.FORWARD_ENV, "")
    assert hchunk.forward_factory() is forward_kernel


def test_env_picks_ws(monkeypatch):
    monkeypatch.setenv(hchunk.FORWARD_ENV, "ws")
    assert hchunk.forward_variant() == "ws"
    assert hchunk.forward_factory() is forward_ws_kernel
    assert hchunk.forward_factory("fused") is forward_kernel       # an explicit argument wins


def test_bad_values_raise(monkeypatch):
    monkeypatch.setenv(hchunk.FORWARD_ENV, "WS2")
    with pytest.raises(ValueError, match="QLA_MEGATRON_HOPPER_FORWARD='WS2'"):
        hchunk.forward_variant()
    with pytest.raises(ValueError, match="variant='tma'"):
        hchunk.forward_variant("tma")


def test_op_reads_the_switch_before_any_gpu_work(monkeypatch):
    monkeypatch.setenv(hchunk.FORWARD_ENV, "nope")
    q = k = torch.zeros(1, 4, 1, 128)
    v = torch.zeros(1, 4, 2, 128)
    g = beta = torch.zeros(1, 4, 2)
    with pytest.raises(ValueError, match=hchunk.FORWARD_ENV):
        hchunk.chunk_gated_delta_rule_fwd(q, k, v, g, beta, None, None, True, None, True)


@pytest.mark.parametrize("l2norm", [True, False])
def test_ws_forward_set(l2norm):
    fused = hchunk.forward_set(2, 8, 128, 128, l2norm=l2norm)
    ws = hchunk.forward_set(2, 8, 128, 128, l2norm=l2norm, variant="ws")
    assert len(ws) == len(fused)
    assert ws[0] == ("prepare", (2, 8, 128, "bfloat16"), dict(l2norm=l2norm, norm_q=l2norm))
    assert {n for n, _, _ in ws[1:]} == {"forward_ws"}
    # Same task configs as the fused set, kernel config aside.
    strip = lambda kw: {k: v for k, v in kw.items() if k != "async_mma"}
    assert [strip(kw) for _, _, kw in fused[1:]] == [kw for _, _, kw in ws[1:]]
    assert fused == hchunk.forward_set(2, 8, 128, 128, l2norm=l2norm, variant="fused")


@pytest.mark.parametrize("summary", [False, True], ids=["output", "summary"])
def test_ws_kernel_builds_ir(summary):
    """Front end only: the factory parses and yields a PrimFunc with the launcher's argument order."""
    f = forward_ws_kernel.get_tir(2, 8, 128, 128, "bfloat16", summary=summary, l2norm=True, has_initial=True)
    names = [p.name.removesuffix("_handle") for p in f.params]
    assert names == ["q", "k", "v", "Gc", "Bc", "Rk", "Rq", "A", "segs", "h0", "sc", "o", "ht", "states"]
