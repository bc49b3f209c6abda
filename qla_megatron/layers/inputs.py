"""Checks of what the GDN layer's forward receives: hidden_states and packed_seq_params.

What the tensors' metadata shows (shapes, dtypes) is always checked: it costs nothing. Values are
read on the host only where that needs no wait for the device: packed offsets held on the CPU
(free), or, with GDNOptions.check_finite (the debug checks), packed offsets on a GPU and the
NaN/Inf scan of hidden_states. So by default a layer on the GPU never syncs with the host here, and
cu_seqlens stays on the device.
"""

from __future__ import annotations

from typing import Optional

import torch

from qla_megatron.ops.gated_delta_rule.inputs import check_finite_tensor

_INT_DTYPES = (torch.int32, torch.int64)


def check_hidden_states(hidden_states, hidden_size: int, check_finite: bool) -> None:
    """hidden_states must be a [s, b, hidden_size] tensor; with check_finite it must hold no NaN/Inf."""
    if not isinstance(hidden_states, torch.Tensor):
        raise ValueError(f"hidden_states must be a torch.Tensor [s, b, hidden_size], "
                         f"got {type(hidden_states).__name__}")
    if hidden_states.dim() != 3 or hidden_states.shape[-1] != hidden_size:
        raise ValueError(f"hidden_states must be [s, b, hidden_size] with hidden_size={hidden_size} "
                         f"(config.hidden_size), got shape {tuple(hidden_states.shape)}")
    if check_finite:
        check_finite_tensor("hidden_states", hidden_states)


def packed_cu_seqlens(packed_seq_params, seq_len: int, batch: int, cp_size: int, device,
                      check_values: bool) -> Optional[torch.Tensor]:
    """int64 cu_seqlens on `device` from packed_seq_params (qkv_format "thd"), or None without packing.

    Megatron's fields: cu_seqlens_q (or cu_seqlens_q_padded, when set: the layout of the tokens), and
    cu_seqlens_kv (or its _padded), which must be the same offsets. They must be 1-D integer tensors
    [N + 1] from 0 to the token count (seq_len x cp_size: with context parallelism the offsets are
    global), strictly increasing. Values are checked when they are on the CPU or when check_values
    is set (a host sync for offsets on a GPU); ValueError names the field.
    """
    if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
        return None
    if batch != 1:
        raise ValueError(f"packed sequences (qkv_format='thd') need batch size 1, got batch={batch}")
    p = packed_seq_params
    q_name = "cu_seqlens_q_padded" if p.cu_seqlens_q_padded is not None else "cu_seqlens_q"
    kv_name = "cu_seqlens_kv_padded" if p.cu_seqlens_kv_padded is not None else "cu_seqlens_kv"
    cu_q, cu_kv = getattr(p, q_name), getattr(p, kv_name)
    if cu_q is None:
        raise ValueError("packed_seq_params.cu_seqlens_q is None with qkv_format='thd'")
    total = seq_len * cp_size
    _check_offsets_metadata(q_name, cu_q)
    if cu_kv is not None and cu_kv is not cu_q:
        _check_offsets_metadata(kv_name, cu_kv)
        if cu_kv.shape != cu_q.shape:
            raise ValueError(f"packed_seq_params.{q_name} (shape {tuple(cu_q.shape)}) must equal {kv_name} "
                             f"(shape {tuple(cu_kv.shape)}) for GatedDeltaNet")
    if check_values or cu_q.device.type == "cpu":
        offsets = _check_offsets_values(q_name, cu_q, total, seq_len, cp_size)
        if cu_kv is not None and cu_kv is not cu_q and (check_values or cu_kv.device.type == "cpu"):
            other = cu_kv.tolist()
            if other != offsets:
                raise ValueError(f"packed_seq_params: {q_name} ({offsets}) must equal {kv_name} ({other}) "
                                 f"for GatedDeltaNet")
    return cu_q.to(device=device, dtype=torch.int64)


def _check_offsets_metadata(name: str, cu) -> None:
    if not isinstance(cu, torch.Tensor):
        raise ValueError(f"packed_seq_params.{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype not in _INT_DTYPES:
        raise ValueError(f"packed_seq_params.{name} must be an integer tensor (int32 or int64), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"packed_seq_params.{name} must be 1-D [N + 1] with N >= 1 sequences, "
                         f"got shape {tuple(cu.shape)}")


def _check_offsets_values(name: str, cu, total: int, seq_len: int, cp_size: int) -> list[int]:
    offsets = cu.tolist()
    if offsets[0] != 0:
        raise ValueError(f"packed_seq_params.{name} must start at 0, got {offsets}")
    if any(b <= a for a, b in zip(offsets[:-1], offsets[1:])):
        raise ValueError(f"packed_seq_params.{name} must be sorted, strictly increasing (every packed "
                         f"sequence >= 1 token), got {offsets}")
    if offsets[-1] != total:
        raise ValueError(f"packed_seq_params.{name} must end at the token count {total} (sequence length "
                         f"{seq_len} x cp_size {cp_size}), got {offsets[-1]} in {offsets}")
    return offsets
