"""What megatron.training needs to run on our CPU machines (CPU tests and the CPU default run only).

On top of `qla_megatron.layers.cpu_compat.enable_megatron_on_cpu` (the megatron-core patches):

* `megatron.training` imports `typing.override`, new in Python 3.12; our CPU machines run 3.11, so
  `typing` gets `typing_extensions.override` (the same decorator). Harmless on 3.12 (not touched).
* its checkpointing saves and restores the CUDA RNG state (`torch.cuda.get_rng_state` /
  `set_rng_state`): on a CPU-only torch there is none, so an empty state is saved and restoring
  it does nothing;
* `read_metadata` (the tracker file) agrees on the iteration with an all-reduce of a tensor made on
  "cuda": replaced by the same function with the tensor on the CPU (gloo);
* megatron-core's optimizer, gradient clipping, forward-backward schedule and checkpointing make
  small bookkeeping tensors with `device="cuda"` (a found-inf flag, a loss scale, a token count, a
  norm), and DDP's gradient sync asks for the current CUDA stream: in those modules only, the name
  `torch` is given a view of torch whose tensor factories put a "cuda" device on the CPU and whose
  `torch.cuda` streams do nothing (`_CpuTorch`); everything else in them is torch itself.

* argument validation asks for the CUDA architecture to decide on CUDA_DEVICE_MAX_CONNECTIONS
  (a CUDA stream setting) with TP or CP > 1: without CUDA there are no streams, so it is told 10,
  where Megatron drops that requirement;
* megatron-core's tensor-parallel linear layers advise CUDA_DEVICE_MAX_CONNECTIONS=1 (a CUDA
  setting) at every TP > 1 run: that warning is dropped on the CPU;
* rotary embeddings under context parallelism pick this rank's zigzag positions with an index
  tensor pinned and moved to CUDA: `_pos_emb_on_this_cp_rank` does the same selection on the CPU;
* gradient clipping asserts that every gradient is a 'torch.cuda.FloatTensor': its CPU twin
  `_clip_grad_by_total_norm_fp32` scales the same gradients by the same coefficient.

The GPU path never calls this module.
"""

from __future__ import annotations

import sys
import typing

import torch

_ENABLED = False


def allow_megatron_training_import() -> None:
    """typing.override for Python 3.11 (megatron.training's models import it)."""
    if sys.version_info < (3, 12) and not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override


def _read_metadata_on_cpu(tracker_filename):
    """megatron.training.checkpointing.read_metadata with its iteration all-reduce on the CPU."""
    with open(tracker_filename) as f:
        text = f.read().strip()
    if text == "release":
        iteration, release = 0, True
    else:
        try:
            iteration, release = int(text), False
        except ValueError:
            raise ValueError(f"checkpoint tracker {tracker_filename} holds {text!r}, "
                             f"not an iteration number or 'release'") from None
    if torch.distributed.is_initialized():
        t = torch.tensor([iteration], dtype=torch.long)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        iteration = int(t.item())
    return iteration, release


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "zeros_like", "ones_like", "empty_like", "arange")
_CUDA_MODULES = ("megatron.core.optimizer.optimizer", "megatron.core.optimizer.clip_grads",
                 "megatron.core.optimizer.distrib_optimizer", "megatron.core.pipeline_parallel.schedules",
                 "megatron.training.checkpointing", "megatron.training.utils.common_utils",
                 "megatron.core.distributed.param_and_grad_buffer", "megatron.core.utils")


def _on_cpu(device):
    if device is None:
        return None
    return "cpu" if str(device).startswith("cuda") else device


class _NoStream:
    """A CUDA stream stand-in on the CPU: work is already ordered, so waits do nothing."""

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass


class _CpuCuda:
    """torch.cuda, except current_stream() (a _NoStream)."""

    def current_stream(self, device=None):
        return _NoStream()

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuTorch:
    """torch, except that its tensor factories put device="cuda" (or cuda:N) on the CPU and
    torch.cuda is a _CpuCuda."""

    cuda = _CpuCuda()

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name not in _FACTORIES:
            return attr

        def factory(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _on_cpu(kwargs["device"])
            return attr(*args, **kwargs)

        return factory


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32 for CPU float32 gradients:
    every gradient times min(1, max_norm / (total_norm + 1e-6))."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    coeff = max_norm / (total_norm + 1.0e-6)
    if isinstance(coeff, torch.Tensor):
        coeff = coeff.clamp_max(1.0)
    elif coeff >= 1.0:
        return
    for g in grads:
        g.mul_(coeff)


def _pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
    """megatron-core's get_pos_emb_on_this_cp_rank on the CPU: the chunks r and 2 cp - 1 - r of 2 cp."""
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp, r = cp_group.size(), cp_group.rank()
    index = torch.tensor([r, 2 * cp - r - 1], device=pos_emb.device)
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp, -1, *pos_emb.shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, index)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])


def enable_megatron_training_on_cpu() -> None:
    """Patch megatron-core and megatron.training for a CPU-only torch (idempotent)."""
    global _ENABLED
    allow_megatron_training_import()
    if _ENABLED or torch.cuda.is_available():
        return
    from qla_megatron.layers.cpu_compat import enable_megatron_on_cpu

    enable_megatron_on_cpu()
    import megatron.training.checkpointing as ckpt

    torch.cuda.get_rng_state = lambda device="cuda": torch.empty(0, dtype=torch.uint8)
    torch.cuda.set_rng_state = lambda state, device="cuda": None
    ckpt.read_metadata = _read_metadata_on_cpu
    import warnings

    warnings.filterwarnings("ignore", message=r"When using async grad allreduce it is recommended")
    import megatron.training.arguments as margs

    margs.get_device_arch_version = lambda: 10
    import importlib

    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    import megatron.core.models.common.embeddings.rope_utils as rope_utils
    import megatron.core.models.common.embeddings.rotary_pos_embedding as rotary

    rope_utils.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
    rotary.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32

    for name in _CUDA_MODULES:
        module = importlib.import_module(name)
        module.torch = _CpuTorch()
    _ENABLED = True
