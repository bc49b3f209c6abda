"""Where a call of the Hopper op spends its time: GPU kernel time vs wall time, per kernel, per shape.

    source .gpu/env.sh && python benchmarks/op_profile.py [--configs 32/16,48/16] [--shapes 1x32768,varlen]

For each (v/qk heads, shape) on bench_ops.py's inputs: the median do_bench time of the op, the host time
of one call without a sync, the intra-card CP plan (segment length, segments), and from torch.profiler
over 20 calls the GPU time per call of each kernel launch (in launch order) and in all. wall - GPU is time the GPU waits on the
host (syncs, Python, launches); GPU time per kernel says which stage is long.
"""

import argparse
import os
import sys
import time


import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_ops import VARLEN, make  # noqa: E402
from qla_megatron.ops import chunk_gated_delta_rule  # noqa: E402
from qla_megatron.ops.gated_delta_rule.hopper import chunk as hc  # noqa: E402
from qla_megatron.ops.gated_delta_rule.intra_cp import plan_segment_len  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="32/16,48/16,8/2")
    ap.add_argument("--shapes", default="1x32768,varlen")
    args = ap.parse_args()
    for cfg in args.configs.split(","):
        HV, H = map(int, cfg.split("/"))
        for shape in args.shapes.split(","):
            if shape == "varlen":
                lens = VARLEN
                cu = torch.tensor([0] + torch.tensor(VARLEN).cumsum(0).tolist(), device="cuda")
                q, k, v, g, beta = make(1, sum(VARLEN), H, HV)
            else:
                B, T = map(int, shape.split("x"))
                lens, cu = [T] * B, None
                q, k, v, g, beta = make(B, T, H, HV)
            seg = plan_segment_len(lens, HV, 128, 128, hc._num_sms(0), BV=hc.bv_main(128))
            nseg = sum(-(-L // seg) for L in lens) if seg else len(lens)
            f = lambda: chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True,  # noqa: E731
                                               use_qk_l2norm_in_kernel=True, cu_seqlens=cu, backend="tilelang")
            for _ in range(5):
                f()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                f()
            host = (time.perf_counter() - t) / 20 * 1e3
            torch.cuda.synchronize()
            wall = triton.testing.do_bench(f, warmup=10, rep=50, return_mode="median")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    f()
                torch.cuda.synchronize()
            # TileLang names every kernel "kernel": average by launch position within a call instead.
            ev = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                        key=lambda e: e.time_range.start)
            n = len(ev) // 20
            top = [(ev[i].name[:24], sum(e.device_time_total for e in ev[i::n]) / 20 / 1e3) for i in range(n)]
            gpu = sum(t for _, t in top)
            print(f"{cfg} {shape}: do_bench {wall:.3f} ms, GPU {gpu:.3f} ms/call ({gpu / wall:.0%}), host "
                  f"{host:.3f} ms/call; segment {seg} tokens, {nseg} segments of {len(lens)} sequences; kernels: "
                  + ", ".join(f"[{i}] {n} {t:.3f}" for i, (n, t) in enumerate(top)), flush=True)


if __name__ == "__main__":
    main()
