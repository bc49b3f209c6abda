"""The layer's Triton kernels (qla_megatron.layers.kernels) against the torch path they replace and
against FLA's conv / gated norm when fla imports: forward and forward+backward, one GPU, same run.

Shapes are the layer's at hidden 2048, heads qk/v 16/32, K = V = 128 (conv over q|k|v: 8192 channels;
gated norm over 32 heads x 128; decay head over 32 heads), bf16, batch 1, and every input is a split
view of one in_proj-like [T, 1, 12352] tensor, as in the layer. Rows print as they are measured.

    source .gpu/env.sh && python benchmarks/bench_layer_kernels.py --tokens 8192 32768

On CPU (`TRITON_INTERPRET=1 ... --device cpu --tokens 64`) it only checks that the script runs.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench_layer import timed   # median ms over --iters after --warmup (CUDA events, or wall clock on CPU)


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--seqs", type=int, default=8, help="packed sequences in the varlen conv rows")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--profile", action="store_true",
                   help="after each row, the GPU kernels of one forward+backward and their times (torch.profiler)")
    p.add_argument("--conv-tiles", action="store_true",
                   help="only our conv, once per (FWD_TILE, BWD_TILE) candidate of kernels/conv.py, dense and packed")
    return p.parse_args()


def kernel_times(fn):
    """One line per GPU kernel of fn() (name, calls, total us), from torch.profiler, busiest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    return [f"    {e.key[:90]}: {e.count} x, {e.device_time_total:.1f} us" for e in rows if e.device_time_total > 0][:8]


def row(name, T, fn, leaves, args):
    """Times fn() forward (no grad) and forward + backward (random cotangent) and prints one row."""
    def fwd():
        with torch.no_grad():
            fn()

    def fwd_bwd():
        out = fn()
        torch.autograd.grad(out, [t for t in leaves if t.requires_grad], cot[0])

    try:
        with torch.no_grad():
            cot = [torch.randn_like(fn())]
        f, fb = timed(fwd, args), timed(fwd_bwd, args)
        print(f"| {name} | {T} | {f:.3f} | {fb:.3f} |", flush=True)
        if args.profile and args.device == "cuda":
            print("\n".join(kernel_times(fwd_bwd)), flush=True)
    except Exception as e:  # a peer that cannot run this call is reported, not fatal
        print(f"| {name} | {T} | failed: {type(e).__name__}: {str(e)[:100]} | |", flush=True)


def conv_tiles(args):
    """Our conv + SiLU forward and forward+backward for every (FWD_TILES x BWD_TILES) candidate of
    qla_megatron/layers/kernels/conv.py (its module constants overridden), on the layer's split view;
    y, dx and dweight against the first candidate's (max abs difference). One row per candidate."""
    import itertools

    from qla_megatron.layers.kernels import causal_conv1d_silu
    from qla_megatron.layers.kernels import conv as conv_module

    dev, dt, D = args.device, torch.bfloat16, 2 * 16 * 128 + 32 * 128
    default = conv_module.FWD_TILE, conv_module.BWD_TILE
    print("| fwd tile | bwd tile | rows | tokens | fwd ms | fwd+bwd ms | bwd ms (difference) "
          "| max abs diff y, dx, dw |\n|---|---|---|---|---|---|---|---|", flush=True)
    for T in args.tokens:
        wide = torch.randn(T, 1, D + 32 * 128 + 64, device=dev, dtype=dt, requires_grad=True)
        qkv = wide.transpose(0, 1)[..., :D]
        w = (torch.randn(D, 1, 4, device=dev) / 2).to(dt).requires_grad_()
        lengths = torch.full((args.seqs,), T // args.seqs)
        lengths[-1] += T - int(lengths.sum())
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(dev)
        cot = torch.randn(1, T, D, device=dev, dtype=dt)
        for rows, cu_arg in (("dense", None), (f"{args.seqs} packed", cu)):
            first = None
            for ftile, btile in itertools.product(conv_module.FWD_TILES, conv_module.BWD_TILES):
                conv_module.FWD_TILE, conv_module.BWD_TILE = ftile, btile

                def fwd():
                    with torch.no_grad():
                        causal_conv1d_silu(qkv, w, cu_seqlens=cu_arg)

                def fwd_bwd():
                    y = causal_conv1d_silu(qkv, w, cu_seqlens=cu_arg)
                    return (y.detach(), *torch.autograd.grad(y, [wide, w], cot))

                try:
                    got = fwd_bwd()
                    first = first or got
                    diff = ", ".join(f"{(a.float() - b.float()).abs().max().item():.1e}" for a, b in zip(got, first))
                    f, fb = timed(fwd, args), timed(fwd_bwd, args)
                    print(f"| {ftile} | {btile} | {rows} | {T} | {f:.3f} | {fb:.3f} | {fb - f:.3f} | {diff} |",
                          flush=True)
                except Exception as e:  # a tile that cannot compile or run is reported, not fatal
                    print(f"| {ftile} | {btile} | {rows} | {T} | failed: {type(e).__name__}: {str(e)[:100]} |",
                          flush=True)
                finally:
                    conv_module.FWD_TILE, conv_module.BWD_TILE = default


def main():
    args = parse()
    if args.conv_tiles:
        card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (Triton interpreter)"
        print(f"Card: {card}; torch {torch.__version__}; bf16 conv over 8192 channels of a [T, 1, 12352] split view, "
              f"W = 4, no bias, SiLU; median of {args.iters} after {args.warmup}", flush=True)
        return conv_tiles(args)
    from qla_megatron.layers.conv import causal_depthwise_conv1d
    from qla_megatron.layers.kernels import causal_conv1d_silu, gate_head, gated_rms_norm

    try:
        from fla.modules.convolution import causal_conv1d as fla_conv
    except ImportError:
        fla_conv = None
    try:
        from fla.modules import FusedRMSNormGated
    except ImportError:
        FusedRMSNormGated = None
    dev, dt = args.device, torch.bfloat16
    HV, V, D = 32, 128, 2 * 16 * 128 + 32 * 128
    card = torch.cuda.get_device_name() if dev == "cuda" else "CPU (Triton interpreter)"
    print(f"Card: {card}; torch {torch.__version__}; bf16; hidden 2048, heads 16/32, "
          f"K = V = 128; median of {args.iters} after {args.warmup}; fla: {fla_conv is not None}", flush=True)
    print("| kernel | tokens | fwd ms | fwd+bwd ms |\n|---|---|---|---|", flush=True)
    for T in args.tokens:
        wide = torch.randn(T, 1, D + HV * V + 2 * HV, device=dev, dtype=dt, requires_grad=True)
        view = wide.transpose(0, 1)
        qkv, z = view[..., :D], view[..., D:D + HV * V].reshape(1, T, HV, V)
        b_raw, a_raw = view[..., D + HV * V:D + HV * V + HV], view[..., D + HV * V + HV:]
        w = (torch.randn(D, 1, 4, device=dev) / 2).to(dt).requires_grad_()
        lengths = torch.full((args.seqs,), T // args.seqs)
        lengths[-1] += T - int(lengths.sum())
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(dev)
        leaves = [wide, w]
        row("conv+SiLU ours (Triton)", T, lambda: causal_conv1d_silu(qkv, w), leaves, args)
        row("conv+SiLU torch path (cuDNN conv1d, transposed view)", T,
            lambda: F.silu(causal_depthwise_conv1d(qkv, w)), leaves, args)
        if fla_conv is not None:
            row("conv+SiLU FLA causal_conv1d", T,
                lambda: fla_conv(x=qkv, weight=w.squeeze(1), activation="silu")[0], leaves, args)
        row(f"conv+SiLU ours, {args.seqs} packed seqs", T, lambda: causal_conv1d_silu(qkv, w, cu_seqlens=cu), leaves,
            args)
        row(f"conv+SiLU torch path, {args.seqs} packed seqs", T,
            lambda: F.silu(causal_depthwise_conv1d(qkv, w, cu_seqlens=cu)), leaves, args)
        if fla_conv is not None:
            row(f"conv+SiLU FLA, {args.seqs} packed seqs", T,
                lambda: fla_conv(x=qkv, weight=w.squeeze(1), activation="silu", cu_seqlens=cu)[0], leaves, args)

        o = torch.randn(1, T, HV, V, device=dev, dtype=dt, requires_grad=True)
        norm = torch.nn.RMSNorm(V, eps=1e-5, device=dev, dtype=dt)
        leaves = [o, wide, norm.weight]

        def torch_norm():  # the layer's torch path (_gated_norm without the kernels)
            normed = norm(o.reshape(-1, V))
            out = (normed * F.silu(z.reshape(-1, V).float())).to(o.dtype)
            return out.reshape(1, T, HV * V).transpose(0, 1).contiguous()

        row("gated RMSNorm ours (Triton, out in [s, b, h*v])", T,
            lambda: gated_rms_norm(o, z, norm.weight, 1e-5, out_layout="sbd"), leaves, args)
        row("gated RMSNorm torch path (+ transpose copy)", T, torch_norm, leaves, args)
        if FusedRMSNormGated is not None:
            fla_norm = FusedRMSNormGated(V, eps=1e-5).to(dev, dt)
            row("gated RMSNorm FLA FusedRMSNormGated ([b, s, h, v], no transpose)", T,
                lambda: fla_norm(o, z), [o, wide, fla_norm.weight], args)

        A_log = torch.empty(HV, device=dev).uniform_(1, 16).log().to(dt).requires_grad_()
        dt_bias = torch.ones(HV, device=dev, dtype=dt, requires_grad=True)
        leaves = [wide, A_log, dt_bias]

        def torch_head():
            g = -A_log.float().exp() * F.softplus(a_raw.float() + dt_bias.float())
            return torch.cat([g, b_raw.sigmoid().float()], -1)

        row("decay head ours (Triton: g, beta)", T,
            lambda: torch.cat([t.float() for t in gate_head(a_raw, b_raw, A_log, dt_bias)], -1), leaves, args)
        row("decay head torch path (g, beta)", T, torch_head, leaves, args)
        print("(the decay head rows include one torch.cat of g and beta in both: the cotangent is shared)", flush=True)


if __name__ == "__main__":
    main()
