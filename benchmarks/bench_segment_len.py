"""Intra-card CP segment counts measured one against another: forward and forward+backward of the
Hopper op (ours alone) for each forced segment count, beside what the planner picks. This is how
the planner's cost model (intra_cp.py) is checked against the card, e.g. its wave quantisation
(48/16 heads at 4 segments: 192 programs on 132 SMs, two waves).

    source .gpu/env.sh && python benchmarks/bench_segment_len.py --configs 48/16,64/16,32/16 \
        --lengths 1x32768 --segments 1,2,3,4,5,8 [--out LOG.md]

bench_ops.py's inputs (strong decay, l2norm in the op, final state out, random cotangents); median of
triton.testing.do_bench. A segment count s means segment_len = ceil(chunks / s) chunks of 64 tokens.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_ops import K, V, bench, make  # noqa: E402
from qla_megatron.ops import chunk_gated_delta_rule  # noqa: E402
from qla_megatron.ops.gated_delta_rule.hopper import chunk as hc  # noqa: E402
from qla_megatron.ops.gated_delta_rule.intra_cp import IntraCPConfig, plan_segment_len  # noqa: E402
from qla_megatron.ops.gated_delta_rule.options import GDNOptions  # noqa: E402
from qla_megatron.ops.gated_delta_rule.segment_plan import CHUNK  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="48/16,64/16,32/16,8/2")
    ap.add_argument("--lengths", default="1x32768")
    ap.add_argument("--segments", default="1,2,3,4,5,6,8,16")
    ap.add_argument("--out", default=None, help="markdown table to write (after every row)")
    args = ap.parse_args()
    sms = hc._num_sms(0)
    lines = [f"# Forced segment counts, {torch.cuda.get_device_name()} ({sms} SMs)", "",
             f"Command: `source .gpu/env.sh && python {' '.join(sys.argv)}`", "",
             "| v/qk heads | tokens | planner (segments) | segments | segment chunks | fwd ms | fwd+bwd ms |",
             "|---|---|---|---|---|---|---|"]
    for cfg in args.configs.split(","):
        HV, H = map(int, cfg.split("/"))
        for shape in args.lengths.split(","):
            B, T = map(int, shape.split("x"))
            q, k, v, g, beta = make(B, T, H, HV)
            do = torch.randn(B, T, HV, V, device="cuda", dtype=torch.bfloat16)
            dht = torch.randn(B, HV, K, V, device="cuda")
            chunks = -(-T // CHUNK)
            planned = plan_segment_len([T] * B, HV, K, V, sms, BV=hc.bv_main(V))
            p_segs = -(-T // planned) if planned else 1
            for s in sorted({int(x) for x in args.segments.split(",")}):
                seg_chunks = -(-chunks // s)
                if -(-chunks // seg_chunks) != s:
                    continue                      # this count is not reachable with equal segments
                cfg_cp = IntraCPConfig(enabled=s > 1, segment_len=seg_chunks * CHUNK if s > 1 else None)
                opts = GDNOptions(intra_cp=cfg_cp)
                leaves = [t.detach().requires_grad_(True) for t in (q, k, v, g, beta)]

                def fwd():
                    return chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True,
                                                  use_qk_l2norm_in_kernel=True, backend="tilelang", options=opts)

                def step():
                    o, h = chunk_gated_delta_rule(*leaves, output_final_state=True, use_qk_l2norm_in_kernel=True,
                                                  backend="tilelang", options=opts)
                    return torch.autograd.grad((o, h), leaves, (do, dht))

                with torch.no_grad():
                    tf = bench(fwd)
                tb = bench(step)
                row = (f"| {cfg} | {shape} | {p_segs} | {s} | {seg_chunks} | {tf:.3f} | {tb:.3f} |")
                print(row, flush=True)
                lines.append(row)
                if args.out:
                    open(args.out, "w").write("\n".join(lines) + "\n")
            del q, k, v, g, beta, do, dht


if __name__ == "__main__":
    main()
