"""Gradient accuracy of the op, ours vs FLA (its Triton path), against the float64 token-by-token
recurrence's gradients on the same bf16 inputs: relative L2 of dq, dk, dv, dg, dbeta, dh0, over
several seeds, and dg split into the zero-decay head and the rest (the inputs of
tests/ops/gdr_inputs.py: head 0 g = 0, head 1 A = 16, the others A in [1, 16]).

    source .gpu/env.sh && python benchmarks/grad_accuracy.py [--seeds 4] [--configs 2/8x1x1000,32/32x2x200]
"""
import argparse
import os
import sys

os.environ.setdefault("FLA_FLASH_QLA", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from qla_megatron.ops import recurrent_gated_delta_rule  # noqa: E402
from tests.ops.gdr_inputs import make_inputs, rel  # noqa: E402

NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dh0")


def runners():
    from qla_megatron.ops.gated_delta_rule.hopper.autograd import run
    out = {"ours": lambda q, k, v, g, b, h0: run(q, k, v, g, b, None, h0, True, None, True)}
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_fn
        out["fla"] = lambda q, k, v, g, b, h0: fla_fn(q, k, v, g, b, initial_state=h0, output_final_state=True,
                                                     use_qk_l2norm_in_kernel=True)
    except Exception as e:  # optional peer
        print("FLA unavailable:", e)
    out["reference"] = lambda q, k, v, g, b, h0: recurrent_gated_delta_rule(
        q.double(), k.double(), v.double(), g.double(), b.double(), initial_state=h0.double(),
        output_final_state=True, use_qk_l2norm_in_kernel=True)
    return out


def grads(fn, low, h0, do, dht):
    leaves = [t.detach().clone().requires_grad_(True) for t in low + [h0]]
    o, s = fn(*leaves)
    return torch.autograd.grad((o.double() * do).sum() + (s.double() * dht).sum(), leaves)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--configs", default="8/2x1x1000,32/32x2x200,48/16x1x1000,32/8x1x1000")
    args = ap.parse_args()
    fns = runners()
    for cfg in args.configs.split(","):
        heads, B, T = cfg.split("x")
        HV, H = map(int, heads.split("/"))
        B, T = int(B), int(T)
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            q, k, v, g, beta, h0 = make_inputs(B, T, H, HV, 128, 128, dtype=torch.float32)
            low = [t.cuda().bfloat16() for t in (q, k, v)] + [g.cuda(), beta.cuda().bfloat16()]
            h0 = h0.cuda()
            do = torch.randn(B, T, HV, 128, device="cuda", dtype=torch.float64)
            dht = torch.randn(B, HV, 128, 128, device="cuda", dtype=torch.float64)
            want = grads(fns["reference"], low, h0, do, dht)
            for name, fn in fns.items():
                if name == "reference":
                    continue
                got = grads(fn, low, h0, do, dht)
                errs = " ".join(f"{n}={rel(a, b):.2e}" for n, a, b in zip(NAMES, got, want))
                dg, wg = got[3].double(), want[3]
                z = rel(dg[..., 0], wg[..., 0])
                o = rel(dg[..., 1:], wg[..., 1:])
                print(f"{cfg} seed {seed} {name:5s} {errs}  dg zero-decay head {z:.2e}, other heads {o:.2e}",
                      flush=True)


if __name__ == "__main__":
    main()
