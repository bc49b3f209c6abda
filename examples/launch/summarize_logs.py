"""Summarize recipe logs (examples/launch/measure_h200.sh): per run the median over the measured
iterations (warm-up iterations left out) of tokens/s, TFLOP/s per GPU and MFU by both counts,
the peak memory, and the mean time breakdown, as one markdown table.

    python examples/launch/summarize_logs.py --skip 2 NAME=LOG [NAME=LOG ...]
"""

from __future__ import annotations

import argparse
import re
import statistics

ITER = re.compile(r"^iter (\d+)/\d+ \| loss (\S+) \| lr \S+ \| ([\d,]+) tokens/s \| (\d+) ms/iter \| "
                  r"TFLOP/s/GPU (\S+) \(Megatron\) (\S+) \(kernels\) \| MFU (\S+)% / (\S+)% \| "
                  r"peak (?:alloc|RSS) (\S+) GiB")
PART = re.compile(r"([A-Za-z' ]+?) (\d+) ms \((-?\d+)%\)")


def summarize(name: str, path: str, skip: int) -> dict:
    """One run's medians (iterations after `skip`), peak memory, first and last loss, mean breakdown."""
    rows, parts = [], {}
    text = open(path, errors="replace").read()
    for line in text.splitlines():
        m = ITER.match(line)
        if m:
            rows.append(m.groups())
        elif line.startswith("time: ") and rows and int(rows[-1][0]) > skip:
            for label, ms, _ in PART.findall(line[len("time: "):]):
                parts.setdefault(label.strip(), []).append(float(ms))
    measured = [r for r in rows if int(r[0]) > skip]
    if not measured:
        err = [ln for ln in text.splitlines() if "Error" in ln or "error" in ln]
        return {"name": name, "failed": (err[-1] if err else "no iterations logged")[:160]}
    med = lambda i: statistics.median(float(r[i].replace(",", "")) for r in measured)  # noqa: E731
    return {"name": name, "iters": len(measured), "tokens_s": med(2), "ms": med(3), "tflops_m": med(4),
            "tflops_k": med(5), "mfu_m": med(6), "mfu_k": med(7), "mem": max(float(r[8]) for r in rows),
            "loss": f"{rows[0][1]} -> {rows[-1][1]}",
            "parts": {k: statistics.mean(v) for k, v in parts.items()}}


def table(results: list[dict]) -> str:
    out = ["| run | iters | tokens/s | ms/iter | TFLOP/s/GPU Megatron / kernels | MFU Megatron / kernels | "
           "peak memory GiB | loss | time breakdown (ms per iteration) |", "|" + "---|" * 9]
    for r in results:
        if "failed" in r:
            out.append(f"| {r['name']} | failed: {r['failed']} |" + " |" * 7)
            continue
        parts = ", ".join(f"{k} {v:.0f}" for k, v in r["parts"].items()) or "-"
        out.append(f"| {r['name']} | {r['iters']} | {r['tokens_s']:,.0f} | {r['ms']:.0f} | "
                   f"{r['tflops_m']:.1f} / {r['tflops_k']:.1f} | {r['mfu_m']:.1f}% / {r['mfu_k']:.1f}% | "
                   f"{r['mem']:.1f} | {r['loss']} | {parts} |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip", type=int, default=2, help="warm-up iterations left out (default 2)")
    p.add_argument("runs", nargs="+", help="NAME=LOG")
    args = p.parse_args()
    print(table([summarize(*run.split("=", 1), args.skip) for run in args.runs]))


if __name__ == "__main__":
    main()
