"""Forward time of the gated delta rule: ours (TileLang, Hopper) vs FLA 0.6 (Triton path) vs FlashQLA 0.1.3.

Same run, same inputs (bf16 q, k, v, beta; fp32 g = -exp(A_log) softplus(x + dt_bias), A in [1, 16];
l2norm in kernel; no initial state; final state returned), median of triton.testing.do_bench. The floor
beside each row is max(bytes / measured copy bandwidth, FLOPs / measured bf16 matmul rate), bytes =
q, k, v, o, g, beta moved once; FLOPs = the chunked algorithm's matrix products (C = 64).

    source .gpu/env.sh && python benchmarks/bench_ops.py --out benchmarks/results/ops_forward_h100

Options: --configs 8/2,16/4 (v-heads/qk-heads), --lengths 1x8192,varlen, --peers fla,flashqla,
--flashqla-configs 32/16,8/2 (FlashQLA compiles for minutes per new shape; others are marked not run),
--forward rs,fused,...: our forward kernel variants (hopper/chunk.py; OURS below), each timed in the same
run as "ours-<variant>" (err = rel. L2 of its o vs the first variant's; the first variant's row vs FLA's).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("FLA_FLASH_QLA", "0")              # FLA's own Triton kernels, not FlashQLA's
os.environ.setdefault("QLA_MEGATRON_CHECK_FINITE", "0")  # no NaN scan (a host sync) in timed calls

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qla_megatron.ops import chunk_gated_delta_rule  # noqa: E402

CONFIGS = "8/2,16/4,32/8,32/16,48/16,64/16,32/32"
LENGTHS = "1x8192,1x32768,1x131072,4x8192,varlen"
VARLEN = [8192, 4096, 3000] + [2048] * 2 + [1024] * 4 + [512] * 8 + [100] * 10 + [37]
K = V = 128
C = 64


def bench(fn, warmup=25, rep=100):
    import triton
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def ceilings():
    """Measured copy bandwidth (bytes read + written per second) and bf16 matmul rate."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    bw = 2 * x.numel() / (bench(lambda: y.copy_(x)) * 1e-3)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    rate = 2 * 8192 ** 3 / (bench(lambda: a @ b) * 1e-3)
    del x, y, a, b
    return bw, rate


def make(B, T, H, HV, cu=None):
    dev = torch.device("cuda")
    q = torch.randn(B, T, H, K, dtype=torch.bfloat16, device=dev)
    k = torch.randn(B, T, H, K, dtype=torch.bfloat16, device=dev)
    v = torch.randn(B, T, HV, V, dtype=torch.bfloat16, device=dev)
    A = torch.empty(HV, device=dev).uniform_(1, 16)
    dt_bias = torch.empty(HV, device=dev).uniform_(-1, 3)
    g = -A * F.softplus(torch.randn(B, T, HV, device=dev) + dt_bias)
    beta = torch.rand(B, T, HV, device=dev).to(torch.bfloat16)
    return q, k, v, g, beta


def floor_ms(tokens, H, HV, bw, rate):
    bytes_ = tokens * (2 * H * K * 2 + 2 * HV * V * 2 + HV * (4 + 2))
    flops = (tokens / C) * HV * (2 * C * C * (3 * K + V) + 3 * 2 * C * K * V + 2 * C * C * V)
    return max(bytes_ / bw, flops / rate) * 1e3, bytes_ / bw * 1e3, flops / rate * 1e3


FORWARD_ENV = "QLA_MEGATRON_HOPPER_FORWARD"
# Our runners: forward variant -> runner name. "rs-exact" / "rs-gate" are the rs kernel with
# QLA_MEGATRON_INTRA_CP_MODE=exact / gate; the others leave the mode at its default.
OURS = {v: f"ours-{v}" for v in ("fused", "rs", "rs-exact", "rs-gate")}


def set_variant_env(variant):
    """The environment the op reads on every call, for one of OURS."""
    base, *opts = variant.split("-")
    os.environ[FORWARD_ENV] = base
    os.environ["QLA_MEGATRON_INTRA_CP_MODE"] = opts[0] if opts else ""


def runners(peers, variants=("fused",)):
    ours = lambda q, k, v, g, b, cu: chunk_gated_delta_rule(
        q, k, v, g, b, output_final_state=True, cu_seqlens=cu, use_qk_l2norm_in_kernel=True,
        backend="tilelang")
    out = {OURS[v]: ours for v in variants}     # the variant is set in the environment per runner
    versions = {}
    if "fla" in peers:
        try:
            import fla
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_fn
            out["fla"] = lambda q, k, v, g, b, cu: fla_fn(q, k, v, g, b, output_final_state=True, cu_seqlens=cu,
                                                         use_qk_l2norm_in_kernel=True)
            versions["fla"] = fla.__version__
        except Exception as e:  # optional peer
            print("FLA unavailable:", e)
    if "flashqla" in peers:
        try:
            import importlib.metadata as md
            from flash_qla.ops import chunk_gated_delta_rule as fq_fn
            out["flashqla"] = lambda q, k, v, g, b, cu: fq_fn(q, k, v, g, b, output_final_state=True,
                                                             use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
            versions["flashqla"] = md.version("flash-qla")
        except Exception as e:
            print("FlashQLA unavailable:", e)
    return out, versions


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=CONFIGS)
    ap.add_argument("--lengths", default=LENGTHS)
    ap.add_argument("--peers", default="fla,flashqla")
    ap.add_argument("--flashqla-configs", default="32/16,8/2")
    ap.add_argument("--out", default=None, help="path prefix for the .md table and .png plot")
    ap.add_argument("--forward", default="rs", help=f"our forward variants to time, e.g. fused,rs; from {sorted(OURS)}")
    args = ap.parse_args()
    variants = args.forward.split(",")
    for v in variants:
        if v not in OURS:
            raise ValueError(f"--forward {v!r}: choose from {sorted(OURS)}")
    torch.backends.cuda.matmul.allow_tf32 = False
    bw, rate = ceilings()
    fns, versions = runners(args.peers.split(",") if args.peers != "none" else [], variants)
    variant_of = {name: v for v, name in OURS.items()}
    fq_ok = set(args.flashqla_configs.split(",")) if args.flashqla_configs else set()
    card = torch.cuda.get_device_name()
    print(f"card {card}; copy {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s; {versions}", flush=True)
    rows = []
    for cfg in args.configs.split(","):
        HV, H = map(int, cfg.split("/"))
        for shape in args.lengths.split(","):
            cu = None
            if shape == "varlen":
                B, T = 1, sum(VARLEN)
                cu = torch.tensor([0] + torch.tensor(VARLEN).cumsum(0).tolist(), device="cuda")
            else:
                B, T = map(int, shape.split("x"))
            q, k, v, g, beta = make(B, T, H, HV)
            times, errs = {}, {}
            ref = None
            for name, fn in fns.items():
                if name == "flashqla" and cfg not in fq_ok:
                    continue
                if name in variant_of:     # read by the op on every call
                    set_variant_env(variant_of[name])
                try:
                    t0 = time.time()
                    o, s = fn(q, k, v, g, beta, cu)
                    torch.cuda.synchronize()
                    first = time.time() - t0
                    if ref is None:
                        ref = (o.float(), s.float())
                    else:
                        errs[name] = ((o.float() - ref[0]).norm() / ref[0].norm()).item()
                    times[name] = bench(lambda: fn(q, k, v, g, beta, cu))
                    if first > 5:
                        print(f"  {name} first call {first:.0f} s (compile)", flush=True)
                except Exception as e:
                    print(f"  {name} failed on {cfg} {shape}: {type(e).__name__}: {e}", flush=True)
            fl, fb, ff = floor_ms(B * T, H, HV, bw, rate)
            row = dict(cfg=cfg, shape=shape, floor=fl, floor_bytes=fb, floor_flops=ff, **times,
                       **{f"err_{n}": e for n, e in errs.items()})
            rows.append(row)
            fmt = lambda n: f"{times[n]:.3f}" if n in times else "-"
            print(f"{cfg:>6} {shape:>9}  " + "  ".join(f"{n} {fmt(n)}" for n in fns)
                  + f"  floor {fl:.3f}  errs {', '.join(f'{n} {e:.1e}' for n, e in errs.items())}", flush=True)
            del q, k, v, g, beta
            if args.out:   # after every row, so a cut-off run still leaves its table
                write(args.out, rows, card, versions, bw, rate)


def write(prefix, rows, card, versions, bw, rate):
    import tilelang
    cmd = "source .gpu/env.sh && python " + " ".join(sys.argv)
    lines = ["# Forward time, ms (median, triton do_bench)", "",
             f"Card: {card}. torch {torch.__version__}, tilelang {tilelang.__version__}, "
             + ", ".join(f"{k} {v}" for k, v in versions.items())
             + f". Measured ceilings: copy {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s.", "",
             f"Command: `{cmd}`", "",
             "bf16, K = V = 128, l2norm in kernel, final state out, fp32 gates with strong decay. "
             "varlen = " + f"{len(VARLEN)} sequences, {sum(VARLEN)} tokens (8192 ... 37). "
             "err = rel. L2 of o vs ours. '-' = not run.", "",
             "| v/qk heads | tokens | FLA | FlashQLA | floor (bytes, flops) |", "|---|---|---|---|---|"]
    ours = [n for n in OURS.values() if any(n in r for r in rows)]
    for n in ours:
        lines[-2] += f" {n} | {n}/floor | FLA/{n} | FlashQLA/{n} | err {n} |"
        lines[-1] += "---|---|---|---|---|"
    f = lambda r, n: f"{r[n]:.3f}" if n in r else "-"
    ratio = lambda r, a, b: f"{r[a] / r[b]:.2f}" if a in r and b in r else "-"
    for r in rows:
        line = (f"| {r['cfg']} | {r['shape']} | {f(r, 'fla')} | {f(r, 'flashqla')} | "
                f"{r['floor']:.3f} ({r['floor_bytes']:.3f}, {r['floor_flops']:.3f}) |")
        for n in ours:
            err = f"{r['err_' + n]:.1e}" if "err_" + n in r else "-"
            line += (f" {f(r, n)} | {ratio(r, n, 'floor')} | {ratio(r, 'fla', n)} | {ratio(r, 'flashqla', n)} |"
                     f" {err} |")
        lines.append(line)
    open(prefix + ".md", "w").write("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        labels = [f"{r['cfg']}\n{r['shape']}" for r in rows]
        fig, ax = plt.subplots(figsize=(max(10, len(rows) * 0.45), 5))
        xs = range(len(rows))
        bars = [(n, f"C{3 + i}") for i, n in enumerate(ours)] + [("fla", "C1"), ("flashqla", "C2"), ("floor", "k")]
        w = 0.8 / len(bars)
        for i, (n, c) in enumerate(bars):
            ax.bar([x + (i - (len(bars) - 1) / 2) * w for x in xs], [r.get(n, 0) for r in rows], w, label=n, color=c)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=6, rotation=90)
        ax.set_yscale("log")
        ax.set_ylabel("forward ms (log)")
        ax.set_title(f"GDN forward, {card}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(prefix + ".png", dpi=120)
        plt.close(fig)
    except Exception as e:
        print("plot failed:", e)


if __name__ == "__main__":
    main()
