"""Quick start: the chunked gated delta rule forward + backward at a realistic size.

Runs `chunk_gated_delta_rule` on random inputs (default 1 x 8192 tokens, 4 qk / 8 v heads,
K = V = 128, float32 on CPU), prints which backend ran, the time, and the error against the float64
token-by-token recurrence (o and final state) and against the float64 chunked op (gradients).

    python examples/quickstart.py                       # CPU, about a minute on 2 cores
    python examples/quickstart.py --tokens 2048 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from qla_megatron.ops import chunk_gated_delta_rule, recurrent_gated_delta_rule, which_backend


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--qk-heads", type=int, default=4)
    p.add_argument("--v-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=None, help="default: fresh random inputs each run")
    return p.parse_args()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main():
    args = parse_args()
    if args.seed is not None:
        torch.manual_seed(args.seed)
    B, T, H, HV, K = args.batch, args.tokens, args.qk_heads, args.v_heads, args.head_dim
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    for name, val in (("--batch", B), ("--tokens", T), ("--qk-heads", H), ("--v-heads", HV), ("--head-dim", K)):
        if val < 1:
            raise SystemExit(f"{name} must be >= 1, got {val}")

    # Gates as the GDN layer makes them: g = -exp(A_log) * softplus(a + dt_bias), A in [1, 16].
    A_log = torch.empty(HV).uniform_(1, 16).log()
    dt_bias = torch.randn(HV)
    g = -A_log.exp() * F.softplus(torch.randn(B, T, HV) + dt_bias)
    beta = torch.rand(B, T, HV)
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    v = torch.randn(B, T, HV, K)
    h0 = torch.randn(B, HV, K, K)
    leaves64 = [t.double() for t in (q, k, v, g, beta)] + [h0.double()]
    leaves = [t.to(dev, dtype).requires_grad_() for t in (q, k, v)] + \
             [t.to(dev).requires_grad_() for t in (g, beta, h0)]
    backend = which_backend(leaves[0], leaves[1], leaves[2], backend=args.backend)
    print(f"inputs: B={B} T={T} H={H} HV={HV} K=V={K} {args.dtype} on {dev}; backend: {backend}", flush=True)
    kw = dict(output_final_state=True, use_qk_l2norm_in_kernel=True)

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    o, s = chunk_gated_delta_rule(*leaves[:5], initial_state=leaves[5], backend=args.backend, **kw)
    sync()
    t1 = time.perf_counter()
    do, ds = torch.randn_like(o, dtype=torch.float64), torch.randn_like(s, dtype=torch.float64)
    loss = (o.double() * do).sum() + (s.double() * ds).sum()
    grads = torch.autograd.grad(loss, leaves)
    sync()
    t2 = time.perf_counter()
    print(f"forward {1e3 * (t1 - t0):.1f} ms, backward {1e3 * (t2 - t1):.1f} ms, "
          f"{B * T / (t2 - t0):,.0f} tokens/s fwd+bwd", flush=True)

    print("float64 token-by-token recurrence (the reference) ...", flush=True)
    t3 = time.perf_counter()
    with torch.no_grad():
        o_ref, s_ref = recurrent_gated_delta_rule(*leaves64[:5], initial_state=leaves64[5], **kw)
    print(f"  took {time.perf_counter() - t3:.1f} s", flush=True)
    print(f"rel. L2 error vs float64 recurrence: o {rel(o.cpu(), o_ref):.2e}, "
          f"final state {rel(s.cpu(), s_ref):.2e}")

    # Gradients: against the float64 chunked op (itself tested against the recurrence in tests/ops).
    ref_leaves = [t.clone().requires_grad_() for t in leaves64]
    o64, s64 = chunk_gated_delta_rule(*ref_leaves[:5], initial_state=ref_leaves[5], backend="torch", **kw)
    grads64 = torch.autograd.grad((o64 * do.cpu()).sum() + (s64 * ds.cpu()).sum(), ref_leaves)
    names = ("dq", "dk", "dv", "dg", "dbeta", "dh0")
    print("rel. L2 error of gradients vs float64 chunked op: " +
          ", ".join(f"{n} {rel(a.cpu(), b):.2e}" for n, a, b in zip(names, grads, grads64)))


if __name__ == "__main__":
    main()
