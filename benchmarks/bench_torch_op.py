"""CPU benchmark of the torch backend of chunk_gated_delta_rule: tokens/s and peak memory vs T.

Each length runs in its own subprocess so that its peak resident memory (ru_maxrss) is its own.
Writes a markdown table (machine, versions, command) to build/torch_op_cpu.md; pass
--out benchmarks/results/torch_op_cpu.md to replace the committed table.

    python benchmarks/bench_torch_op.py                       # T = 2k..32k, 4 qk / 8 v heads, K=V=128
    python benchmarks/bench_torch_op.py --lengths 2048 4096 --out /tmp/t.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_length(T, H, HV, K, repeats):
    from qla_megatron.ops import chunk_gated_delta_rule
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    q, k = torch.randn(1, T, H, K), torch.randn(1, T, H, K)
    v = torch.randn(1, T, HV, K)
    g = -torch.rand(1, T, HV) * 2
    beta = torch.rand(1, T, HV)
    leaves = [t.requires_grad_() for t in (q, k, v, g, beta)]
    fwd, fwdbwd = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            chunk_gated_delta_rule(*leaves, use_qk_l2norm_in_kernel=True, backend="torch")
        t1 = time.perf_counter()
        o, _ = chunk_gated_delta_rule(*leaves, use_qk_l2norm_in_kernel=True, backend="torch")
        o.sum().backward()
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        fwdbwd.append(t2 - t1)
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    return dict(T=T, fwd_s=statistics.median(fwd), fwdbwd_s=statistics.median(fwdbwd), peak_mib=peak_mib)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--qk-heads", type=int, default=4)
    p.add_argument("--v-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(ROOT, "build", "torch_op_cpu.md"))
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(one_length(a.child, a.qk_heads, a.v_heads, a.head_dim, a.repeats)))
        return
    rows = []
    load_before = os.getloadavg()[0]
    for T in a.lengths:
        cmd = [sys.executable, __file__, "--child", str(T), "--qk-heads", str(a.qk_heads),
               "--v-heads", str(a.v_heads), "--head-dim", str(a.head_dim), "--repeats", str(a.repeats)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"T={T:6d}  fwd {r['fwd_s'] * 1e3:9.1f} ms  fwd+bwd {r['fwdbwd_s'] * 1e3:9.1f} ms  "
              f"{T / r['fwdbwd_s']:8.0f} tok/s fwd+bwd  peak +{r['peak_mib']:.0f} MiB", flush=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    lines = [
        "# torch backend of chunk_gated_delta_rule on CPU",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}.",
        f"Shape: B = 1, H = {a.qk_heads} qk / HV = {a.v_heads} v heads, K = V = {a.head_dim}, float32, "
        f"use_qk_l2norm_in_kernel=True; median of {a.repeats}. Peak = growth of the process's max RSS.",
        "Command: `" + " ".join(["python benchmarks/bench_torch_op.py"] + sys.argv[1:]) + "`",
        f"1-minute load average before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f} "
        f"(above {os.cpu_count()} means other work shared the cores and the times are pessimistic).",
        "",
        "| T | forward ms | fwd+bwd ms | tokens/s fwd | tokens/s fwd+bwd | peak MiB (fwd+bwd) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['T']} | {r['fwd_s'] * 1e3:.1f} | {r['fwdbwd_s'] * 1e3:.1f} | {r['T'] / r['fwd_s']:,.0f} "
                     f"| {r['T'] / r['fwdbwd_s']:,.0f} | {r['peak_mib']:.0f} |")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
