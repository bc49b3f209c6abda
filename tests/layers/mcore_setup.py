"""Shared set-up for the layer tests: gloo process groups on CPU, small GDN configs, Megatron's own
GDN layer on its torch path, and splitting TP=1 weights into TP shards."""

from __future__ import annotations

import copy
import os
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F

from qla_megatron.layers.cpu_compat import enable_megatron_on_cpu, seed_model_parallel_rng

enable_megatron_on_cpu()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402

from qla_megatron.layers import GatedDeltaNet, GatedDeltaNetSubmodules, LocalHeadNorm  # noqa: E402

LOCAL_SUBMODULES = GatedDeltaNetSubmodules(in_proj=ColumnParallelLinear, out_norm=LocalHeadNorm,
                                           out_proj=RowParallelLinear)


def init_gloo(rank: int, world_size: int, init_file: str) -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)


def init_single_process() -> None:
    """A one-rank gloo world in this process (idempotent), with model parallel groups of size 1."""
    if not dist.is_initialized():
        fd, path = tempfile.mkstemp(prefix="qla_gloo_")
        os.close(fd)
        os.remove(path)
        init_gloo(0, 1, path)
    set_model_parallel(tp=1)


def set_model_parallel(tp: int, sp: bool = False, seed: int = 1234) -> ProcessGroupCollection:
    """(Re)build Megatron's parallel groups for this TP size; returns the ProcessGroupCollection."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    if torch.cuda.is_available():  # a GPU host (the gpu-marked tests): Megatron's own CUDA RNG tracker
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
    else:
        seed_model_parallel_rng(seed, parallel_state.get_tensor_model_parallel_rank())
    return ProcessGroupCollection.use_mpu_process_groups()


def gdn_config(hidden=32, hk=2, hv=4, dk=8, dv=8, conv=4, tp=1, sp=False, dtype=torch.float32, **extra):
    kw = dict(num_layers=extra.pop("num_layers", 1), hidden_size=hidden, num_attention_heads=4,
              linear_num_key_heads=hk, linear_num_value_heads=hv, linear_key_head_dim=dk,
              linear_value_head_dim=dv, linear_conv_kernel_dim=conv, normalization="RMSNorm",
              activation_func=F.silu, tensor_model_parallel_size=tp, sequence_parallel=sp,
              use_cpu_initialization=True, params_dtype=dtype, hidden_dropout=0.0, attention_dropout=0.0,
              bf16=dtype == torch.bfloat16)
    kw.update(extra)
    return TransformerConfig(**kw)


def build_ours(config, pg, **kw) -> GatedDeltaNet:
    return GatedDeltaNet(config, LOCAL_SUBMODULES, layer_number=1, pg_collection=pg, **kw)


def build_megatron(config, pg, **kw):
    """Megatron-core's own GatedDeltaNet on its deterministic torch path (F.conv1d + its
    torch_chunk_gated_delta_rule). That path still calls FLA's l2norm, and the constructor refuses to
    run without FLA; both are given a torch stand-in with FLA's formula x / sqrt(sum(x^2) + 1e-6)."""
    import megatron.core.ssm.gated_delta_net.common as mcommon
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet as MegatronGDN

    mcommon.HAVE_FLA = True
    mcommon.l2norm = lambda x, dim=-1, eps=1e-6: x * torch.rsqrt(x.square().sum(dim, keepdim=True) + eps)
    config = copy.copy(config)  # its forward reads deterministic_mode too: keep it on, on a copy
    config.deterministic_mode = True
    return MegatronGDN(config, LOCAL_SUBMODULES, layer_number=1, pg_collection=pg, **kw)


def shard_state_dict(full: dict, layer, tp: int, rank: int) -> dict:
    """The TP-rank `rank` shard of a TP=1 GDN state dict: every section of in_proj / conv split on its
    own (Megatron's layout), out_proj split on its input dim, replicated tensors as they are."""
    s = layer.sizes  # the sizes at TP = tp
    in_sections = [x * tp for x in s.in_proj_split_sections]
    conv_sections = [x * tp for x in s.conv_split_sections]

    def take(t, sections, dim=0):
        parts = torch.split(t, sections, dim=dim)
        return torch.cat([p.chunk(tp, dim=dim)[rank] for p in parts], dim=dim)

    out = {}
    for key, t in full.items():
        if key.startswith("in_proj.") and not key.endswith("_extra_state"):
            out[key] = take(t, in_sections)
        elif key.startswith("conv1d."):
            out[key] = take(t, conv_sections)
        elif key in ("A_log", "dt_bias"):
            out[key] = t.chunk(tp)[rank]
        elif key == "out_proj.weight":
            out[key] = t.chunk(tp, dim=1)[rank]
        else:
            out[key] = t
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
