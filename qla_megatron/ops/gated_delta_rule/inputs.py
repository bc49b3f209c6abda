"""Input checks and layout helpers shared by every backend of the gated delta rule.

Shape letters: B batch, T tokens, H query/key heads, HV value heads (a multiple of H), K key dim,
V value dim, N sequences (B, or len(cu_seqlens) - 1 for varlen).
"""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs compute in float32; float32 and float64 compute in their own dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, in x's dtype (the kernels use the same eps)."""
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps)


def packed_stream(q, k, v, g, beta, use_qk_l2norm_in_kernel=False):
    """Cast to the compute dtype, L2-normalise q and k if asked, and flatten the batch into one
    packed stream: q, k [B*T, H, K], v [B*T, HV, V], g, beta [B*T, HV]. q may be None."""
    cdt = compute_dtype(k.dtype)
    k, v, g, beta = (t.to(cdt).flatten(0, 1) for t in (k, v, g, beta))
    q = q.to(cdt).flatten(0, 1) if q is not None else None
    if use_qk_l2norm_in_kernel:
        k = l2norm(k)
        q = l2norm(q) if q is not None else None
    return q, k, v, g, beta


def default_scale(scale, K: int) -> float:
    return K ** -0.5 if scale is None else float(scale)


def check_inputs(q, k, v, g, beta, scale=None, initial_state=None, cu_seqlens=None, *,
                 need_q: bool = True, check_finite: bool = False) -> int:
    """Validate the arguments of the gated delta rule; return N, the number of sequences.

    q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV]; initial_state [N, HV, K, V];
    cu_seqlens int64 [N + 1] (B must be 1). Raises ValueError naming the argument and the rule.
    Shapes, dtypes and devices are read from the tensors' metadata. Data is read only where that is
    free or asked for: cu_seqlens' values when it is on the CPU, and with check_finite (the debug
    check) cu_seqlens' values on any device and the NaN/Inf scan of every input (one more read of
    each and a host sync). So without check_finite nothing here waits for the device.
    """
    named = ([("q", q)] if need_q else []) + [("k", k), ("v", v), ("g", g), ("beta", beta)]
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    if k.dim() != 4:
        raise ValueError(f"k must be [B, T, H, K], got shape {tuple(k.shape)}")
    B, T, H, K = k.shape
    if need_q and q.shape != k.shape:
        raise ValueError(f"q must have k's shape [B, T, H, K] = {tuple(k.shape)}, got {tuple(q.shape)}")
    if v.dim() != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"v must be [B, T, HV, V] with B={B}, T={T}, got shape {tuple(v.shape)}")
    HV = v.shape[2]
    if H == 0 or HV % H != 0:
        raise ValueError(f"num_v_heads (HV={HV}) must be evenly divisible by num_heads (H={H})")
    for name, t in (("g", g), ("beta", beta)):
        if tuple(t.shape) != (B, T, HV):
            raise ValueError(f"{name} must be [B, T, HV] = {(B, T, HV)}, got {tuple(t.shape)}")
    if T == 0 or K == 0 or v.shape[3] == 0:
        raise ValueError(f"T, K and V must be >= 1, got T={T}, K={K}, V={v.shape[3]}")
    if need_q and q.dtype != k.dtype:
        raise ValueError(f"q and k must share a dtype, got q {q.dtype} and k {k.dtype}")
    if v.dtype != k.dtype:
        raise ValueError(f"v must have k's dtype {k.dtype}, got {v.dtype}")
    for name, t in (("g", g), ("beta", beta)):
        if t.dtype not in (k.dtype, torch.float32):
            raise ValueError(f"{name} must be {k.dtype} (the inputs' dtype) or float32, got {t.dtype}")
    devices = {t.device for _, t in named}
    if len(devices) != 1:
        raise ValueError(f"q, k, v, g, beta must be on one device, got {sorted(map(str, devices))}")
    if scale is not None and not (isinstance(scale, (int, float)) and 0 < float(scale) < float("inf")):
        shown = scale if isinstance(scale, (int, float)) else type(scale).__name__
        raise ValueError(f"scale must be a positive finite number, got {shown!r}")

    N = B
    if cu_seqlens is not None:
        N = check_cu_seqlens(cu_seqlens, B, T, values=check_finite or cu_seqlens.device.type == "cpu")
        if cu_seqlens.device != k.device:
            raise ValueError(f"cu_seqlens must be on {k.device} like the inputs, got {cu_seqlens.device}")
    if initial_state is not None:
        want = (N, HV, K, v.shape[3])
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != want:
            got = tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state)
            raise ValueError(f"initial_state must be [N, HV, K, V] = {want}, got {got}")
        if initial_state.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"initial_state must be float32 (or float64), got {initial_state.dtype}")
        if initial_state.device != k.device:
            raise ValueError(f"initial_state must be on {k.device}, got {initial_state.device}")
    if check_finite:
        extra = [("initial_state", initial_state)] if initial_state is not None else []
        for name, t in named + extra:
            check_finite_tensor(name, t)
    return N


def check_finite_tensor(name: str, t: torch.Tensor) -> None:
    """ValueError naming `name` if t holds a NaN or Inf (reads t and waits for the device)."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf; the gated delta rule would spread it to every "
                         f"later token of its sequence (found by the check_finite debug check)")


def check_cu_seqlens(cu_seqlens, B: int, T: int, values: bool = True) -> int:
    """cu_seqlens: int64 [N + 1], 0 = c_0 < c_1 < ... < c_N = T, with B == 1. Returns N. values=False
    checks the metadata only (type, dtype, shape: no read of the tensor, no host sync)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if B != 1:
        raise ValueError(f"cu_seqlens requires batch size B == 1 (sequences packed along T), got B={B}")
    if cu_seqlens.dtype != torch.int64:
        raise ValueError(f"cu_seqlens must be int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [N + 1] with N >= 1, got shape {tuple(cu_seqlens.shape)}")
    if not values:
        return cu_seqlens.numel() - 1
    return _check_offsets(cu_seqlens.tolist(), T)


def _check_offsets(cu: list, T: int) -> int:
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    if any(b <= a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError(f"cu_seqlens must be strictly increasing (every sequence length >= 1), got {cu}")
    if cu[-1] != T:
        raise ValueError(f"cu_seqlens must end at T={T} (the packed length), got {cu[-1]}")
    return len(cu) - 1


def sequence_bounds(B: int, T: int, cu_seqlens) -> list[int]:
    """Start offsets of the N sequences in the flattened token stream [B*T], plus the end. Reads
    cu_seqlens on the host (a device->host sync for a GPU tensor) and checks its values
    (check_cu_seqlens' rules, ValueError)."""
    if cu_seqlens is None:
        return [b * T for b in range(B + 1)]
    cu = [int(c) for c in cu_seqlens.tolist()]
    _check_offsets(cu, B * T)      # read here anyway: the checks check_inputs skips on a device
    return cu
