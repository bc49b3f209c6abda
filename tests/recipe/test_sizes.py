"""Parameter counts against a built model, and the memory lower bound."""

from __future__ import annotations

import pytest

from qla_megatron.training.sizes import GIB, memory_lower_bound, parameter_counts

from .conftest import build_tiny_model, recipe_args


@pytest.mark.parametrize("extra", [pytest.param((), id="untied-gate-qknorm"),
                                   pytest.param(("--kv-channels", "16", "--num-query-groups", "4"), id="d16-MHA"),
                                   pytest.param(("--linear-attention-freq", "2", "--num-layers", "6"), id="freq2-L6")])
def test_parameter_count_matches_model(extra):
    args = recipe_args(*extra)
    model = build_tiny_model(args)
    assert sum(parameter_counts(args).values()) == sum(p.numel() for p in model.parameters())


def test_parameter_count_tied_embeddings():
    args = recipe_args()
    args.untie_embeddings_and_output_weights = False
    model = build_tiny_model(args)
    assert parameter_counts(args)["output_layer"] == 0
    assert sum(parameter_counts(args).values()) == sum(p.numel() for p in model.parameters())


def test_memory_lower_bound_parts():
    args = recipe_args()
    b = memory_lower_bound(args)
    params = sum(parameter_counts(args).values())
    assert b.weights == 4 * params and b.grads == 4 * params and b.optimizer == 8 * params  # fp32 Adam
    assert b.logits == 4 * args.micro_batch_size * args.seq_length * args.padded_vocab_size
    assert b.total_gib == pytest.approx((16 * params + b.logits) / GIB)


def test_megatron_gdn_impl_has_our_parameters(monkeypatch):
    """--gdn-impl megatron puts megatron-core's GatedDeltaNet in the same places with the same
    parameter names and shapes (FLA, which its constructor asks for, is not needed to build it)."""
    import megatron.core.ssm.gated_delta_net.common as mcommon
    import megatron.core.ssm.gated_delta_net.gdn as mgdn
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet as MegatronGDN

    from qla_megatron.layers import GatedDeltaNet

    args = recipe_args()
    ours = build_tiny_model(args)
    monkeypatch.setattr(mcommon, "HAVE_FLA", True)
    monkeypatch.setattr(mgdn, "chunk_gated_delta_rule", mgdn.torch_chunk_gated_delta_rule)  # FLA's, absent
    args.gdn_impl = "megatron"  # set after the checks (they refuse it where fla does not import)
    theirs = build_tiny_model(args)
    kinds = [type(layer.self_attention) for layer in theirs.decoder.layers]
    assert kinds[:3] == [MegatronGDN] * 3 and all(type(l.self_attention) is GatedDeltaNet for l in ours.decoder.layers[:3])
    assert {n: p.shape for n, p in ours.named_parameters()} == {n: p.shape for n, p in theirs.named_parameters()}
