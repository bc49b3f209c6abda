"""GPU smoke for the Hopper forward: cold compile time of the forward set, parallel precompile of the
kernels the GPU tests need, then a quick timing of ours. Used from one device call:

    source .gpu/env.sh && python benchmarks/hopper_smoke.py
"""
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from qla_megatron.ops.gated_delta_rule.hopper.chunk import _compile_one, forward_set, precompile  # noqa: E402


def main():
    if "--precompile-only" in sys.argv:
        return precompile_tests()
    if "--warm" in sys.argv:   # a fresh process, kernels already in TileLang's disk cache
        t = time.time()
        for it in forward_set(16, 32, 128, 128):
            _compile_one(it)
        print(f"warm start from the disk cache, forward set 32/16: {time.time() - t:.2f} s", flush=True)
        return
    # Cold compile of one (H, HV) forward set, sequential, in a fresh cache (what a user waits for).
    cache = os.environ.get("TILELANG_CACHE_DIR")
    items = forward_set(16, 32, 128, 128)
    per = [_compile_one(it) for it in items]
    print(f"cold compile, forward set 32/16 (sequential, cache {cache}): total {sum(per):.1f} s; "
          f"each {[round(p, 1) for p in per]}", flush=True)
    t = time.time()
    _compile_one(items[0])
    print(f"warm start (in-process cache) {time.time() - t:.3f} s", flush=True)
    precompile_tests()


def precompile_tests():
    heads = [(2, 8), (4, 16), (8, 32), (16, 32), (16, 48), (16, 64), (32, 32), (2, 4)]
    todo = [it for h, hv in heads for it in forward_set(h, hv, 128, 128)]
    todo += [it for V in (64, 256) for it in forward_set(2, 4, 128, V)]
    todo += forward_set(2, 4, 128, 128, torch.float16)
    todo += [it for h, hv in [(4, 32)] for it in forward_set(h, hv, 128, 128)]
    print(f"parallel precompile of {len(todo)} kernels: {precompile(todo, workers=14):.1f} s", flush=True)


if __name__ == "__main__":
    main()
