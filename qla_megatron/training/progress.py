"""The recipe's per-iteration log line: loss, tokens/s, TFLOP/s per GPU and MFU (both FLOP counts,
qla_megatron.training.flops), peak memory, and progress with the time left."""

from __future__ import annotations

import resource
import time
from datetime import timedelta

import torch

from .flops import kernel_flops, megatron_flops

GIB = 2 ** 30


def peak_memory_gib(device: str) -> tuple[float, str]:
    """(GiB, what was measured): the CUDA allocator's peak on a GPU, the process's peak RSS on CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / GIB, "peak alloc"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, "peak RSS"


def _hms(seconds: float) -> str:
    return str(timedelta(seconds=int(round(max(seconds, 0.0)))))


class IterationLog:
    """Formats one line per logged iteration (rank 0 prints it)."""

    def __init__(self, args, world_size: int, device: str, start_iteration: int = 0):
        self.args, self.world_size, self.device = args, world_size, device
        self.tokens_per_iter = args.global_batch_size * args.seq_length
        self.flops_megatron = megatron_flops(args, args.global_batch_size)
        self.flops_kernels = kernel_flops(args, args.global_batch_size)
        self.peak = args.peak_tflops
        self.start_iteration = start_iteration
        self.t_start = time.perf_counter()

    def header(self) -> str:
        a = self.args
        return (f"recipe: {a.num_layers} layers (GDN:attention by freq {a.linear_attention_freq}), hidden "
                f"{a.hidden_size}, seq {a.seq_length}, global batch {a.global_batch_size} "
                f"({self.tokens_per_iter:,} tokens/iter), TP {a.tensor_model_parallel_size} "
                f"CP {a.context_parallel_size}, {self.world_size} ranks on {self.device}; "
                f"FLOPs/iter {self.flops_megatron / 1e12:.4g} T (Megatron formula), "
                f"{self.flops_kernels / 1e12:.4g} T (our chunk-64 kernels); MFU against "
                f"{self.peak:g} TFLOP/s per GPU")

    def line(self, iteration: int, loss: float, iter_seconds: float, lr: float) -> str:
        train_iters = self.args.train_iters
        per_gpu = 1e12 * iter_seconds * self.world_size
        tf_m, tf_k = self.flops_megatron / per_gpu, self.flops_kernels / per_gpu
        mem, what = peak_memory_gib(self.device)
        done = iteration - self.start_iteration
        elapsed = time.perf_counter() - self.t_start
        left = elapsed / max(done, 1) * (train_iters - iteration)
        return (f"iter {iteration}/{train_iters} | loss {loss:.6f} | lr {lr:.3g} | "
                f"{self.tokens_per_iter / iter_seconds:,.0f} tokens/s | {iter_seconds * 1e3:.0f} ms/iter | "
                f"TFLOP/s/GPU {tf_m:.3g} (Megatron) {tf_k:.3g} (kernels) | "
                f"MFU {100 * tf_m / self.peak:.3g}% / {100 * tf_k / self.peak:.3g}% | "
                f"{what} {mem:.2f} GiB | {100 * iteration / train_iters:.0f}% "
                f"elapsed {_hms(elapsed)} left ~{_hms(left)}")
