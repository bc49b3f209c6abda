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


class SequenceParallelTorchNorm:
    """Megatron's WrappedTorchNorm (torch RMSNorm / LayerNorm, the local backend's norm when Apex is
    absent) with sequence parallelism allowed.

    WrappedTorchNorm refuses config.sequence_parallel, so without TE or Apex no local GPT model could
    use SP. Under SP each TP rank normalises a different slice of the sequence, so the weight
    gradient is a partial sum: the parameters are marked `sequence_parallel`, and Megatron's
    finalize_model_grads all-reduces such gradients over the TP group (as it does for TE's norms).
    Same parameters and state-dict keys as WrappedTorchNorm.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        if config.layernorm_zero_centered_gamma or config.persist_layer_norm or config.memory_efficient_layer_norm:
            raise ValueError("the torch norm supports none of layernorm_zero_centered_gamma, persist_layer_norm, "
                             "memory_efficient_layer_norm")
        classes = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}
        if config.normalization not in classes:
            raise ValueError(f"config.normalization must be one of {sorted(classes)}, got {config.normalization!r}")
        norm = classes[config.normalization](hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm
