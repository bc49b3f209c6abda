"""prepare head grouping, A/B: v-heads a program (HP), qk-head sharing, min_blocks, at 1 x 32768.

    source .gpu/env.sh && python benchmarks/prepare_heads_ab.py

For each (H, HV) the first entry is the reference: every other grouping must give bit-identical Ag, P,
F (outputs poisoned with NaN before each run), then the median do_bench time of one launch. The
choices in chunk.prepare_heads come from this table (results/prepare_rs_heads_h100.md).
"""

import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qla_megatron.ops.gated_delta_rule.hopper import chunk as hc  # noqa: E402
from qla_megatron.ops.gated_delta_rule.hopper.prepare import prepare_kernel  # noqa: E402

T, K = 32768, 128
CASES = [((16, 48), [dict(HP=1), dict(HP=3), dict(HP=3, min_blocks=1), dict(HP=1, min_blocks=2),
                     dict(HP=2, share_qk=False), dict(HP=2, share_qk=False, min_blocks=2)]),
         ((16, 64), [dict(HP=2), dict(HP=2, min_blocks=2), dict(HP=4), dict(HP=4, min_blocks=1)]),
         ((16, 32), [dict(HP=2), dict(HP=2, min_blocks=3), dict(HP=2, min_blocks=2)]),
         ((8, 32), [dict(HP=2), dict(HP=4)]),
         ((4, 16), [dict(HP=2), dict(HP=4)]),
         ((2, 8), [dict(HP=2), dict(HP=4)]),
         ((32, 32), [dict(HP=1), dict(HP=2, share_qk=False), dict(HP=2, share_qk=False, min_blocks=2)])]


def main():
    bench = lambda f: triton.testing.do_bench(f, warmup=10, rep=60, return_mode="median")  # noqa: E731
    print(f"precompile {hc.precompile([('prepare', (H, HV, K, 'bfloat16'), dict(l2norm=True, **kw)) for (H, HV), kws in CASES for kw in kws], workers=13):.0f} s", flush=True)
    for (H, HV), kws in CASES:
        q = torch.nn.functional.normalize(torch.randn(T, H, K, device="cuda"), dim=-1).bfloat16()
        k = torch.nn.functional.normalize(torch.randn(T, H, K, device="cuda"), dim=-1).bfloat16()
        g = -torch.rand(T, HV, device="cuda")
        b = torch.rand(T, HV, device="cuda")
        plan = hc._make_plan((0, T), None, torch.device("cuda"))
        NC = plan.chunks.shape[0]
        base = None
        for kw in kws:
            kern = prepare_kernel(H, HV, K, "bfloat16", l2norm=True, **kw)
            A = torch.full((NC, HV, 64, 64), float("nan"), device="cuda", dtype=torch.bfloat16)
            P = torch.full_like(A, float("nan"))
            F = torch.full((NC, HV, 4, 64), float("nan"), device="cuda")
            kern(q, k, g, b, plan.chunks, 0.1, A, P, F)
            torch.cuda.synchronize()
            out = (A.clone(), P.clone(), F.clone())
            base = base or out
            t = bench(lambda: kern(q, k, g, b, plan.chunks, 0.1, A, P, F))
            same = all(torch.equal(a, c) for a, c in zip(out, base)) and not any(x.isnan().any() for x in out)
            print(f"| {HV}/{H} | {kw} | {t:.3f} | {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
