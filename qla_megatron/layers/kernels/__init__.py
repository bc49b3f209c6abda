"""Triton kernels of the GDN layer's elementwise work on the GPU (the layer's torch path serves the
CPU): the short causal conv + SiLU (conv.py), the gated RMSNorm (gated_norm.py) and the decay / beta
head (gate_head.py). Each file holds its kernels, launchers and autograd Function. Importing needs
triton (a dependency) but no GPU; under TRITON_INTERPRET=1 (set before import) they run on the CPU."""

from .conv import causal_conv1d_silu
from .gate_head import gate_head
from .gated_norm import gated_rms_norm

__all__ = ["causal_conv1d_silu", "gate_head", "gated_rms_norm"]
