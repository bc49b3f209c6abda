"""GDN sizes per tensor-parallel rank, and the config checks that make them well defined.

Every check raises ValueError naming the config field (or argument) and the values, where Megatron
asserts or silently computes a wrong split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F


@dataclass(frozen=True)
class GDNSizes:
    """Global and per-TP-rank widths of one GDN layer (names follow Megatron's `*_local_tp`)."""

    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel_dim: int
    tp_size: int

    @property
    def qk_dim(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def v_dim(self) -> int:
        return self.num_value_heads * self.value_head_dim

    @property
    def in_proj_dim(self) -> int:
        # q, k, v, z (output gate), then beta and alpha: one scalar each per value head.
        return 2 * self.qk_dim + 2 * self.v_dim + 2 * self.num_value_heads

    @property
    def conv_dim(self) -> int:
        return 2 * self.qk_dim + self.v_dim

    @property
    def num_k_heads_local_tp(self) -> int:
        return self.num_key_heads // self.tp_size

    @property
    def num_v_heads_local_tp(self) -> int:
        return self.num_value_heads // self.tp_size

    @property
    def qk_dim_local_tp(self) -> int:
        return self.qk_dim // self.tp_size

    @property
    def v_dim_local_tp(self) -> int:
        return self.v_dim // self.tp_size

    @property
    def conv_dim_local_tp(self) -> int:
        return self.conv_dim // self.tp_size

    @property
    def in_proj_split_names(self) -> tuple[str, ...]:
        return ("query", "key", "value", "z", "beta", "alpha")

    @property
    def in_proj_split_sections(self) -> tuple[int, ...]:
        """Widths of the in_proj output sections on one TP rank, in order (Megatron's layout: each
        rank holds its own slice of every section, so the global weight is section-major)."""
        hv = self.num_v_heads_local_tp
        return (self.qk_dim_local_tp, self.qk_dim_local_tp, self.v_dim_local_tp, self.v_dim_local_tp,
                hv, hv)

    @property
    def conv_split_sections(self) -> tuple[int, ...]:
        return (self.qk_dim_local_tp, self.qk_dim_local_tp, self.v_dim_local_tp)


_REQUIRED = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
             "linear_value_head_dim", "linear_conv_kernel_dim")


def gdn_sizes(config, tp_size: int, cp_size: int = 1) -> GDNSizes:
    """Check `config` for a GDN layer at this TP/CP size and return its sizes."""
    for field in _REQUIRED:
        value = getattr(config, field, None)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{field} must be a positive int for GatedDeltaNet, got {value!r}")
    hk, hv = config.linear_num_key_heads, config.linear_num_value_heads
    if hv % hk != 0:
        raise ValueError(f"config.linear_num_value_heads ({hv}) must be a multiple of "
                         f"config.linear_num_key_heads ({hk}): value head h uses key head h // {hv}/{hk}")
    for field, heads in (("linear_num_key_heads", hk), ("linear_num_value_heads", hv)):
        if heads % tp_size != 0:
            raise ValueError(f"config.{field} ({heads}) must be divisible by the tensor-parallel size "
                             f"(tp_size={tp_size}): TP ranks own whole heads")
    if not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"cp_size must be a positive int, got {cp_size!r}")
    # Context parallelism splits the sequence, not the heads (states pass between ranks), so head
    # counts need not divide by cp_size.
    if config.activation_func not in (F.silu,):
        name = getattr(config.activation_func, "__name__", repr(config.activation_func))
        raise ValueError(f"config.activation_func must be torch.nn.functional.silu for GatedDeltaNet "
                         f"(the short conv and the output gate use SiLU), got {name}")
    return GDNSizes(num_key_heads=hk, num_value_heads=hv, key_head_dim=config.linear_key_head_dim,
                    value_head_dim=config.linear_value_head_dim,
                    conv_kernel_dim=config.linear_conv_kernel_dim, tp_size=tp_size)
