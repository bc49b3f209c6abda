"""One GDN layer, forward and forward+backward: ours against megatron-core 0.19's own GatedDeltaNet.

Both layers use megatron-core's local ColumnParallelLinear / RowParallelLinear and torch RMSNorm (no
Transformer Engine), bf16, the same weights, one sequence of T tokens (batch 1), TP = 1. Megatron's
layer runs its FLA kernels (causal_conv1d, l2norm, chunk_gated_delta_rule); ours runs
qla_megatron.ops.chunk_gated_delta_rule with --op-backend. Timings: CUDA events, median of --iters
after --warmup, in the same process on the same card.

    source .gpu/env.sh && python benchmarks/bench_layer.py \
        --tokens 8192 32768 --hidden 2048 4096 --op-backends auto --op-breakdown --out benchmarks/results/layer_h200.md

--op-breakdown also times the op alone at the same shapes (ours with each --op-backends entry: 16 qk
heads, l2norm in the kernel; FLA's chunk_gated_delta_rule as Megatron's layer calls it: q/k already
l2-normed and repeated to the v heads), forward and forward+backward, and prints op backward =
fwd+bwd - fwd and the rest of the layer (projections, conv, norms, gating) = layer - op.

On CPU (`--device cpu`, tiny sizes) it only checks that the script runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

# FLA 0.6 hands chunk_gated_delta_rule to FlashQLA's kernels on Hopper when flash-qla is importable
# (its backend registry, default on). Megatron's layer calls FLA, so which kernels "Megatron's layer"
# runs depends on this variable: 0 (the default here) keeps FLA's own Triton path, as DESIGN §5's
# anchors and benchmarks/bench_ops.py do; run once more with FLA_FLASH_QLA=1 for the FlashQLA path.
os.environ.setdefault("FLA_FLASH_QLA", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--hidden", type=int, nargs="+", default=[2048], help="one process for all: compiles and "
                   "autotunes once")
    p.add_argument("--heads", type=int, nargs=2, default=[16, 32], metavar=("HK", "HV"))
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--op-backends", nargs="+", default=["fla", "auto"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--op-breakdown", action="store_true", help="also time the op alone (see the docstring)")
    return p.parse_args()


def setup(device):
    import torch.distributed as dist

    if device == "cpu":
        from qla_megatron.layers.cpu_compat import enable_megatron_on_cpu

        enable_megatron_on_cpu()
        # Megatron's layer refuses to build without FLA; on CPU it runs its deterministic torch path,
        # which still calls FLA's l2norm: give it torch's (same formula).
        import megatron.core.ssm.gated_delta_net.common as mcommon

        mcommon.HAVE_FLA = True
        mcommon.l2norm = lambda x, dim=-1, eps=1e-6: x * torch.rsqrt(x.square().sum(dim, keepdim=True) + eps)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    parallel_state.initialize_model_parallel(1)
    if device == "cuda":
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1234)
    else:
        from qla_megatron.layers.cpu_compat import seed_model_parallel_rng

        seed_model_parallel_rng(1234, 0)
    return ProcessGroupCollection.use_mpu_process_groups()


def build(args, pg, hidden, op_backend=None):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    from qla_megatron.layers import GatedDeltaNet, GatedDeltaNetSubmodules, LocalHeadNorm

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    config = TransformerConfig(
        num_layers=1, hidden_size=hidden, num_attention_heads=16, linear_num_key_heads=args.heads[0],
        linear_num_value_heads=args.heads[1], linear_key_head_dim=args.head_dim,
        linear_value_head_dim=args.head_dim, linear_conv_kernel_dim=4, normalization="RMSNorm",
        activation_func=F.silu, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        use_cpu_initialization=args.device == "cpu", deterministic_mode=args.device == "cpu")
    sub = GatedDeltaNetSubmodules(in_proj=ColumnParallelLinear, out_norm=LocalHeadNorm, out_proj=RowParallelLinear)
    if op_backend is None:
        from megatron.core.ssm.gated_delta_net import GatedDeltaNet as MegatronGDN

        layer = MegatronGDN(config, sub, layer_number=1, pg_collection=pg)
    else:
        layer = GatedDeltaNet(config, sub, layer_number=1, pg_collection=pg, backend=op_backend)
    return layer.to(args.device, dtype)


def timed(fn, args):
    """Median milliseconds of fn() over args.iters after args.warmup calls."""
    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(args.iters):
        if args.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time

            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def measure(layer, x, args):
    def fwd():
        with torch.no_grad():
            layer(x, None)

    def fwd_bwd():
        out, _ = layer(x, None)
        out.backward(torch.ones_like(out))

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms_f, ms_fb = timed(fwd, args), timed(fwd_bwd, args)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    return ms_f, ms_fb, peak


def op_times(args, T):
    """The op alone at the layer's shapes (independent of hidden): (name, layer key, fwd ms, fwd+bwd ms) per op."""
    from qla_megatron.ops import chunk_gated_delta_rule

    (hk, hv), d, dev = args.heads, args.head_dim, args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    q, k = (torch.randn(1, T, hk, d, device=dev, dtype=dtype) for _ in range(2))
    v = torch.randn(1, T, hv, d, device=dev, dtype=dtype)
    A = torch.empty(hv, device=dev).uniform_(1, 16)
    g = -A * F.softplus(torch.randn(1, T, hv, device=dev) + 1.0)  # float32, as both layers compute it
    beta = torch.rand(1, T, hv, device=dev).to(dtype)
    ops = [(f"qla_megatron op (backend {b})", b, (q, k, v, g, beta),
            lambda *x, b=b: chunk_gated_delta_rule(*x, use_qk_l2norm_in_kernel=True, backend=b)[0])
           for b in args.op_backends]
    qn, kn = (F.normalize(t.float(), dim=-1, eps=1e-6).to(dtype).repeat_interleave(hv // hk, dim=2) for t in (q, k))

    def fla_op(*x):
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

        return fla_chunk(*x, use_qk_l2norm_in_kernel=False)[0]

    ops.append(("FLA op as Megatron calls it", "megatron", (qn, kn, v, g, beta), fla_op))
    out = []
    for name, key, inputs, fn in ops:
        try:
            leaves = [t.detach().requires_grad_() for t in inputs]

            def fwd():
                with torch.no_grad():
                    fn(*inputs)

            def fwd_bwd():
                o = fn(*leaves)
                torch.autograd.grad(o, leaves, torch.ones_like(o))

            out.append((name, key, timed(fwd, args), timed(fwd_bwd, args)))
        except Exception as e:  # reported, not fatal
            out.append((f"{name}: failed: {type(e).__name__}: {str(e)[:80]}", key, float("nan"), float("nan")))
        print(out[-1], flush=True)
    return out


def header(args, dtype):
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    return (f"Card: {card}; torch {torch.__version__}; {dtype}; heads qk/v {args.heads[0]}/{args.heads[1]}; "
            f"K = V = {args.head_dim}; batch 1; TP 1; median of {args.iters} after {args.warmup} warm-up calls.\n"
            f"Command: `{' '.join(['python'] + sys.argv)}` "
            f"(QLA_MEGATRON_CHECK_FINITE={os.environ.get('QLA_MEGATRON_CHECK_FINITE', '0')}, "
            f"FLA_FLASH_QLA={os.environ['FLA_FLASH_QLA']})")


def section(hidden, rows, breakdown):
    lines = [f"### hidden {hidden}", "",
             "| layer | tokens | fwd ms | fwd+bwd ms | peak GiB | out rel. diff vs Megatron |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {T} | {f:.2f} | {fb:.2f} | {p:.1f} | {e} |" for n, T, f, fb, p, e in rows]
    if breakdown:
        lines += ["", "Op alone (same shapes; op bwd = op fwd+bwd - op fwd; rest = layer - op: projections, conv, "
                  "norms, gating, and for Megatron's layer its l2norm and q/k repeat):", "",
                  "| op | tokens | op fwd ms | op bwd ms | op fwd+bwd ms | layer fwd ms | layer fwd+bwd ms "
                  "| rest fwd ms | rest fwd+bwd ms |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {n} | {T} | {f:.2f} | {b:.2f} | {fb:.2f} | {lf:.2f} | {lfb:.2f} | {lf - f:.2f} | {lfb - fb:.2f} |"
                  for n, T, f, b, fb, lf, lfb in breakdown]
    return "\n".join(lines)


def write(args, parts):
    text = "\n\n".join(parts)
    print(text, flush=True)
    if args.out:  # rewritten after every length: a run cut short keeps what it measured
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


def main():
    args = parse()
    pg = setup(args.device)
    parts, op_cache = [], {}
    for hidden in args.hidden:
        torch.manual_seed(0)
        reference = build(args, pg, hidden)
        state, dtype = reference.state_dict(), next(reference.parameters()).dtype
        if not parts:
            parts.append(header(args, str(dtype).replace("torch.", "")))
        rows, breakdown, layer_ms = [], [], {}
        for T in args.tokens:
            x = torch.randn(T, 1, hidden, device=args.device, dtype=dtype)
            with torch.no_grad():
                want = reference(x, None)[0].float()
            rows.append(("megatron-core 0.19 GatedDeltaNet (FLA)", T, *measure(reference, x, args), "-"))
            layer_ms[("megatron", T)] = rows[-1][2:4]
            print(hidden, rows[-1], flush=True)
            for op_backend in args.op_backends:
                try:
                    ours = build(args, pg, hidden, op_backend)
                    ours.load_state_dict(state, strict=True)
                    with torch.no_grad():
                        got = ours(x, None)[0].float()
                    err = float((got - want).norm() / want.norm())
                    rows.append((f"qla_megatron GatedDeltaNet (op backend {op_backend})", T,
                                 *measure(ours, x, args), f"{err:.1e}"))
                    layer_ms[(op_backend, T)] = rows[-1][2:4]
                except Exception as e:  # a backend that cannot run this call is reported, not fatal
                    rows.append((f"qla_megatron GatedDeltaNet (op backend {op_backend})", T, float("nan"),
                                 float("nan"), float("nan"), f"failed: {type(e).__name__}: {str(e)[:80]}"))
                print(hidden, rows[-1], flush=True)
                ours = None
            if args.op_breakdown:
                x = want = None
                if T not in op_cache:
                    op_cache[T] = op_times(args, T)
                nan2 = (float("nan"), float("nan"))
                breakdown += [(n, T, f, fb - f, fb, *layer_ms.get((key, T), nan2)) for n, key, f, fb in op_cache[T]]
            write(args, parts + [section(hidden, rows, breakdown)])
        parts.append(section(hidden, rows, breakdown))
        reference = None


if __name__ == "__main__":
    main()
