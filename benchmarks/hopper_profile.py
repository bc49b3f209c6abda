"""One launch of each Hopper stage at 32/16 heads x 32768 tokens, for Nsight Compute.

    source .gpu/env.sh && PROFILE=1 ncu --clock-control none --profile-from-start off \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        --section LaunchStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        python benchmarks/hopper_profile.py
    # SASS-level stall sampling of the first launch (prepare):
    source .gpu/env.sh && PROFILE=1 ncu --clock-control none --profile-from-start off --launch-count 1 \
        --section SourceCounters --section WarpStateStats -o prep python benchmarks/hopper_profile.py
    ncu --import prep.ncu-rep --page source --print-source sass --csv > prep_sass.csv

`--only NAME` (a stage's name up to its first space: prepare, summary, main, states, walk, grads)
profiles that stage alone, e.g. the backward's gradient kernel:
    source .gpu/env.sh && PROFILE=1 ncu --clock-control none --profile-from-start off --launch-count 1 \
        --section SourceCounters --section WarpStateStats --section SpeedOfLight -o grads \
        python benchmarks/hopper_profile.py --only grads

The stages run once outside the profiled range (compiles, warm-up), then once between
cudaProfilerStart / Stop: prepare, the summary (exact, then gate-driven), the main pass over the
planned segments, the main pass without intra-CP. Without PROFILE=1 it prints their do_bench medians.
Inputs as bench_ops.py's (strong decay: every window gates).
"""

import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qla_megatron.ops.gated_delta_rule.hopper import backward as hb  # noqa: E402
from qla_megatron.ops.gated_delta_rule.hopper import chunk as hc  # noqa: E402


def main():
    dev = "cuda"
    T, H, HV, K = 32768, 16, 32, 128
    torch.manual_seed(0)
    q = torch.randn(T, H, K, device=dev).bfloat16()
    k = torch.randn(T, H, K, device=dev).bfloat16()
    v = torch.randn(T, HV, K, device=dev).bfloat16()
    A = torch.empty(HV, device=dev).uniform_(1, 16)
    g = -A * torch.nn.functional.softplus(torch.randn(T, HV, device=dev) + torch.empty(HV, device=dev).uniform_(-1, 3))
    b = torch.rand(T, HV, device=dev)
    seg = hc.plan_segment_len([T], HV, K, K, hc._num_sms(0), BV=hc.bv_main(K))
    whole = hc._make_plan((0, T), None, torch.device(dev))
    p = hc._make_plan((0, T), seg, torch.device(dev))
    factors = hc.prepare(q, k, g, b, whole.chunks, HV, 0.1, True)
    NSS = p.sum_segs.shape[0]
    h0 = torch.zeros(p.NS, HV, K, K, device=dev)

    def fw(segs, **kw):
        return hc.forward(q, k, v, *factors, segs, **kw)

    # The backward's stages on the planned segments (chunk_gated_delta_rule_bwd's order, dht = 0).
    Ai, P, F = factors
    do = torch.randn_like(v)
    states = torch.randn(p.NC, HV, K, K, device=dev).bfloat16()      # filled by the states pass
    dstates = torch.randn_like(states)                               # filled by the walk
    dht = torch.zeros(p.NS, HV, K, K, device=dev)
    # The walk's <S, dS> corrections, allocated here: backward_grads would otherwise zero-fill one itself,
    # and that fill would be the first launch ncu's --launch-count 1 sees.
    sdc = torch.zeros(p.NC, HV, K, device=dev)
    calls = {
        "prepare": lambda: hc.prepare(q, k, g, b, whole.chunks, HV, 0.1, True),
        "summary": lambda: fw(p.sum_segs, n_final=NSS, summary=True),
        "summary gate-driven": lambda: fw(p.sum_segs, n_final=NSS, summary=True, gate_chunks=4),
        f"main pass, {p.NS} segments": lambda: fw(p.segs, h0=h0, n_final=1),
        "main pass, whole sequence": lambda: fw(whole.segs, n_final=1),
        "states pass": lambda: fw(p.segs, h0=h0, states=states, emit_o=False),
        "walk (adjoint)": lambda: hb.backward_dh(q, k, do, Ai, P, F, p.bsegs, dht=dht, n_final=1, dstates=dstates,
                                                 states=states),
        "grads": lambda: hb.backward_grads(q, k, v, do, g, b, p.chunks, Ai, P, states, dstates, sdc, 0.1, True),
    }
    if "--only" in sys.argv:
        only = sys.argv[sys.argv.index("--only") + 1]
        calls = {n: f for n, f in calls.items() if n.split()[0] == only}
    for f in calls.values():
        f()
    torch.cuda.synchronize()
    if os.environ.get("PROFILE") == "1":
        torch.cuda.profiler.start()
        for f in calls.values():
            f()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        return
    for name, f in calls.items():
        print(f"{name:32s} {triton.testing.do_bench(f, warmup=10, rep=50, return_mode='median'):.4f} ms")


if __name__ == "__main__":
    main()
