"""The hybrid block spec in a GPTModel without Transformer Engine: the layer mix, training at TP = 2,
and dist checkpoints saved at TP = 2, loaded at TP = 1 and back with the same outputs."""

import os

import torch

from .spawn import run_on_ranks

VOCAB, SEQ, BATCH = 64, 16, 2


def _gpt(tp: int, seed: int):
    from megatron.core.models.gpt import GPTModel

    from qla_megatron.layers import get_hybrid_block_spec

    from .mcore_setup import gdn_config, set_model_parallel

    pg = set_model_parallel(tp=tp, seed=seed)
    config = gdn_config(hidden=32, hk=2, hv=4, dk=8, dv=8, tp=tp, num_layers=4, linear_attention_freq=4,
                        gated_linear_unit=True, ffn_hidden_size=64, num_query_groups=2)
    model = GPTModel(config, transformer_layer_spec=get_hybrid_block_spec(config, backend="local"),
                     vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope",
                     pg_collection=pg)
    return model


def _batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
    return tokens[:, :-1], position_ids, tokens[:, 1:]


def _token_losses(model, seed):
    tokens, position_ids, labels = _batch(seed)
    return model(tokens, position_ids, attention_mask=None, labels=labels)  # [b, s] per-token loss


def _train_rank(rank, world_size, seed):
    from qla_megatron.layers import GatedDeltaNet

    model = _gpt(tp=world_size, seed=seed)
    kinds = [type(layer.self_attention).__name__ for layer in model.decoder.layers]
    assert kinds == ["GatedDeltaNet"] * 3 + ["SelfAttention"], kinds
    assert all(isinstance(layer.self_attention, GatedDeltaNet) for layer in model.decoder.layers[:3])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = _token_losses(model, seed).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0], losses
    # Replicated weights (norms, out_norm) stay identical across TP ranks after the steps.
    for name, p in model.named_parameters():
        if not getattr(p, "tensor_model_parallel", False):
            others = [torch.empty_like(p) for _ in range(world_size)]
            torch.distributed.all_gather(others, p.detach())
            assert all(torch.equal(o, others[0]) for o in others), name


def test_hybrid_gpt_trains_at_tp2(fresh_seed):
    run_on_ranks(2, _train_rank, fresh_seed)


def _save(model, path):
    from megatron.core import dist_checkpointing

    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), path)


def _load(model, path):
    from megatron.core import dist_checkpointing

    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), path), strict=True)


def _checkpoint_rank(rank, world_size, seed, root):
    from .mcore_setup import rel_err

    with torch.no_grad():
        tp2 = _gpt(tp=2, seed=seed)
        want = _token_losses(tp2, seed)
        _save(tp2, f"{root}/tp2")
        tp1 = _gpt(tp=1, seed=seed + 1)  # different init: everything must come from the checkpoint
        assert rel_err(_token_losses(tp1, seed), want) > 1e-3
        _load(tp1, f"{root}/tp2")
        assert rel_err(_token_losses(tp1, seed), want) <= 1e-5
        _save(tp1, f"{root}/tp1")
        back = _gpt(tp=2, seed=seed + 2)
        _load(back, f"{root}/tp1")
        assert rel_err(_token_losses(back, seed), want) <= 1e-5


def test_dist_checkpoint_tp2_to_tp1_and_back(tmp_path, fresh_seed):
    run_on_ranks(2, _checkpoint_rank, fresh_seed, str(tmp_path))


def test_hybrid_pattern_and_specs(single_rank):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from qla_megatron.layers import GatedDeltaNet, get_gdn_layer_spec, get_hybrid_layer_specs, linear_attention_pattern

    from .mcore_setup import gdn_config

    assert linear_attention_pattern(8, 4) == [1, 1, 1, 0, 1, 1, 1, 0]
    assert linear_attention_pattern(3, [0, 1, 0]) == [0, 1, 0]
    spec = get_gdn_layer_spec(backend="local")
    assert spec.module is GatedDeltaNet and spec.submodules.in_proj is ColumnParallelLinear
    assert spec.metainfo["fuse_input_layernorm"] is False
    config = gdn_config(num_layers=6, linear_attention_freq=3)
    layers = get_hybrid_layer_specs(config, backend="local")
    assert [s.submodules.self_attention.module is GatedDeltaNet for s in layers] == [True, True, False] * 2
    # A local GDN layer names its input norm like the TE spec (fused in in_proj) in checkpoints.
    assert layers[0].submodules.sharded_state_dict_keys_map["input_layernorm."] == "self_attention.in_proj.layer_norm_"


def _sp_rank(rank, world_size, seed):
    """SP on and off at TP = 2, same weights: same per-token losses, and the same gradients once the
    partial norm gradients of SP (params marked sequence_parallel) are summed over TP, as Megatron's
    finalize_model_grads does."""
    from megatron.core.models.gpt import GPTModel

    from qla_megatron.layers import get_hybrid_block_spec

    from .mcore_setup import gdn_config, rel_err, set_model_parallel

    results = []
    for sp in (False, True):
        pg = set_model_parallel(tp=world_size, seed=seed)
        config = gdn_config(hidden=32, hk=2, hv=4, dk=8, dv=8, tp=world_size, sp=sp, num_layers=4,
                            linear_attention_freq=4, gated_linear_unit=True, ffn_hidden_size=64,
                            num_query_groups=2)
        model = GPTModel(config, transformer_layer_spec=get_hybrid_block_spec(config, backend="local"),
                         vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope",
                         pg_collection=pg)
        losses = _token_losses(model, seed)
        losses.mean().backward()
        marked = 0
        for p in model.parameters():
            if getattr(p, "sequence_parallel", False):
                torch.distributed.all_reduce(p.grad, group=pg.tp)
                marked += 1
        results.append((losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, marked))
    (l_off, g_off, _), (l_on, g_on, marked) = results
    assert marked > 0, "SP must mark the norm weights"
    assert rel_err(l_on, l_off) <= 1e-5
    for name in g_off:
        assert rel_err(g_on[name], g_off[name]) <= 1e-5, name


def test_hybrid_gpt_sequence_parallel_equals_off_at_tp2(fresh_seed):
    run_on_ranks(2, _sp_rank, fresh_seed)
