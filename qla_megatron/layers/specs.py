"""ModuleSpecs: the GDN layer, and a GPT block mixing GDN and full attention by linear_attention_freq.

Backends: "transformer_engine" (TE linear and norm modules, the input norm fused into in_proj, as
Megatron's own GDN spec), "local" (megatron-core ColumnParallelLinear / RowParallelLinear and torch
norms; no TE needed), or None: TE when it imports, local otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from qla_megatron.ops import GDNOptions

from .gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
from .norm import LocalHeadNorm, SequenceParallelTorchNorm

BACKENDS = ("transformer_engine", "local")


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: Optional[str]) -> str:
    """None -> "transformer_engine" when TE imports, else "local"; anything else is checked."""
    if backend is None:
        return "transformer_engine" if have_transformer_engine() else "local"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "transformer_engine" and not have_transformer_engine():
        raise ValueError("backend='transformer_engine' but transformer_engine does not import; "
                         "use backend='local' (or None to choose automatically)")
    return backend


def get_gdn_layer_spec(backend: Optional[str] = None, normalization: str = "RMSNorm",
                       op_backend: str = "auto", op_options: Optional[GDNOptions] = None) -> ModuleSpec:
    """ModuleSpec of qla_megatron.layers.GatedDeltaNet.

    Args:
        backend: "transformer_engine", "local" or None (see module docstring).
        normalization: "RMSNorm" or "LayerNorm", for out_norm (TE backend; local follows config).
        op_backend: backend of chunk_gated_delta_rule ("auto", "torch", "tilelang", "fla").
        op_options: qla_megatron.ops.GDNOptions of the layer's op calls (intra-card CP, the NaN/Inf
            debug check); None: the defaults (qla_megatron.ops.default_options()).

    metainfo["fuse_input_layernorm"] says whether in_proj carries the layer's input norm (TE), so
    that a TransformerLayer around it uses IdentityOp as input_layernorm.
    """
    backend = resolve_backend(backend)
    if op_options is not None and not isinstance(op_options, GDNOptions):
        raise ValueError(f"op_options must be a qla_megatron.ops.GDNOptions or None, "
                         f"got {type(op_options).__name__}")
    if normalization not in ("RMSNorm", "LayerNorm"):
        raise ValueError(f"normalization must be 'RMSNorm' or 'LayerNorm', got {normalization!r}")
    if backend == "transformer_engine":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        te = TESpecProvider()
        submodules = GatedDeltaNetSubmodules(
            in_proj=te.column_parallel_layer_norm_linear(),
            out_norm=te.layer_norm(rms_norm=normalization == "RMSNorm", for_qk=False),
            out_proj=te.row_parallel_linear())
        fused = True
    else:
        submodules = GatedDeltaNetSubmodules(in_proj=ColumnParallelLinear, out_norm=LocalHeadNorm,
                                             out_proj=RowParallelLinear)
        fused = False
    return ModuleSpec(module=GatedDeltaNet, params={"backend": op_backend, "options": op_options},
                      submodules=submodules,
                      metainfo={"fuse_input_layernorm": fused})


def linear_attention_pattern(num_layers: int, linear_attention_freq: Union[int, list, None]) -> list[int]:
    """Per layer 1 (GDN) or 0 (full attention). An int N puts attention on every N-th layer
    (N = 4: GDN, GDN, GDN, attention, ...; Qwen3-Next / Qwen3.5); a list is used as given."""
    if isinstance(linear_attention_freq, bool) or linear_attention_freq is None:
        raise ValueError(f"linear_attention_freq must be a positive int or a list of 0/1 per layer, "
                         f"got {linear_attention_freq!r}")
    if isinstance(linear_attention_freq, int):
        if linear_attention_freq < 1:
            raise ValueError(f"linear_attention_freq must be >= 1, got {linear_attention_freq}")
        return [0 if (i + 1) % linear_attention_freq == 0 else 1 for i in range(num_layers)]
    pattern = list(linear_attention_freq)
    if len(pattern) != num_layers or any(p not in (0, 1) for p in pattern):
        raise ValueError(f"linear_attention_freq as a list must hold num_layers={num_layers} entries of "
                         f"0 or 1, got {pattern}")
    return pattern


def _attention_layer_spec(config, backend: str) -> ModuleSpec:
    """Megatron's own GPT layer (full causal attention + dense MLP) for this backend; on the local
    backend its torch norms (WrappedTorchNorm, used when Apex is absent) allow sequence parallelism."""
    if backend == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    spec = get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization=config.normalization)
    sub = spec.submodules
    swap = {name: SequenceParallelTorchNorm for name in ("input_layernorm", "pre_mlp_layernorm")
            if getattr(sub, name) is WrappedTorchNorm}
    return ModuleSpec(module=spec.module, params=dict(spec.params), submodules=dataclasses.replace(sub, **swap))


def _gdn_layer_spec(attention_layer: ModuleSpec, gdn: ModuleSpec) -> ModuleSpec:
    """The attention layer with its self_attention replaced by GDN (same norms, MLP, residuals)."""
    sub = attention_layer.submodules
    fused = gdn.metainfo["fuse_input_layernorm"]
    keys_map = {k: v for k, v in sub.sharded_state_dict_keys_map.items() if not k.startswith("input_layernorm")}
    if not fused:
        # Local checkpoints name the input norm as the TE spec does (fused into in_proj), so one
        # dist checkpoint serves both backends, as Megatron's local attention layers do.
        keys_map["input_layernorm."] = "self_attention.in_proj.layer_norm_"
    gdn_sub = dataclasses.replace(sub, self_attention=gdn,
                                  input_layernorm=IdentityOp if fused else sub.input_layernorm,
                                  sharded_state_dict_keys_map=keys_map)
    return ModuleSpec(module=attention_layer.module, params=dict(attention_layer.params), submodules=gdn_sub)


def get_hybrid_layer_specs(config, backend: Optional[str] = None, op_backend: str = "auto",
                           op_options: Optional[GDNOptions] = None) -> list[ModuleSpec]:
    """One TransformerLayer spec per layer of the model, GDN or attention by
    config.linear_attention_freq (see linear_attention_pattern); op_backend and op_options as in
    get_gdn_layer_spec."""
    backend = resolve_backend(backend)
    pattern = linear_attention_pattern(config.num_layers, config.linear_attention_freq)
    attention = _attention_layer_spec(config, backend)
    gdn = _gdn_layer_spec(attention, get_gdn_layer_spec(backend, config.normalization, op_backend, op_options))
    return [gdn if p == 1 else attention for p in pattern]


def get_hybrid_block_spec(config, backend: Optional[str] = None, op_backend: str = "auto",
                          vp_stage: Optional[int] = None, pp_rank: Optional[int] = None, *,
                          op_options: Optional[GDNOptions] = None) -> TransformerBlockSubmodules:
    """TransformerBlockSubmodules for GPTModel(transformer_layer_spec=...): this pipeline stage's
    layers of the GDN / attention mix, and the final norm; op_options as in get_gdn_layer_spec."""
    backend = resolve_backend(backend)
    layers = get_hybrid_layer_specs(config, backend, op_backend, op_options)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    final_norm = _attention_layer_spec(config, backend).submodules.pre_mlp_layernorm
    if backend == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    return TransformerBlockSubmodules(layer_specs=layers[offset:offset + count], layer_norm=final_norm)
