"""GDNOptions: built from the environment in one place, read once, passed by argument to every backend."""

import os
import pathlib
import re

import pytest
import torch

import qla_megatron
from qla_megatron.ops import GDNOptions, IntraCPConfig, chunk_gated_delta_rule, default_options
from qla_megatron.ops.gated_delta_rule import backends, tilelang_backend
from qla_megatron.ops.gated_delta_rule.options import ENV_VARS, options_from_env

from .gdr_inputs import make_inputs


def inputs(T=70):
    q, k, v, g, beta, _ = make_inputs(1, T, 2, 4, 8, 8, torch.float32, initial_state=False)
    return q, k, v, g, beta


@pytest.fixture
def clean_defaults(monkeypatch):
    """No QLA_MEGATRON_* variable set and default_options() not yet read; afterwards the cache is
    cleared again, so later tests read the real environment."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    default_options.cache_clear()
    yield monkeypatch
    default_options.cache_clear()


def test_env_parsing():
    assert options_from_env({}) == GDNOptions()
    assert GDNOptions().check_finite is False and GDNOptions().intra_cp == IntraCPConfig()
    got = options_from_env({"QLA_MEGATRON_CHECK_FINITE": "1", "QLA_MEGATRON_INTRA_CP": "0",
                            "QLA_MEGATRON_INTRA_CP_SEGMENT": "512", "QLA_MEGATRON_INTRA_CP_MODE": "exact",
                            "QLA_MEGATRON_INTRA_CP_WARMUP": "2"})
    assert got == GDNOptions(intra_cp=IntraCPConfig(enabled=False, segment_len=512, mode="exact",
                                                    warmup_chunks=2), check_finite=True)
    assert options_from_env({"QLA_MEGATRON_CHECK_FINITE": "0", "QLA_MEGATRON_INTRA_CP_MODE": ""}) == GDNOptions()


@pytest.mark.parametrize("name,value,match", [
    ("QLA_MEGATRON_CHECK_FINITE", "yes", r"QLA_MEGATRON_CHECK_FINITE must be 0 or 1, got 'yes'"),
    ("QLA_MEGATRON_INTRA_CP", "off", r"QLA_MEGATRON_INTRA_CP must be 0 or 1, got 'off'"),
    ("QLA_MEGATRON_INTRA_CP_SEGMENT", "1k", r"QLA_MEGATRON_INTRA_CP_SEGMENT must be an integer, got '1k'"),
    ("QLA_MEGATRON_INTRA_CP_SEGMENT", "100",
     r"QLA_MEGATRON_INTRA_CP_\*: .*segment_len must be a positive multiple of 64.*100"),
    ("QLA_MEGATRON_INTRA_CP_MODE", "fast", r"QLA_MEGATRON_INTRA_CP_\*: .*mode must be 'exact' or 'gate', got 'fast'"),
    ("QLA_MEGATRON_INTRA_CP_WARMUP", "0", r"QLA_MEGATRON_INTRA_CP_\*: .*warmup_chunks must be an int >= 1, got 0"),
])
def test_bad_env_values_name_the_variable(name, value, match):
    with pytest.raises(ValueError, match=match):
        options_from_env({name: value})


@pytest.mark.parametrize("build,match", [
    (lambda: GDNOptions(check_finite=1), r"GDNOptions.check_finite must be a bool, got 1"),
    (lambda: GDNOptions(intra_cp=False), r"GDNOptions.intra_cp must be an IntraCPConfig, got bool"),
    (lambda: IntraCPConfig(segment_len=96), r"segment_len must be a positive multiple of 64 tokens or None, got 96"),
    (lambda: IntraCPConfig(segment_len=0), r"segment_len must be a positive multiple of 64"),
    (lambda: IntraCPConfig(enabled="no"), r"intra-CP enabled must be a bool, got 'no'"),
], ids=["check-int", "intra-bool", "seg96", "seg0", "enabled-str"])
def test_bad_options(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_op_refuses_other_options():
    with pytest.raises(ValueError, match=r"options must be a qla_megatron.ops.GDNOptions or None, got dict"):
        chunk_gated_delta_rule(*inputs(), options={"check_finite": True})


def test_env_is_read_once(clean_defaults):
    """The first default_options() reads the environment; later changes are not seen by the op (no
    per-call reading), and an explicit GDNOptions wins."""
    clean_defaults.setenv("QLA_MEGATRON_INTRA_CP_SEGMENT", "256")
    first = default_options()
    assert first.intra_cp.segment_len == 256 and not first.check_finite
    clean_defaults.setenv("QLA_MEGATRON_CHECK_FINITE", "1")
    assert default_options() is first
    q, k, v, g, beta = inputs()
    q = q.index_fill(1, torch.tensor([3]), float("nan"))
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta)               # the default read before: no scan
    assert torch.isnan(o).any()
    with pytest.raises(ValueError, match="q contains NaN"):
        chunk_gated_delta_rule(q, k, v, g, beta, options=GDNOptions(check_finite=True))


def test_check_finite_from_env(clean_defaults):
    clean_defaults.setenv("QLA_MEGATRON_CHECK_FINITE", "1")
    q, k, v, g, beta = inputs()
    with pytest.raises(ValueError, match="beta contains NaN"):
        chunk_gated_delta_rule(q, k, v, g, beta.index_fill(1, torch.tensor([0]), float("nan")))


def test_op_hands_options_to_the_backend(monkeypatch):
    seen = []
    torch_backend = backends._REGISTRY["torch"]

    def spy(*args):
        seen.append(args[-1])
        return torch_backend.run(*args)

    monkeypatch.setitem(backends._REGISTRY, "torch", backends.Backend("torch", torch_backend.unsupported, spy))
    mine = GDNOptions(intra_cp=IntraCPConfig(enabled=False), check_finite=True)
    chunk_gated_delta_rule(*inputs(), backend="torch", options=mine)
    chunk_gated_delta_rule(*inputs(), backend="torch")
    assert seen[0] is mine and seen[1] is default_options()


def test_tilelang_backend_passes_intra_cp(monkeypatch):
    """tilelang_backend.run -> hopper/autograd.py run(..., intra_cp=options.intra_cp), checked on the CPU
    with the Hopper entry replaced by a recorder."""
    from qla_megatron.ops.gated_delta_rule.hopper import autograd

    seen = {}
    monkeypatch.setattr(autograd, "run", lambda *a, intra_cp=None: seen.setdefault("intra_cp", intra_cp))
    cfg = IntraCPConfig(segment_len=128, mode="exact", warmup_chunks=3)
    tilelang_backend.run(*inputs(), None, None, False, None, True, GDNOptions(intra_cp=cfg))
    assert seen["intra_cp"] is cfg


def test_torch_backend_ignores_intra_cp():
    args = inputs(T=200)
    cu = torch.tensor([0, 70, 200])
    ref = chunk_gated_delta_rule(*args, cu_seqlens=cu, backend="torch", output_final_state=True)
    for cfg in (IntraCPConfig(enabled=False), IntraCPConfig(segment_len=64, mode="exact")):
        got = chunk_gated_delta_rule(*args, cu_seqlens=cu, backend="torch", output_final_state=True,
                                     options=GDNOptions(intra_cp=cfg))
        assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_environment_is_read_only_in_options_py():
    """Nothing in the op, the layer or the parallel code reads the environment but options.py."""
    root = pathlib.Path(qla_megatron.__file__).parent
    pattern = re.compile(r"os\.environ|os\.getenv|getenv\(")
    readers = sorted(str(p.relative_to(root)) for sub in ("ops", "layers", "parallel")
                     for p in (root / sub).rglob("*.py") if pattern.search(p.read_text()))
    assert readers == [os.path.join("ops", "gated_delta_rule", "options.py")], readers
    readme = (root.parent / "README.md").read_text()
    assert [name for name in ENV_VARS if name not in readme] == []
