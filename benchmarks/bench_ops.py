"""Forward, backward and forward+backward time and peak memory of the gated delta rule: ours (TileLang,
Hopper) vs FLA 0.6 (its Triton path) vs FlashQLA 0.1.3.

Same run, same inputs (bf16 q, k, v, beta; fp32 g = -exp(A_log) softplus(x + dt_bias), A in [1, 16];
l2norm in kernel; no initial state; final state returned), median of triton.testing.do_bench:
fwd without autograd; fwd+bwd = the forward with inputs requiring grad and torch.autograd.grad of
(o, final state) for fixed random cotangents; bwd = fwd+bwd - fwd. Peak = the most memory one
fwd+bwd allocates beyond its inputs. The floors beside each row are max(bytes / measured copy
bandwidth, FLOPs / measured bf16 matmul rate): forward bytes = q, k, v, o, g, beta moved once, FLOPs =
the chunked algorithm's matrix products (C = 64); forward+backward adds the gradients' bytes (read do,
write dq, dk, dv, dg, dbeta) and twice the forward's FLOPs.

    source .gpu/env.sh && python benchmarks/bench_ops.py --out benchmarks/results/ops_h200

Options: --configs 8/2,16/4 (v-heads/qk-heads), --lengths 1x8192,varlen, --peers fla,flashqla,
--warm-fla (first compile FLA's Triton kernels for every config at once, one process a config: a
fresh host compiles them for 70-90 s a config, one after another, in the measuring process),
--flashqla-configs 32/16,8/2 and --flashqla-lengths 1x32768 (FlashQLA compiles for minutes per new
shape; the others are marked not run), --modes fwd,fwdbwd. err = rel. L2 of ours vs FLA (o, and the largest over dq, dk, dv, dg, dbeta).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("FLA_FLASH_QLA", "0")              # FLA's own Triton kernels, not FlashQLA's

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


def parse_shape(shape, device="cuda"):
    """'BxT' or 'varlen' -> (B, T, cu_seqlens int64 on `device`, or None)."""
    if shape == "varlen":
        return 1, sum(VARLEN), torch.tensor([0] + torch.tensor(VARLEN).cumsum(0).tolist(), device=device)
    B, T = map(int, shape.split("x"))
    return B, T, None


def floor_ms(tokens, H, HV, bw, rate, backward=False):
    """(floor, bytes part, FLOPs part) in ms, forward or forward+backward."""
    bytes_ = tokens * (2 * H * K * 2 + 2 * HV * V * 2 + HV * (4 + 2))
    flops = (tokens / C) * HV * (2 * C * C * (3 * K + V) + 3 * 2 * C * K * V + 2 * C * C * V)
    if backward:
        bytes_ += tokens * (2 * H * K * 2 + 2 * HV * V * 2 + HV * (4 + 2))
        flops *= 3
    return max(bytes_ / bw, flops / rate) * 1e3, bytes_ / bw * 1e3, flops / rate * 1e3


def runners(peers):
    """name -> fn(q, k, v, g, beta, cu) -> (o, final state); and the peers' versions."""
    out = {"ours": lambda q, k, v, g, b, cu: chunk_gated_delta_rule(
        q, k, v, g, b, output_final_state=True, cu_seqlens=cu, use_qk_l2norm_in_kernel=True, backend="tilelang")}
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


def measure(fn, inputs, cu, do, dht, modes):
    """Times (fwd, fwdbwd, bwd) in ms, peak MiB, and the outputs / gradients of one call."""
    res = {}
    with torch.no_grad():
        o, s = fn(*inputs, cu)
        res["out"] = o.float()
        if "fwd" in modes:
            res["fwd"] = bench(lambda: fn(*inputs, cu))
    if "fwdbwd" in modes:
        leaves = [t.detach().requires_grad_(True) for t in inputs]

        def step():
            o, s = fn(*leaves, cu)
            return torch.autograd.grad((o, s), leaves, (do, dht))

        res["grads"] = [gr.float() for gr in step()]
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        res["peak"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        res["fwdbwd"] = bench(step)
        if "fwd" in res:
            res["bwd"] = res["fwdbwd"] - res["fwd"]
    return res


def warm_fla(configs, lengths):
    """Compile FLA's kernels for every config in parallel processes (one each) before measuring, into
    Triton's on-disk cache, where the measuring process then finds them. One fwd+bwd per config at
    each kind of length: a fixed-length batch (its T only matters modulo 16) and, if asked for, the
    packed mix."""
    import subprocess
    kinds = sorted({"varlen" if s == "varlen" else "1x8192" for s in lengths.split(",")})
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--warm-one", cfg, "--lengths", ",".join(kinds)])
             for cfg in configs.split(",")]
    bad = [cfg for cfg, p in zip(configs.split(","), procs) if p.wait() != 0]
    print(f"FLA kernels for {configs} ({','.join(kinds)}) compiled in parallel: {time.time() - t0:.0f} s"
          + (f"; failed for {bad}" if bad else ""), flush=True)


def warm_one(cfg, lengths):
    # Autotune timings taken here, beside the other configs' processes, are not stored: where Triton's
    # cache has no choice yet, the measuring process tunes alone (the candidates are compiled by then).
    import triton.runtime.autotuner as at
    disk = at.get_cache_manager

    class ReadOnly:
        def __init__(self, key):
            self.m = disk(key)

        def get_file(self, name):
            return self.m.get_file(name)

        def put(self, *a, **k):
            return None
    at.get_cache_manager = ReadOnly
    fns, _ = runners(["fla"])
    HV, H = map(int, cfg.split("/"))
    for shape in lengths.split(","):
        B, T, cu = parse_shape(shape)
        leaves = [t.requires_grad_(True) for t in make(B, T, H, HV)]
        o, s = fns["fla"](*leaves, cu)
        torch.autograd.grad((o, s), leaves, (torch.randn_like(o), torch.randn_like(s)))
    torch.cuda.synchronize()


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=CONFIGS)
    ap.add_argument("--lengths", default=LENGTHS)
    ap.add_argument("--peers", default="fla,flashqla")
    ap.add_argument("--flashqla-configs", default="32/16,8/2")
    ap.add_argument("--flashqla-lengths", default=None, help="the lengths FlashQLA runs at (default: all)")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--out", default=None, help="path prefix for the .md table and .png plot")
    ap.add_argument("--warm-fla", action="store_true", help="compile FLA's kernels for all configs in parallel first")
    ap.add_argument("--warm-one", default=None, help=argparse.SUPPRESS)   # a --warm-fla worker: one config
    args = ap.parse_args()
    if args.warm_one:
        return warm_one(args.warm_one, args.lengths)
    modes = set(args.modes.split(","))
    if not modes <= {"fwd", "fwdbwd"}:
        raise ValueError(f"--modes {args.modes!r}: choose from fwd, fwdbwd")
    torch.backends.cuda.matmul.allow_tf32 = False
    fns, versions = runners(args.peers.split(",") if args.peers != "none" else [])
    if args.warm_fla and "fla" in fns:
        warm_fla(args.configs, args.lengths)
    bw, rate = ceilings()
    fq_ok = set(args.flashqla_configs.split(",")) if args.flashqla_configs else set()
    fq_len = set(args.flashqla_lengths.split(",")) if args.flashqla_lengths else None
    card = torch.cuda.get_device_name()
    print(f"card {card}; copy {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s; {versions}", flush=True)
    rows = []
    for cfg in args.configs.split(","):
        HV, H = map(int, cfg.split("/"))
        for shape in args.lengths.split(","):
            B, T, cu = parse_shape(shape)
            inputs = make(B, T, H, HV)
            N = B if cu is None else cu.numel() - 1
            do = torch.randn(B, T, HV, V, device="cuda", dtype=torch.bfloat16)
            dht = torch.randn(N, HV, K, V, device="cuda")
            row = dict(cfg=cfg, shape=shape)
            row["floor"], row["floor_bytes"], row["floor_flops"] = floor_ms(B * T, H, HV, bw, rate)
            row["floor_fb"] = floor_ms(B * T, H, HV, bw, rate, backward=True)[0]
            got = {}
            for name, fn in fns.items():
                if name == "flashqla" and (cfg not in fq_ok or (fq_len is not None and shape not in fq_len)):
                    continue
                try:
                    t0 = time.time()
                    got[name] = measure(fn, inputs, cu, do, dht, modes)
                    if time.time() - t0 > 20:
                        print(f"  {name} took {time.time() - t0:.0f} s (compile)", flush=True)
                    for m in ("fwd", "bwd", "fwdbwd", "peak"):
                        if m in got[name]:
                            row[f"{name}_{m}"] = got[name][m]
                except Exception as e:
                    print(f"  {name} failed on {cfg} {shape}: {type(e).__name__}: {e}", flush=True)
            if "ours" in got and "fla" in got:
                row["err_o"] = rel(got["ours"]["out"], got["fla"]["out"])
                if "grads" in got["ours"] and "grads" in got["fla"]:
                    row["err_grad"] = max(rel(a, b) for a, b in zip(got["ours"]["grads"], got["fla"]["grads"]))
            rows.append(row)
            print(f"{cfg:>6} {shape:>9}  " + "  ".join(
                f"{n} " + "/".join(f"{row[f'{n}_{m}']:.3f}" if f"{n}_{m}" in row else "-"
                                   for m in ("fwd", "bwd", "fwdbwd")) + (f" {row[f'{n}_peak']:.0f}MiB"
                                                                         if f"{n}_peak" in row else "")
                for n in fns) + f"  floor {row['floor']:.3f}/{row['floor_fb']:.3f}  err o "
                  f"{row.get('err_o', float('nan')):.1e} grads {row.get('err_grad', float('nan')):.1e}", flush=True)
            del inputs, do, dht, got
            if args.out:   # after every row, so a cut-off run still leaves its table
                write(args.out, rows, card, versions, bw, rate)


def write(prefix, rows, card, versions, bw, rate):
    import tilelang
    cmd = "source .gpu/env.sh && python " + " ".join(sys.argv)
    f = lambda r, n: f"{r[n]:.3f}" if n in r else "-"
    ratio = lambda r, a, b: f"{r[a] / r[b]:.2f}" if a in r and b in r else "-"
    lines = ["# Gated delta rule op: forward, backward, forward+backward (ms, median, triton do_bench), peak MiB",
             "", f"Card: {card}. torch {torch.__version__}, tilelang {tilelang.__version__}, "
             + ", ".join(f"{k} {v}" for k, v in versions.items())
             + f". Measured ceilings: copy {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s.", "",
             f"Command: `{cmd}`", "",
             "bf16, K = V = 128, l2norm in kernel, final state out, fp32 gates with strong decay. "
             "varlen = " + f"{len(VARLEN)} sequences, {sum(VARLEN)} tokens (8192 ... 37). "
             "bwd = fwd+bwd - fwd; peak = memory one fwd+bwd allocates beyond its inputs. "
             "err = rel. L2 of ours vs FLA (o; the largest over the input gradients). '-' = not run.", "",
             "| v/qk heads | tokens | ours fwd / bwd / fwd+bwd | FLA fwd / bwd / fwd+bwd | FlashQLA fwd / bwd / fwd+bwd "
             "| floor fwd / fwd+bwd | FLA / ours fwd, fwd+bwd | FlashQLA / ours fwd, fwd+bwd | ours / floor fwd+bwd "
             "| peak MiB ours / FLA / FlashQLA | err o, grads |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = lambda n: " / ".join(f(r, f"{n}_{m}") for m in ("fwd", "bwd", "fwdbwd"))
        err = " ".join(f"{r[e]:.1e}" if e in r else "-" for e in ("err_o", "err_grad"))
        lines.append(f"| {r['cfg']} | {r['shape']} | {t('ours')} | {t('fla')} | {t('flashqla')} | "
                     f"{r['floor']:.3f} / {r['floor_fb']:.3f} | {ratio(r, 'fla_fwd', 'ours_fwd')}, "
                     f"{ratio(r, 'fla_fwdbwd', 'ours_fwdbwd')} | {ratio(r, 'flashqla_fwd', 'ours_fwd')}, "
                     f"{ratio(r, 'flashqla_fwdbwd', 'ours_fwdbwd')} | {ratio(r, 'ours_fwdbwd', 'floor_fb')} | "
                     + " / ".join(f"{r[n + '_peak']:.0f}" if n + "_peak" in r else "-" for n in ("ours", "fla", "flashqla"))
                     + f" | {err} |")
    open(prefix + ".md", "w").write("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        labels = [f"{r['cfg']}\n{r['shape']}" for r in rows]
        fig, axes = plt.subplots(2, 1, figsize=(max(10, len(rows) * 0.45), 9))
        xs = range(len(rows))
        for ax, m, fl in zip(axes, ("fwd", "fwdbwd"), ("floor", "floor_fb")):
            bars = [("ours", "C0"), ("fla", "C1"), ("flashqla", "C2")]
            w = 0.8 / (len(bars) + 1)
            for i, (n, c) in enumerate(bars + [(None, "k")]):
                vals = [r.get(f"{n}_{m}", 0) if n else r[fl] for r in rows]
                ax.bar([x + (i - len(bars) / 2) * w for x in xs], vals, w, label=n or "floor", color=c)
            ax.set_xticks(list(xs))
            ax.set_xticklabels(labels, fontsize=6, rotation=90)
            ax.set_yscale("log")
            ax.set_ylabel(f"{m} ms (log)")
            ax.legend()
        axes[0].set_title(f"GDN op, {card}")
        fig.tight_layout()
        fig.savefig(prefix + ".png", dpi=120)
        plt.close(fig)
    except Exception as e:
        print("plot failed:", e)


if __name__ == "__main__":
    main()
