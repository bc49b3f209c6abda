"""GPU smoke for the Hopper path: parallel precompile of the kernels the GPU tests and benchmarks
need, cold compile time of one kernel set, and per-stage times of forward and backward. From one
device call:

    source .gpu/env.sh && python benchmarks/hopper_smoke.py --precompile-only
    source .gpu/env.sh && python benchmarks/hopper_smoke.py --breakdown [--heads 32/16,8/2]
    source .gpu/env.sh && python benchmarks/hopper_smoke.py            # cold compile of the 32/16 set
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from qla_megatron.ops.gated_delta_rule.hopper.chunk import _compile_one, kernel_set, precompile  # noqa: E402

HEADS = [(2, 8), (4, 16), (8, 32), (16, 32), (16, 48), (16, 64), (32, 32)]   # (H, HV)


def main():
    if "--precompile-only" in sys.argv:
        return precompile_tests()
    if "--breakdown" in sys.argv:
        return breakdown()
    cache = os.environ.get("TILELANG_CACHE_DIR")
    items = kernel_set(16, 32, 128, 128)
    per = [_compile_one(it) for it in items]
    print(f"cold compile, kernel set 32/16 (sequential, cache {cache}): total {sum(per):.1f} s; "
          f"each {[round(p, 1) for p in per]}", flush=True)
    precompile_tests()


def precompile_tests():
    """Every kernel the GPU tests (tests/ops/test_hopper_*.py) and bench_ops.py launch, in parallel."""
    todo = gpu_test_kernels()
    print(f"parallel precompile of {len(todo)} kernels: {precompile(todo, workers=15):.1f} s", flush=True)


def gpu_test_kernels():
    """[(factory name, args, kwargs)] of every kernel the GPU tests and bench_ops.py launch."""
    todo = [it for h, hv in HEADS for it in kernel_set(h, hv, 128, 128)]
    todo += kernel_set(2, 4, 128, 64) + kernel_set(2, 4, 128, 256)
    todo += kernel_set(2, 4, 128, 128, torch.float16) + kernel_set(2, 8, 128, 128, l2norm=False)
    for gc in (0, 2):     # the exact summaries and the tests' 2-chunk warm-ups
        todo += [it for it in kernel_set(2, 8, 128, 128, gate_chunks=gc) if it[2].get("summary")]
    todo += [it for it in kernel_set(16, 32, 128, 128, gate_chunks=0) if it[2].get("summary")]
    return list({repr(it): it for it in todo}.values())


def breakdown():
    """Per-stage times (median, do_bench) of the Hopper forward and backward at 1 x 32768 tokens."""
    import triton
    from qla_megatron.ops.gated_delta_rule.hopper import backward as hb
    from qla_megatron.ops.gated_delta_rule.hopper import chunk as hc
    from qla_megatron.ops.gated_delta_rule.intra_cp import IntraCPConfig
    bench = lambda f: triton.testing.do_bench(f, warmup=10, rep=50, return_mode="median")
    heads = ((32, 16), (8, 2))
    if "--heads" in sys.argv:   # e.g. --heads 48/16,32/8 (v-heads/qk-heads)
        heads = [tuple(map(int, c.split("/"))) for c in sys.argv[sys.argv.index("--heads") + 1].split(",")]
    for HV, H in heads:
        T, K, dev = 32768, 128, "cuda"
        q = torch.randn(1, T, H, K, device=dev).bfloat16()
        k = torch.randn(1, T, H, K, device=dev).bfloat16()
        v = torch.randn(1, T, HV, K, device=dev).bfloat16()
        A = torch.empty(HV, device=dev).uniform_(1, 16)
        g = -A * torch.nn.functional.softplus(torch.randn(1, T, HV, device=dev))
        b = torch.rand(1, T, HV, device=dev).bfloat16()
        do = torch.randn_like(v)
        out = {}
        for name, cfg in (("no intra-CP", IntraCPConfig(enabled=False)), ("intra-CP", IntraCPConfig())):
            fwd = lambda: hc.chunk_gated_delta_rule_fwd(q, k, v, g, b, None, None, True, None, True, intra_cp=cfg,
                                                        save_for_backward=True)
            o, ht, saved = fwd()
            p = saved.plan
            qf, kf, vf, gf, bf = hc.flat_inputs(q, k, v, g, b)
            dof = do.reshape(T, HV, K)
            out[f"fwd ({name}, {p.NS} segments)"] = bench(fwd)
            states = torch.empty(p.NC, HV, K, K, dtype=q.dtype, device=dev)
            dstates = torch.empty_like(states)
            out[f"states pass ({name})"] = bench(lambda: hc.forward(qf, kf, vf, saved.Ai, saved.P, saved.F, p.segs,
                                                                    h0=saved.starts, states=states, emit_o=False))
            dht = torch.zeros(p.NS if p.bsum_segs is not None else 1, HV, K, K, device=dev)
            if p.bsum_segs is not None:
                NSS = p.bsum_segs.shape[0]
                out[f"bwd summary ({name})"] = bench(lambda: hb.backward_dh(
                    qf, kf, dof, saved.Ai, saved.P, saved.F, p.bsum_segs, n_final=NSS, summary=True,
                    gate_chunks=cfg.warmup_chunks))
            out[f"adjoint walk ({name})"] = bench(lambda: hb.backward_dh(
                qf, kf, dof, saved.Ai, saved.P, saved.F, p.bsegs, dht=dht, n_final=1, dstates=dstates, states=states,
                starts=saved.starts))
            out[f"grads ({name})"] = bench(lambda: hb.backward_grads(qf, kf, vf, dof, gf, bf, p.chunks, saved.Ai,
                                                                     saved.P, states, dstates, None, saved.scale,
                                                                     True))
            out[f"whole bwd ({name})"] = bench(lambda: hb.chunk_gated_delta_rule_bwd(saved, q, k, v, g, b, do, ht,
                                                                                     True))
        print(f"breakdown {HV}/{H} 1x{T}: " + ", ".join(f"{n} {t:.3f} ms" for n, t in out.items()), flush=True)


if __name__ == "__main__":
    main()
