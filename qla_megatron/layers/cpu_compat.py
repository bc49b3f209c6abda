"""Run megatron-core 0.19 on a CPU-only torch (CI, development). Tests and CPU runs only.

megatron-core assumes CUDA in a few places that the GDN layer, its specs and a small GPTModel reach:

* `torch.cuda.current_device()` is passed as the `device=` of new tensors;
* the model-parallel RNG tracker forks *CUDA* generator states (weight init, dropout);
* the default causal mask of the local softmax is made with `device="cuda"`;
* dist-checkpoint saving calls `torch.cuda.synchronize()` (nothing to wait for on CPU);
* `megatron.core.jit.jit_fuser` is `torch.compile`, which on CPU builds C++ for every graph
  (tens of seconds per test), so dynamo is switched off;
* selective recompute (`CheckpointWithoutOutput`) saves and restores the CUDA RNG state, and hands a
  recomputed tensor's storage to the discarded one through a C++ extension it compiles on first use:
  on CPU there is no CUDA RNG, and the storage is restored by a copy instead.

`enable_megatron_on_cpu()` patches those and nothing else. The layer itself never imports this
module: on a GPU host none of it applies.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_ENABLED = False


class CpuRNGStatesTracker:
    """The model-parallel RNG tracker (`add`, `fork`, `get_states`, `set_states`, `reset`) on torch's
    CPU generator: inside `fork(name)` the CPU RNG runs from the named stream, as CUDA's does on GPU."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.states_ = {}
        self.seeds_ = set()
        self._is_initialized = False

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = states

    def add(self, name, seed):
        if seed in self.seeds_ or name in self.states_:
            raise ValueError(f"RNG stream name={name!r} or seed={seed} is already tracked")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise ValueError(f"RNG stream name={name!r} was never added (known: {list(self.states_)})")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


@functools.lru_cache(maxsize=8)
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _restore_storage_by_copy(output: torch.Tensor, recomputed: torch.Tensor) -> None:
    """Refill the storage that CheckpointWithoutOutput released (every view of it sees the data)."""
    storage = output.untyped_storage()
    storage.resize_(recomputed.untyped_storage().nbytes())
    storage.copy_(recomputed.untyped_storage())


def enable_megatron_on_cpu() -> None:
    """Patch megatron-core for a CPU-only torch (idempotent; a no-op where CUDA is available)."""
    global _ENABLED
    if _ENABLED or torch.cuda.is_available():
        return
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.tensor_parallel.random as mp_random

    torch._dynamo.config.disable = True
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: None
    mp_random._set_cuda_rng_state = lambda *args, **kwargs: None
    mp_random._get_share_storage = lambda: _restore_storage_by_copy
    mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _ENABLED = True


def seed_model_parallel_rng(seed: int, tp_rank: int) -> None:
    """CPU counterpart of `model_parallel_cuda_manual_seed`: the default stream gets `seed`, the
    tensor-parallel stream `seed + 2718 + tp_rank` (Megatron's offsets), so TP ranks init differently."""
    import megatron.core.tensor_parallel.random as mp_random

    torch.manual_seed(seed)
    tracker = mp_random._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + tp_rank)
