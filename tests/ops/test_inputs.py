"""Every bad input raises ValueError naming the argument; the public API is importable as named."""

import pytest
import torch

from qla_megatron.ops import GDNOptions, chunk_gated_delta_rule, recurrent_gated_delta_rule, segment_summary

from .gdr_inputs import make_inputs


def base():
    q, k, v, g, beta, _ = make_inputs(1, 70, 2, 4, 8, 8, torch.float32, initial_state=False)
    return dict(q=q, k=k, v=v, g=g, beta=beta)


CASES = [
    ("q must have k's shape", lambda a: dict(q=a["q"][:, :, :1])),
    ("v must be \\[B, T, HV, V\\]", lambda a: dict(v=a["v"][:, :60])),
    ("num_v_heads \\(HV=3\\) must be evenly divisible by num_heads \\(H=2\\)",
     lambda a: dict(v=a["v"][:, :, :3], g=a["g"][..., :3], beta=a["beta"][..., :3])),
    ("g must be \\[B, T, HV\\]", lambda a: dict(g=a["g"][..., :2])),
    ("beta must be \\[B, T, HV\\]", lambda a: dict(beta=a["beta"][:, :69])),
    ("k must be \\[B, T, H, K\\]", lambda a: dict(k=a["k"][0], q=a["q"][0])),
    ("q and k must share a dtype", lambda a: dict(q=a["q"].double())),
    ("v must have k's dtype", lambda a: dict(v=a["v"].half())),
    ("g must be torch.float32", lambda a: dict(g=a["g"].double())),
    ("beta must be a floating tensor", lambda a: dict(beta=(a["beta"] > 0.5).int())),
    ("q must be a torch.Tensor", lambda a: dict(q=[1.0])),
    ("cu_seqlens requires batch size B == 1",
     lambda a: {**{n: torch.cat([t, t]) for n, t in a.items()}, "cu_seqlens": torch.tensor([0, 70])}),
    ("cu_seqlens must be int64", lambda a: dict(cu_seqlens=torch.tensor([0, 70], dtype=torch.int32))),
    ("cu_seqlens must be strictly increasing", lambda a: dict(cu_seqlens=torch.tensor([0, 30, 30, 70]))),
    ("cu_seqlens must be strictly increasing", lambda a: dict(cu_seqlens=torch.tensor([0, 40, 30, 70]))),
    ("cu_seqlens must end at T=70", lambda a: dict(cu_seqlens=torch.tensor([0, 30, 69]))),
    ("cu_seqlens must start at 0", lambda a: dict(cu_seqlens=torch.tensor([1, 30, 70]))),
    ("cu_seqlens must be 1-D", lambda a: dict(cu_seqlens=torch.tensor([[0, 70]]))),
    ("initial_state must be \\[N, HV, K, V\\] = \\(2, 4, 8, 8\\)",
     lambda a: dict(cu_seqlens=torch.tensor([0, 30, 70]), initial_state=torch.zeros(1, 4, 8, 8))),
    ("initial_state must be float32", lambda a: dict(initial_state=torch.zeros(1, 4, 8, 8, dtype=torch.bfloat16))),
    ("scale must be a positive finite number", lambda a: dict(scale=-1.0)),
    ("scale must be a positive finite number", lambda a: dict(scale=float("inf"))),
]
# The NaN/Inf scan: opt-in in the op (options.check_finite), always on in the reference.
FINITE_CASES = [
    ("q contains NaN or Inf", lambda a: dict(q=a["q"].index_fill(1, torch.tensor([5]), float("nan")))),
    ("k contains NaN or Inf", lambda a: dict(k=a["k"].index_fill(1, torch.tensor([0]), float("inf")))),
    ("v contains NaN or Inf", lambda a: dict(v=a["v"].index_fill(1, torch.tensor([33]), float("nan")))),
    ("g contains NaN or Inf", lambda a: dict(g=a["g"].index_fill(1, torch.tensor([69]), float("-inf")))),
    ("beta contains NaN or Inf", lambda a: dict(beta=a["beta"].index_fill(1, torch.tensor([7]), float("nan")))),
    ("initial_state contains NaN", lambda a: dict(initial_state=torch.full((1, 4, 8, 8), float("nan")))),
]
BACKEND_CASES = [
    ("backend must be one of", "cuda"),
    ("backend='tilelang' cannot run this call|backend must be one of", "tilelang"),
    ("backend='fla' cannot run this call", "fla"),
]


@pytest.mark.parametrize("message,change", CASES, ids=[f"{i}-{c[0][:30]}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("fn", [chunk_gated_delta_rule, recurrent_gated_delta_rule], ids=["chunk", "recurrent"])
def test_bad_input_raises(message, change, fn):
    args = base()
    args.update(change(args))
    with pytest.raises(ValueError, match=message):
        fn(**args)


@pytest.mark.parametrize("message,change", FINITE_CASES, ids=[c[0].split()[0] for c in FINITE_CASES])
def test_non_finite_input(message, change):
    """check_finite names the input; without it (the default) the op runs and the NaN shows in o;
    the recurrence (the reference) always checks."""
    args = base()
    args.update(change(args))
    with pytest.raises(ValueError, match=message):
        chunk_gated_delta_rule(**args, options=GDNOptions(check_finite=True))
    with pytest.raises(ValueError, match=message):
        recurrent_gated_delta_rule(**args)
    o, _ = chunk_gated_delta_rule(**args, options=GDNOptions(check_finite=False))
    assert not bool(torch.isfinite(o).all())


@pytest.mark.parametrize("message,backend", BACKEND_CASES, ids=[c[1] for c in BACKEND_CASES])
def test_bad_backend_raises(message, backend):
    with pytest.raises(ValueError, match=message):
        chunk_gated_delta_rule(**base(), backend=backend)


def test_segment_summary_checks_inputs_too():
    a = base()
    with pytest.raises(ValueError, match="num_v_heads"):
        segment_summary(a["k"], a["v"][:, :, :3], a["g"][..., :3], a["beta"][..., :3])


def test_public_names():
    import qla_megatron.ops as ops
    for name in ("chunk_gated_delta_rule", "recurrent_gated_delta_rule", "segment_summary",
                 "compose_segments", "segmented_chunk_gated_delta_rule"):
        assert callable(getattr(ops, name))
    import qla_megatron.layers  # noqa: F401
    import qla_megatron.parallel  # noqa: F401


def test_auto_runs_torch_on_cpu():
    a = base()
    o, s = chunk_gated_delta_rule(**a, backend="auto", output_final_state=True)
    o2, s2 = chunk_gated_delta_rule(**a, backend="torch", output_final_state=True)
    assert torch.equal(o, o2) and torch.equal(s, s2)
