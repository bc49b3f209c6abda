"""The PyTorch backend: the chunked gated delta rule written as the specification the kernels follow."""

from .chunk import CHUNK_SIZE, chunk_scan

__all__ = ["CHUNK_SIZE", "chunk_scan"]
