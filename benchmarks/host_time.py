"""Host (CPU) time of one call of the op, without a sync, next to its do_bench time.

    source .gpu/env.sh && python benchmarks/host_time.py

For 8/2 1x8192, 8/2 1x32768 and 32/16 1x32768 (bench_ops.py's inputs), each intra-CP mode: the mean
wall time of 30 back-to-back calls (kernels are queued, not waited for) and the median do_bench time.
Where the first is close to the second, the op is bound by its host work (Python, torch calls, kernel
launches), not by the GPU.
"""

import os
import sys
import time

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_ops import make  # noqa: E402
from qla_megatron.ops import GDNOptions, IntraCPConfig, chunk_gated_delta_rule  # noqa: E402


def main():
    for HV, H, B, T in ((8, 2, 1, 8192), (8, 2, 1, 32768), (32, 16, 1, 32768)):
        q, k, v, g, beta = make(B, T, H, HV)
        for mode in ("exact", "gate"):
            opts = GDNOptions(intra_cp=IntraCPConfig(mode=mode))
            f = lambda: chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True,  # noqa: E731
                                               use_qk_l2norm_in_kernel=True, backend="tilelang", options=opts)
            for _ in range(5):
                f()
            torch.cuda.synchronize()
            n = 30
            t = time.perf_counter()
            for _ in range(n):
                f()
            host = (time.perf_counter() - t) / n * 1e3
            torch.cuda.synchronize()
            dev = triton.testing.do_bench(f, warmup=10, rep=50, return_mode="median")
            print(f"{HV}/{H} {B}x{T} {mode}: host {host:.3f} ms/call, do_bench {dev:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
