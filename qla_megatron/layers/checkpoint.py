"""Sharded (dist-checkpoint) state dict of the GDN layer, in megatron-core 0.19's layout.

On one TP rank in_proj's rows are [q | k | v | z | beta | alpha] of that rank's heads, so its
global tensor is not the TP=1 tensor cut in tp_size pieces. Each section is therefore saved as its
own sharded tensor (`in_proj.weight.query`, `.key`, ...; conv1d as `.query`, `.key`, `.value`), which
makes a checkpoint load at any TP size. Keys and splits match Megatron's, so checkpoints of either
layer load into the other.
"""

from __future__ import annotations

from megatron.core.ssm.utils import _split_tensor_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint, sharded_state_dict_default


def gdn_sharded_state_dict(layer, prefix, sharded_offsets, metadata, tp_group):
    """ShardedStateDict of `layer` (a qla_megatron.layers.GatedDeltaNet)."""
    dp_cp_group = metadata["dp_cp_group"]
    own = {}
    layer._save_to_state_dict(own, "", keep_vars=True)  # A_log, dt_bias (no children)
    sharded = make_sharded_tensors_for_checkpoint(own, prefix, {"A_log": 0, "dt_bias": 0},
                                                  sharded_offsets, tp_group=tp_group, dp_cp_group=dp_cp_group)
    for name, module in layer.named_children():
        if name == "conv1d":
            # nn.Conv1d has no sharded_state_dict: its channels are TP-sharded on dim 0.
            axes = {"weight": 0, "bias": 0} if layer.conv_bias else {"weight": 0}
            sharded.update(make_sharded_tensors_for_checkpoint(
                module.state_dict(prefix="", keep_vars=True), f"{prefix}{name}.", axes, sharded_offsets,
                tp_group=tp_group, dp_cp_group=dp_cp_group))
        else:
            sharded.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets,
                                                      metadata, tp_group=tp_group))

    sizes = layer.sizes
    # in_proj.bias is left whole, as Megatron leaves it (so bias=True checkpoints match Megatron's,
    # but reload only at the TP size they were saved with; bias is False in Qwen3-Next/3.5).
    splits = [(f"{prefix}in_proj.weight", sizes.in_proj_split_sections, sizes.in_proj_split_names)]
    conv_names = ("query", "key", "value")
    splits.append((f"{prefix}conv1d.weight", sizes.conv_split_sections, conv_names))
    if layer.conv_bias:
        splits.append((f"{prefix}conv1d.bias", sizes.conv_split_sections, conv_names))
    for key, sections, names in splits:
        local_rows = sharded[key].data.size(0)
        if local_rows != sum(sections):
            raise ValueError(f"{key} has {local_rows} rows on this rank, expected {sum(sections)} "
                             f"(sections {list(sections)})")
        sharded[key] = _split_tensor_factory(sharded[key], list(sections), list(names), 0)
    return sharded
