"""The per-head output norm for the local (no Transformer Engine) backend."""

from __future__ import annotations

import torch


class LocalHeadNorm:
    """Builds torch's RMSNorm (config.normalization == "RMSNorm") or LayerNorm over one value head.

    Megatron's WrappedTorchNorm refuses config.sequence_parallel; a norm over the head dimension of
    a full-sequence tensor does not care about it (its weight gradient across TP ranks is summed by
    the GDN layer itself), so this builder allows it.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5):
        if config.normalization == "RMSNorm":
            return torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        if config.normalization == "LayerNorm":
            return torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        raise ValueError(f"config.normalization must be 'RMSNorm' or 'LayerNorm' for the GDN out_norm, "
                         f"got {config.normalization!r}")
