"""What cross-GPU context parallelism costs on one card: cp ranks emulated in one process
(qla_megatron.parallel.emulated_cp_chunk_gated_delta_rule, the ranks' own phases on the Hopper
kernels) against the single-device op on the same tokens, forward and forward+backward.

The emulated ranks run one after another, so their sum is compared with the op: the ratio is the
work CP adds (every rank's summaries of its continuing pieces forward and backward, and the two
compositions), not a speed-up. Same
inputs as bench_ops.py (bf16, strong decay, l2norm in the op, no initial / final state), median of
triton.testing.do_bench.

    source .gpu/env.sh && python benchmarks/bench_cp_emulated.py --out benchmarks/results/cp_emulated_h200

Options: --configs 8/2,32/16 (v-heads/qk-heads), --cps 2,4,8, --tokens-per-rank 32768, --layouts
contiguous,zigzag.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.bench_ops import bench, make  # noqa: E402
from qla_megatron.ops import chunk_gated_delta_rule  # noqa: E402
from qla_megatron.parallel import emulated_cp_chunk_gated_delta_rule  # noqa: E402


def times(fn, inputs, do):
    """(fwd ms, fwd+bwd ms) of fn(*inputs) -> o."""
    with torch.no_grad():
        fwd = bench(lambda: fn(*inputs))
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    fb = bench(lambda: torch.autograd.grad(fn(*leaves), leaves, do))
    return fwd, fb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="8/2,32/16")
    ap.add_argument("--cps", default="2,4,8")
    ap.add_argument("--tokens-per-rank", type=int, default=32768)
    ap.add_argument("--layouts", default="contiguous,zigzag")
    ap.add_argument("--out", default=None, help="write OUT.md")
    a = ap.parse_args()
    rows = []
    header = ("| v/qk heads | cp | tokens | layout | op fwd / fwd+bwd | emulated fwd / fwd+bwd "
              "| emulated / op fwd, fwd+bwd |")
    print(header, flush=True)
    for cfg in a.configs.split(","):
        HV, H = map(int, cfg.split("/"))
        for cp in map(int, a.cps.split(",")):
            T = cp * a.tokens_per_rank
            inputs = make(1, T, H, HV)
            do = torch.randn(1, T, HV, 128, dtype=torch.bfloat16, device="cuda")

            def op(q, k, v, g, b):
                return chunk_gated_delta_rule(q, k, v, g, b, use_qk_l2norm_in_kernel=True, backend="tilelang")[0]
            base = times(op, inputs, do)
            for layout in a.layouts.split(","):
                def emu(q, k, v, g, b, layout=layout, cp=cp):
                    return emulated_cp_chunk_gated_delta_rule(q, k, v, g, b, cp=cp, layout=layout,
                                                              use_qk_l2norm_in_kernel=True, backend="tilelang")
                t = times(emu, inputs, do)
                row = (f"| {cfg} | {cp} | 1x{T} | {layout} | {base[0]:.3f} / {base[1]:.3f} | {t[0]:.3f} / {t[1]:.3f} "
                       f"| {t[0] / base[0]:.2f}, {t[1] / base[1]:.2f} |")
                print(row, flush=True)
                rows.append(row)
            del inputs, do
            torch.cuda.empty_cache()
    if a.out:
        card = torch.cuda.get_device_name()
        with open(a.out + ".md", "w") as f:
            f.write(f"# Cross-GPU CP emulated on one card vs the op on the same tokens ({card})\n\n")
            f.write("Command: `python benchmarks/bench_cp_emulated.py " + " ".join(sys.argv[1:]) + "`\n\n")
            f.write(header + "\n|" + "---|" * 7 + "\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
