"""The model provider of the recipe: a megatron-core GPTModel whose decoder is our hybrid block
(GDN layers and full-attention layers by --linear-attention-freq), with our GDN layer or, for
comparisons, megatron-core's own GatedDeltaNet in the same places (--gdn-impl megatron).

Megatron's `pretrain` and our CPU loop call the same `model_provider`.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron.core.transformer.spec_utils import ModuleSpec

from qla_megatron.layers import GatedDeltaNet, get_hybrid_block_spec
from qla_megatron.layers.specs import resolve_backend

from .arguments import gdn_options
from .attention import SDPACoreAttention


def _with_gdn(layer: ModuleSpec, module, params: dict) -> ModuleSpec:
    """`layer` (a TransformerLayer spec) with its GDN self_attention built as `module`(**params)."""
    sub = layer.submodules
    gdn = dataclasses.replace(sub.self_attention, module=module, params=params)
    return dataclasses.replace(layer, submodules=dataclasses.replace(sub, self_attention=gdn))


def _with_core_attention(layer: ModuleSpec, module) -> ModuleSpec:
    sub = layer.submodules
    attn = sub.self_attention
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules, core_attention=module))
    return dataclasses.replace(layer, submodules=dataclasses.replace(sub, self_attention=attn))


def uses_sdpa(args) -> bool:
    """--core-attention auto: SDPA on megatron-core's local modules, TE's attention on TE's."""
    if args.core_attention != "auto":
        return args.core_attention == "sdpa"
    backend = None if args.spec_backend == "auto" else args.spec_backend
    return resolve_backend(backend) == "local"


def hybrid_block_spec(config, args, vp_stage=None):
    """The decoder block spec for --gdn-impl, --gdn-backend, --spec-backend, --core-attention and
    our layer's op options (--intra-cp*, --gdn-check-finite)."""
    backend = None if args.spec_backend == "auto" else args.spec_backend
    block = get_hybrid_block_spec(config, backend=backend, op_backend=args.gdn_backend, vp_stage=vp_stage)
    sdpa = uses_sdpa(args)
    layers = []
    for layer in block.layer_specs:
        if layer.submodules.self_attention.module is not GatedDeltaNet:
            if sdpa:
                layer = _with_core_attention(layer, SDPACoreAttention)
        else:
            if args.gdn_impl == "megatron":
                from megatron.core.ssm.gated_delta_net import GatedDeltaNet as MegatronGDN

                layer = _with_gdn(layer, MegatronGDN, {})
            else:
                # zigzag: the layout of Megatron's CP batch split (data.get_batch)
                layer = _with_gdn(layer, GatedDeltaNet, {"backend": args.gdn_backend, "cp_layout": "zigzag",
                                                         "options": gdn_options(args)})
        layers.append(layer)
    return dataclasses.replace(block, layer_specs=layers)


def build_model(args, config, pre_process=True, post_process=True, vp_stage=None, pg_collection=None):
    """GPTModel of the hybrid block from Megatron's args and TransformerConfig."""
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config=config, transformer_layer_spec=hybrid_block_spec(config, args, vp_stage),
        vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process, post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy, parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base, pg_collection=pg_collection, vp_stage=vp_stage)


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """Megatron's model-provider contract, on megatron.training's global args."""
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    args = get_args()
    if config is None:
        config = core_transformer_config_from_args(args)
    model = build_model(args, config, pre_process, post_process, vp_stage, pg_collection)
    if args.time_breakdown:
        from .breakdown import RegionTimer, attach

        attach(model, RegionTimer("cuda" if torch.cuda.is_available() else "cpu"))
    return model
