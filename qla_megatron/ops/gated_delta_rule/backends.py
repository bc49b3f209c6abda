"""Backend registry and dispatch for the gated delta rule.

A backend says which calls it supports (returning the reason when it does not) and runs them. "auto"
takes the first backend in AUTO_ORDER that supports the call; an explicit backend that cannot serve
the call raises ValueError with its reason, never a silent fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class CallInfo:
    """What a backend needs to know to decide whether it can serve a call."""
    device: torch.device
    dtype: torch.dtype
    H: int
    HV: int
    K: int
    V: int
    varlen: bool
    requires_grad: bool = False     # a backward will follow (autograd is recording and an input needs it)


@dataclass(frozen=True)
class Backend:
    name: str
    # Returns None when the call is supported, else the reason (naming the argument and the limit).
    unsupported: Callable[[CallInfo], Optional[str]]
    # run(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm,
    #     options) on validated inputs; options: the call's GDNOptions (options.py), never None.
    run: Callable


_REGISTRY: dict[str, Backend] = {}
# Fastest first. The peers (e.g. "fla") are explicit-only: optional, for benchmarks and cross-checks.
AUTO_ORDER = ("tilelang", "torch")


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def known_backends() -> tuple[str, ...]:
    return ("auto",) + tuple(_REGISTRY)


def select(name: str, info: CallInfo) -> Backend:
    """The backend that runs this call, or ValueError saying why none can."""
    if name == "auto":
        reasons = []
        for candidate in AUTO_ORDER:
            backend = _REGISTRY.get(candidate)
            if backend is None:
                continue
            why = backend.unsupported(info)
            if why is None:
                return backend
            reasons.append(f"{candidate}: {why}")
        raise ValueError("backend='auto': no backend supports this call (" + "; ".join(reasons) + ")")
    if name not in _REGISTRY:
        raise ValueError(f"backend must be one of {known_backends()}, got {name!r}")
    why = _REGISTRY[name].unsupported(info)
    if why is not None:
        raise ValueError(f"backend={name!r} cannot run this call: {why}")
    return _REGISTRY[name]
