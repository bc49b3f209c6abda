"""A model of cross-GPU context parallelism for one GDN op: predicted per-rank step time and
weak-scaling efficiency at cp = 2..64, from the phases of parallel/cp.py timed on this card and an
all-gather rate given as an assumption.

Every rank runs its phases in parallel with the others, so a step is one rank's critical path. The
rank modelled is a middle rank of the contiguous layout with one sequence (its piece continues both
ways: it sends a forward and a backward summary and receives both, the most any rank does):

    fwd      forward_summaries (with the rank's one prepare) + all-gather(cp) + compose(fwalk, cp)
             + forward_run
    fwd+bwd  the same with forward_run's graph kept, + backward_summaries + all-gather(cp)
             + compose(bwalk, cp) + backward_run from that graph

all-gather(cp) = latency + (cp - 1) * bytes / rate, bytes = HV K (K + V) 4 per slot (the summaries
are fp32 and one slot a rank here). The phases and the compositions are timed on this card (median
of triton.testing.do_bench); the all-gather's latency and rate are the assumptions --ag-latency-us
and --ag-gbps (to be replaced by the NCCL measurement of the two-GPU issue). Efficiency = the op on
the same per-rank tokens without CP / the predicted step.

    source .gpu/env.sh && python benchmarks/cp_model.py --configs 32/16,8/2 --tokens-per-rank 32768,131072 \\
        --ag-gbps 300 --ag-latency-us 20 --out benchmarks/results/cp_model_h200
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.bench_ops import bench, make  # noqa: E402
from qla_megatron.ops import GDNOptions, chunk_gated_delta_rule  # noqa: E402
from qla_megatron.parallel import cp as cpm  # noqa: E402
from qla_megatron.parallel.cp_plan import cp_plan  # noqa: E402

CPS = (2, 4, 8, 16, 32, 64)


def phases(HV, H, T):
    """ms of the op without CP (fwd, fwd+bwd) and of the modelled rank's phases at T tokens a rank."""
    inputs = make(1, T, H, HV)
    do = torch.randn(1, T, HV, 128, dtype=torch.bfloat16, device="cuda")
    run = dict(scale=None, use_qk_l2norm_in_kernel=True, backend="tilelang", options=GDNOptions())

    def op(*x):
        return chunk_gated_delta_rule(*x, use_qk_l2norm_in_kernel=True, backend="tilelang")[0]
    with torch.no_grad():
        out = {"op fwd": bench(lambda: op(*inputs))}
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out["op fwd+bwd"] = bench(lambda: torch.autograd.grad(op(*leaves), leaves, do))
    plan = cp_plan("contiguous", 3, T)                  # rank 1 of 3: a piece continuing both ways
    run["kernels"] = cpm.on_kernels(inputs[:3], run)
    assert run["kernels"], "the model times the Hopper path (backend tilelang)"
    # On the kernels forward_summaries prepares the rank's stream (its one prepare) and returns it;
    # forward_run and the backward read those factors.
    fs, local = cpm.forward_summaries(inputs, plan, 1, run)
    Z = cpm.compose_walk(plan.fwalk, fs.repeat(3, 1, 1, 1), plan.NF, True)
    o, h0, graph = cpm.forward_run(inputs, plan, 1, Z, run, keep_graph=True, local=local)
    bs = cpm.backward_summaries(inputs, do, plan, 1, h0, None, run, graph)
    D = cpm.compose_walk(plan.bwalk, bs.repeat(3, 1, 1, 1), plan.NB, True)
    with torch.no_grad():
        out["summaries fwd"] = bench(lambda: cpm.forward_summaries(inputs, plan, 1, run))
        out["run fwd"] = bench(lambda: cpm.forward_run(inputs, plan, 1, Z, run, local=local))
        out["summaries bwd"] = bench(lambda: cpm.backward_summaries(inputs, do, plan, 1, h0, None, run, graph))
    # the local forward with what the backward needs kept, then the backward from it (as _StatePassing runs them)
    out["run fwd+bwd"] = bench(lambda: cpm.backward_run(
        do, plan, 1, h0, D, cpm.forward_run(inputs, plan, 1, Z, run, keep_graph=True, local=local)[2]))
    del inputs, do, leaves
    return out, fs.shape[1:]


def compose_ms(cp, shape):
    """ms of both compositions over cp ranks (one sequence, contiguous), on the compose kernel."""
    plan = cp_plan("contiguous", cp, 64)
    summ = torch.zeros((cp,) + tuple(shape), device="cuda")
    f = bench(lambda: cpm.compose_walk(plan.fwalk, summ, plan.NF, True))
    b = bench(lambda: cpm.compose_walk(plan.bwalk, summ, plan.NB, True))
    return f, b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="32/16,8/2")
    ap.add_argument("--tokens-per-rank", default="32768,131072")
    ap.add_argument("--ag-gbps", type=float, required=True, help="assumed all-gather rate, GB/s received a rank")
    ap.add_argument("--ag-latency-us", type=float, required=True, help="assumed all-gather latency, us")
    ap.add_argument("--out", default=None, help="write OUT.md")
    a = ap.parse_args()
    lines = [f"Assumed all-gather: {a.ag_latency_us} us + (cp - 1) x bytes / {a.ag_gbps} GB/s.", ""]
    header = ("| v/qk heads | tokens a rank | cp | summary bytes a rank | fwd ms (CP / op) | fwd+bwd ms (CP / op) "
              "| efficiency fwd, fwd+bwd |")
    for cfg in a.configs.split(","):
        HV, H = map(int, cfg.split("/"))
        for T in map(int, a.tokens_per_rank.split(",")):
            t, shape = phases(HV, H, T)
            print(f"{cfg} T={T}: " + ", ".join(f"{n} {v:.3f} ms" for n, v in t.items()), flush=True)
            lines.append(f"{cfg}, {T} tokens a rank, measured: " + ", ".join(f"{n} {v:.3f} ms" for n, v in t.items()))
            rows = [header, "|" + "---|" * 7]
            nbytes = shape.numel() * 4
            for cp in CPS:
                cf, cb = compose_ms(cp, shape)
                ag = (a.ag_latency_us * 1e-3) + (cp - 1) * nbytes / (a.ag_gbps * 1e9) * 1e3
                fwd = t["summaries fwd"] + ag + cf + t["run fwd"]
                fb = t["summaries fwd"] + ag + cf + t["summaries bwd"] + ag + cb + t["run fwd+bwd"]
                rows.append(f"| {cfg} | {T} | {cp} | {nbytes / 2**20:.1f} MiB | {fwd:.3f} / {t['op fwd']:.3f} "
                            f"| {fb:.3f} / {t['op fwd+bwd']:.3f} | {t['op fwd'] / fwd:.2f}, {t['op fwd+bwd'] / fb:.2f} |")
                print(rows[-1], flush=True)
            lines += [""] + rows + [""]
            torch.cuda.empty_cache()
    if a.out:
        with open(a.out + ".md", "w") as f:
            f.write(f"# Cross-GPU CP model for one GDN op ({torch.cuda.get_device_name()})\n\n")
            f.write("Command: `python benchmarks/cp_model.py " + " ".join(sys.argv[1:]) + "`\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
