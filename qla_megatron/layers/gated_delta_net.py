"""Gated DeltaNet as a Megatron-core module: a drop-in for megatron.core.ssm.gated_delta_net.GatedDeltaNet.

Same constructor, forward contract, parameter names, shapes, tensor-parallel attributes and sharded
checkpoint layout as megatron-core 0.19's layer, so state dicts and dist checkpoints move between the
two. The sequence mixing runs through `qla_megatron.ops.chunk_gated_delta_rule` (any backend), with
grouped value heads by indexing (q and k are never repeated) and packed sequences as cu_seqlens.

Data flow on one TP rank (shapes: s tokens, b batch, per-rank head counts hk, hv):

    hidden [s/sp, b, h] -in_proj-> [s, b, q|k|v|z|beta|alpha] -> causal conv + SiLU on q|k|v
    -> chunk_gated_delta_rule(q, k, v, g, beta) [b, s, hv, V] -> RMSNorm(o) * SiLU(z) -out_proj->
    ([s/sp, b, h], bias)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.ssm.gated_delta_net import GatedDeltaNetSubmodules
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module

from qla_megatron.ops import GDNOptions, chunk_gated_delta_rule
from qla_megatron.ops.gated_delta_rule.options import resolve_options
from qla_megatron.parallel import cp_causal_depthwise_conv1d, cp_chunk_gated_delta_rule
from qla_megatron.parallel.layouts import check_layout

from .checkpoint import gdn_sharded_state_dict
from .config import gdn_sizes
from .conv import causal_depthwise_conv1d
from .kernels import causal_conv1d_silu, gate_head, gated_rms_norm
from .inputs import check_hidden_states, packed_cu_seqlens

__all__ = ["GatedDeltaNet", "GatedDeltaNetSubmodules"]


class GatedDeltaNet(MegatronModule):
    """Gated DeltaNet layer (Qwen3-Next / Qwen3.5 linear attention), tensor and sequence parallel.

    Args (Megatron's, in Megatron's order):
        config: TransformerConfig; reads linear_num_key_heads, linear_num_value_heads,
            linear_key_head_dim, linear_value_head_dim, linear_conv_kernel_dim, layernorm_epsilon,
            sequence_parallel, params_dtype, init_method, output_layer_init_method.
        submodules: GatedDeltaNetSubmodules(in_proj, out_norm, out_proj) (see specs.py).
        layer_number: this layer's 1-based number in the block.
        bias: bias in in_proj and out_proj.
        conv_bias: bias in the depthwise conv.
        conv_init: if set, conv weights init uniform in [-conv_init, conv_init] (else torch's default).
        use_qk_l2norm: L2-normalise q and k (eps 1e-6, inside the op).
        A_init_range: A = exp(A_log) starts uniform in this range (0 <= low <= high).
        pg_collection: ProcessGroupCollection with `tp` and `cp` (required).
        name: module name, passed to the linear layers.
        cp_comm_type: accepted for TransformerLayer compatibility, unused.
        cp_layout: how the sequence is split over pg_collection.cp ranks, "zigzag" (what Megatron's
            GPT batches use with context parallelism) or "contiguous".
        backend: backend of chunk_gated_delta_rule ("auto", "torch", "tilelang", "fla").
        options: qla_megatron.ops.GDNOptions of every op call (intra-card CP of the Hopper kernels,
            the NaN/Inf debug check); None: qla_megatron.ops.default_options(), read here once.
            With options.check_finite the forward also scans hidden_states (ValueError naming it)
            and checks packed offsets held on a GPU; without it (the default) the layer does not
            wait for the device and packed offsets stay there.

    Context parallelism (pg_collection.cp of size > 1): each rank holds its shard of the sequence in
    `cp_layout`; the causal conv takes its halo of kernel-1 tokens from the rank before, and the
    delta rule starts each local segment from the state its predecessors pass
    (qla_megatron.parallel): no all-to-all of activations, no limit from the head count. Only
    `causal_conv` and `gated_delta_rule` see sequence boundaries. Packed sequences with CP take
    Megatron's THD layout (global cu_seqlens, every sequence split into 2 cp pieces, zigzag).
    """

    def __init__(self, config, submodules: GatedDeltaNetSubmodules, layer_number: Optional[int] = None,
                 bias: bool = False, conv_bias: bool = False, conv_init: Optional[float] = None,
                 use_qk_l2norm: bool = True, A_init_range: tuple[float, float] = (1, 16),
                 pg_collection=None, *, name: Optional[str] = None, cp_comm_type: Optional[str] = None,
                 backend: str = "auto", cp_layout: str = "zigzag", options: Optional[GDNOptions] = None):
        super().__init__(config)
        if pg_collection is None or not hasattr(pg_collection, "tp") or not hasattr(pg_collection, "cp"):
            raise ValueError(f"pg_collection must be a ProcessGroupCollection with tp and cp groups, "
                             f"got {pg_collection!r}")
        low, high = A_init_range
        if not 0 <= low <= high:
            raise ValueError(f"A_init_range must satisfy 0 <= low <= high, got {tuple(A_init_range)}")
        self.pg_collection = pg_collection
        self.tp_size = pg_collection.tp.size()
        self.cp_size = pg_collection.cp.size()
        self.sizes = gdn_sizes(config, self.tp_size, self.cp_size)
        self.layer_number = layer_number
        self.bias, self.conv_bias, self.conv_init = bias, conv_bias, conv_init
        self.use_qk_l2norm = use_qk_l2norm
        self.A_init_range = (low, high)
        self.backend = backend
        self.options = resolve_options(options)  # resolved once here: no per-call default look-up
        check_layout(cp_layout)
        self.cp_layout = cp_layout
        # The conv + SiLU, decay head and gated norm as Triton kernels on CUDA tensors (layers.kernels);
        # the CPU always runs the torch path. Set False to run the torch path on a GPU too (a debug and
        # comparison switch, e.g. the GPU tests of the kernels against it).
        self.triton_kernels = True
        # Selective recompute of the gated out_norm (Megatron's "gdn_norm_out"): its output, the
        # out_proj input, is freed after the forward and recomputed when out_proj's gradient arrives.
        self.recompute_norm_out = (config.recompute_granularity == "selective"
                                   and "gdn_norm_out" in (config.recompute_modules or ()))
        s = self.sizes
        # Megatron's attribute names, read by its checkpoint converters and tests.
        self.in_proj_dim = s.in_proj_dim
        self.in_proj_split_sections = s.in_proj_split_sections
        self.in_proj_split_names = list(s.in_proj_split_names)
        self.conv_dim_local_tp = s.conv_dim_local_tp
        self.qk_dim_local_tp, self.v_dim_local_tp = s.qk_dim_local_tp, s.v_dim_local_tp

        # Registration order as in Megatron (in_proj, conv1d, dt_bias, A_log, out_norm, out_proj), so
        # state dicts list the same keys in the same order.
        self.in_proj = build_module(
            submodules.in_proj, config.hidden_size, s.in_proj_dim, config=config,
            init_method=config.init_method, gather_output=False, bias=bias, skip_bias_add=False,
            is_expert=False, tp_comm_buffer_name="fc1", tp_group=pg_collection.tp,
            name=f"{name}.in_proj" if name is not None else None)
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.conv1d = nn.Conv1d(s.conv_dim_local_tp, s.conv_dim_local_tp, kernel_size=s.conv_kernel_dim,
                                groups=s.conv_dim_local_tp, bias=conv_bias, padding=s.conv_kernel_dim - 1,
                                device=device, dtype=config.params_dtype)
        self.dt_bias = nn.Parameter(torch.empty(s.num_v_heads_local_tp, device=device,
                                                dtype=config.params_dtype))
        self.A_log = nn.Parameter(torch.empty(s.num_v_heads_local_tp, device=device,
                                              dtype=config.params_dtype))
        for p in (*self.conv1d.parameters(), self.dt_bias, self.A_log):
            p.tensor_model_parallel = True  # per-head (or per-channel) slices on dim 0, like in_proj rows
            p.partition_dim = 0
        self.out_norm = build_module(submodules.out_norm, config=config, hidden_size=s.value_head_dim,
                                     eps=config.layernorm_epsilon)
        self._sum_out_norm_grads_over_tp()
        self.out_proj = build_module(
            submodules.out_proj, s.v_dim, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=bias, input_is_parallel=True,
            skip_bias_add=True, is_expert=False, tp_comm_buffer_name="fc2", tp_group=pg_collection.tp,
            name=f"{name}.out_proj" if name is not None else None)
        self.reset_parameters()

    def _sum_out_norm_grads_over_tp(self):
        """out_norm's weight is shared by all heads, and TP ranks hold different heads: its true
        gradient is the sum over TP ranks. Megatron relies on finalize_model_grads, which sums only
        weights marked `sequence_parallel` and only when config.sequence_parallel is on (so at TP > 1
        without SP its out_norm replicas drift apart). Here every rank's .grad is the full sum, and
        the mark is cleared so that finalize_model_grads does not add it a second time."""
        for p in self.out_norm.parameters():
            p.sequence_parallel = False
            if self.tp_size > 1:
                p.register_hook(self._all_reduce_over_tp)

    def _all_reduce_over_tp(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=self.pg_collection.tp)
        return grad

    def reset_parameters(self):
        """Megatron's init, in the model-parallel RNG stream: dt_bias = 1, A_log = log U(A_init_range),
        conv weights U(+-conv_init) if conv_init is set."""
        if not self.config.perform_initialization:
            return
        with get_cuda_rng_tracker().fork(), torch.no_grad():
            if self.conv_init is not None:
                nn.init.uniform_(self.conv1d.weight, -self.conv_init, self.conv_init)
            self.dt_bias.fill_(1.0)
            A = torch.empty_like(self.A_log).uniform_(*self.A_init_range)
            self.A_log.copy_(torch.log(A))

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                inference_context=None, packed_seq_params: Optional[PackedSeqParams] = None,
                sequence_len_offset: Optional[int] = None, *, inference_params=None, **kwargs):
        """hidden_states [s, b, h] (s/tp tokens per rank with sequence parallelism) -> (out, bias),
        out [s, b, h] like hidden_states and bias the out_proj bias (None without bias).

        attention_mask is unused (the layer is causal by construction). packed_seq_params with
        qkv_format "thd" (b == 1) runs each packed sequence from a zero state; its offsets are
        checked as inputs.packed_cu_seqlens says (ValueError naming the field).
        """
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("GatedDeltaNet does not support inference (no recurrent-state cache) yet")
        check_hidden_states(hidden_states, self.config.hidden_size, self.options.check_finite)
        s = self.sizes
        qkvzba, _ = self.in_proj(hidden_states)  # [s, b, in_proj_dim / tp]; SP gathers the sequence
        seq_len, batch, _ = qkvzba.shape
        cu_seqlens = packed_cu_seqlens(packed_seq_params, seq_len, batch, self.cp_size, qkvzba.device,
                                       check_values=self.options.check_finite)
        qkvzba = qkvzba.transpose(0, 1)  # [b, s, ...]: the op's layout
        hv = s.num_v_heads_local_tp
        qkv, z, beta, alpha = torch.split(qkvzba, [s.conv_dim_local_tp, s.v_dim_local_tp, hv, hv], dim=-1)

        fused = self.uses_kernels(qkvzba)
        qkv = self.causal_conv(qkv, cu_seqlens, fused)  # conv + SiLU
        q, k, v = torch.split(qkv, list(s.conv_split_sections), dim=-1)
        q = q.reshape(batch, seq_len, s.num_k_heads_local_tp, s.key_head_dim)
        k = k.reshape(batch, seq_len, s.num_k_heads_local_tp, s.key_head_dim)
        v = v.reshape(batch, seq_len, hv, s.value_head_dim)
        # Decay in float32 (float64 for float64 inputs): g = -exp(A_log) * softplus(alpha + dt_bias) <= 0.
        if fused:
            g, beta = gate_head(alpha, beta, self.A_log, self.dt_bias)
        else:
            gdt = torch.promote_types(alpha.dtype, torch.float32)
            g = -self.A_log.to(gdt).exp() * F.softplus(alpha.to(gdt) + self.dt_bias.to(gdt))
            beta = beta.sigmoid()
        o = self.gated_delta_rule(q, k, v, g, beta, cu_seqlens)

        z = z.reshape(batch, seq_len, hv, s.value_head_dim)
        if not self.recompute_norm_out:
            return self.out_proj(self._gated_norm(o, z))  # row-parallel: all-reduce (or reduce-scatter)
        # fp8=None unless FP8 training: megatron-core 0.19 treats any non-None value, False included,
        # as FP8 and then needs Transformer Engine (so its own layer's norm-out recompute needs TE).
        checkpoint = tensor_parallel.CheckpointWithoutOutput(fp8=self.config.fp8 or self.config.fp4)
        out, bias = self.out_proj(checkpoint.checkpoint(self._gated_norm, o, z))
        checkpoint.discard_output_and_register_recompute(out)
        return out, bias

    # --- sequence mixing: the CP seam -------------------------------------------------------------

    def uses_kernels(self, t: torch.Tensor) -> bool:
        """Whether this call runs the Triton kernels (conv + SiLU, decay head, gated norm): CUDA
        tensors of a half or float32 dtype with `triton_kernels` on; otherwise the torch path."""
        return self.triton_kernels and t.is_cuda and t.dtype in (torch.float16, torch.bfloat16, torch.float32)

    def causal_conv(self, qkv: torch.Tensor, cu_seqlens: Optional[torch.Tensor], fused: bool = False) -> torch.Tensor:
        """SiLU of the depthwise causal conv over [b, s, conv_dim_local_tp]; packed sequences kept
        apart. Under CP, the kernel-1 tokens before each local segment come from their owner (conv
        halo). fused: one Triton kernel reading qkv in place (layers.kernels.causal_conv1d_silu)."""
        w, b = self.conv1d.weight, self.conv1d.bias
        if self.cp_size > 1:
            return cp_causal_depthwise_conv1d(qkv, w, b, cp_group=self.pg_collection.cp, layout=self.cp_layout,
                                              cu_seqlens=cu_seqlens, silu=True, fused=fused)
        if fused:
            return causal_conv1d_silu(qkv, w, b, cu_seqlens=cu_seqlens)
        return F.silu(causal_depthwise_conv1d(qkv, w, b, cu_seqlens))

    def gated_delta_rule(self, q, k, v, g, beta, cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
        """q, k [b, s, hk, K], v [b, s, hv, V], g, beta [b, s, hv] -> o [b, s, hv, V].
        Under CP, each local segment starts from the state its predecessors pass."""
        if self.cp_size > 1:
            return cp_chunk_gated_delta_rule(q, k, v, g, beta, cp_group=self.pg_collection.cp,
                                             layout=self.cp_layout, cu_seqlens=cu_seqlens,
                                             use_qk_l2norm_in_kernel=self.use_qk_l2norm, backend=self.backend,
                                             options=self.options)
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu_seqlens,
                                      use_qk_l2norm_in_kernel=self.use_qk_l2norm, backend=self.backend,
                                      options=self.options)
        return o

    # ------------------------------------------------------------------------------------------------

    def _gated_norm(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """o, z [b, s, hv, V] -> [s, b, hv * V]: RMSNorm over each value head times SiLU of the output
        gate z (in float32 at least), in out_proj's layout. With the kernels and a torch RMSNorm
        out_norm: one Triton kernel, fp32 in registers, stored in out_proj's layout."""
        b, s_len, hv, dv = o.shape
        norm = self.out_norm
        if (self.uses_kernels(o) and type(norm) is torch.nn.RMSNorm and norm.weight is not None
                and dv <= 8192):
            eps = norm.eps if norm.eps is not None else torch.finfo(o.dtype).eps
            o = o if o.stride(-1) == 1 else o.contiguous()
            return gated_rms_norm(o, z, norm.weight, eps, out_layout="sbd")
        normed = self.out_norm(o.reshape(-1, dv))
        gate = z.reshape(-1, dv).to(torch.promote_types(z.dtype, torch.float32))
        out = (normed * F.silu(gate)).to(o.dtype)
        return out.reshape(b, s_len, hv * dv).transpose(0, 1).contiguous()

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None, tp_group=None):
        """Dist-checkpoint layout of Megatron's layer: in_proj and conv split into their named
        sections, each sharded over TP on dim 0, so a checkpoint loads at any TP size."""
        metadata = dict(metadata or {})
        if "dp_cp_group" not in metadata:
            metadata["dp_cp_group"] = (self.pg_collection.dp_cp if hasattr(self.pg_collection, "dp_cp")
                                       else parallel_state.get_data_parallel_group(with_context_parallel=True))
        return gdn_sharded_state_dict(self, prefix, sharded_offsets, metadata,
                                      tp_group if tp_group is not None else self.pg_collection.tp)

    def backward_dw(self):
        """Delayed weight-gradient computation of the two projections (Megatron's hook)."""
        self.in_proj.backward_dw()
        self.out_proj.backward_dw()
