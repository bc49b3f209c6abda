"""GPU smoke for the Hopper forward: cold compile time of the forward set, parallel precompile of the
kernels the GPU tests need, then a quick timing of ours. Used from one device call:

    source .gpu/env.sh && python benchmarks/hopper_smoke.py

--forward fused,rs (default fused) names the forward kernel variants (hopper/chunk.py) whose cold compile is
measured and whose kernels are precompiled; with --breakdown, each variant is timed in the same run.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from qla_megatron.ops.gated_delta_rule.hopper.chunk import (  # noqa: E402
    _compile_one, forward_set, forward_variant, precompile)


def _variants():
    if "--forward" not in sys.argv:
        return ["fused"]
    names = sys.argv[sys.argv.index("--forward") + 1].split(",")
    for n in names:
        forward_variant(n)          # ValueError for an unknown name
    return names


def main():
    variants = _variants()
    if "--precompile-only" in sys.argv:
        return precompile_tests(variants)
    if "--breakdown" in sys.argv:
        return breakdown(variants)
    if "--warm" in sys.argv:   # a fresh process, kernels already in TileLang's disk cache
        for v in variants:
            t = time.time()
            for it in forward_set(16, 32, 128, 128, variant=v):
                _compile_one(it)
            print(f"warm start from the disk cache, forward set 32/16 ({v}): {time.time() - t:.2f} s", flush=True)
        return
    # Cold compile of one (H, HV) forward set, sequential, in a fresh cache (what a user waits for).
    cache = os.environ.get("TILELANG_CACHE_DIR")
    for v in variants:
        items = forward_set(16, 32, 128, 128, variant=v)
        per = [_compile_one(it) for it in items]
        print(f"cold compile, forward set 32/16 ({v}; sequential, cache {cache}): total {sum(per):.1f} s; "
              f"each {[round(p, 1) for p in per]}", flush=True)
        t = time.time()
        _compile_one(items[0])
        print(f"warm start (in-process cache) {time.time() - t:.3f} s", flush=True)
    precompile_tests(variants)


def precompile_tests(variants=("fused",)):
    """Kernels the GPU tests and bench_ops.py use, compiled in parallel into the disk cache. The tests
    that run the rs variant also run the fused one, so "rs" brings the fused set along."""
    heads = [(2, 8), (4, 16), (8, 32), (16, 32), (16, 48), (16, 64), (32, 32)]
    todo = []
    # The long-run tests compare rs with fused, so rs brings the fused set along.
    for v in (["fused"] + [x for x in variants if x != "fused"] if "rs" in variants else list(variants)):
        todo += [it for h, hv in heads for i, it in enumerate(forward_set(h, hv, 128, 128, variant=v)) if i in (0, 1, 2, 5, 6, 7)]
        todo += [it for V in (64, 128, 256) for i, it in enumerate(forward_set(2, 4, 128, V, variant=v))
                 if i in ((0, 2, 7) if V == 64 else (2, 7))]
        todo += [it for i, it in enumerate(forward_set(2, 4, 128, 128, torch.float16, variant=v)) if i in (0, 2, 7)]
        # test_variant_matches_recurrence_long without l2norm (both variants)
        todo += [it for i, it in enumerate(forward_set(2, 8, 128, 128, l2norm=False, variant=v)) if i in (0, 2, 5, 7)]
    if "rs" in variants:   # the exact summary kernel: the gate-driven test (2/8), the breakdown and bench (16/32)
        todo += [forward_set(h, hv, 128, 128, variant="rs", gate_chunks=0)[5] for h, hv in ((2, 8), (16, 32))]
    todo = list({repr(it): it for it in todo}.values())
    print(f"parallel precompile of {len(todo)} kernels ({', '.join(variants)}): "
          f"{precompile(todo, workers=15):.1f} s", flush=True)


def breakdown(variants=("fused",)):
    """Per-stage times (median, do_bench) of the Hopper forward at 1 x 32768 tokens, per variant."""
    import triton
    from qla_megatron.ops.gated_delta_rule.hopper import chunk as hc
    from qla_megatron.ops.gated_delta_rule.intra_cp import IntraCPConfig
    bench = lambda f: triton.testing.do_bench(f, warmup=10, rep=50, return_mode="median")
    heads = ((32, 16), (8, 2))
    if "--heads" in sys.argv:   # e.g. --heads 48/16,32/8 (v-heads/qk-heads)
        heads = [tuple(map(int, c.split("/"))) for c in sys.argv[sys.argv.index("--heads") + 1].split(",")]
    for HV, H in heads:
        T, K = 32768, 128
        dev = "cuda"
        q = torch.nn.functional.normalize(torch.randn(T, H, K, device=dev), dim=-1).bfloat16()
        k = torch.nn.functional.normalize(torch.randn(T, H, K, device=dev), dim=-1).bfloat16()
        v = torch.randn(T, HV, K, device=dev).bfloat16()
        g = -torch.rand(T, HV, device=dev)
        b = torch.rand(T, HV, device=dev)
        bounds = (0, T)
        whole = hc._make_plan(bounds, None, torch.device(dev))
        for var in variants:
            seg = hc.plan_segment_len([T], HV, K, K, hc._num_sms(0), BV=hc.bv_rs(K) if var == "rs" else hc.BV)
            if var == "rs":
                prep = lambda: hc.prepare_rs(q, k, g, b, whole.chunks, HV, 0.1, True)
                factors = prep()
                fw = lambda segs, **kw: hc.forward_rs(q, k, v, *factors, segs, **kw)
            else:
                prep = lambda: hc.prepare(k, g, b, whole.chunks, HV, l2norm=True)
                Gc, Bc, Rk, A = prep()
                fw = lambda segs, **kw: hc.forward(q, k, v, Gc, Bc, Rk, A, segs, 0.1, l2norm=True, **kw)
            out = {"prepare": bench(prep), "forward, no intra-CP": bench(lambda: fw(whole.segs, n_final=1))}
            if seg:
                p = hc._make_plan(bounds, seg, torch.device(dev))
                out["summary"] = bench(lambda: fw(p.sum_segs, n_final=p.sum_segs.shape[0], summary=True))
                if var == "rs":
                    out["summary (gate-driven)"] = bench(lambda: fw(p.sum_segs, n_final=p.sum_segs.shape[0],
                                                                    summary=True, gate_chunks=4))
                h0 = torch.zeros(p.NS, HV, K, K, device=dev)
                out[f"forward, {p.NS} segments"] = bench(lambda: fw(p.segs, h0=h0, n_final=1))
                out["whole op (intra-CP, exact)"] = bench(lambda: hc.chunk_gated_delta_rule_fwd(
                    q[None], k[None], v[None], g[None], b[None], None, None, True, None, True,
                    intra_cp=IntraCPConfig(mode="exact"), variant=var))
            if var == "rs":
                out["whole op (intra-CP, gate-driven)"] = bench(lambda: hc.chunk_gated_delta_rule_fwd(
                    q[None], k[None], v[None], g[None], b[None], None, None, True, None, True,
                    intra_cp=IntraCPConfig(mode="gate"), variant=var))
            out["whole op (no intra-CP)"] = bench(lambda: hc.chunk_gated_delta_rule_fwd(
                q[None], k[None], v[None], g[None], b[None], None, None, True, None, True,
                intra_cp=IntraCPConfig(enabled=False), variant=var))
            print(f"breakdown [{var}] {HV}/{H} 1x{T} (seg {seg}): "
                  + ", ".join(f"{n} {t:.3f} ms" for n, t in out.items()), flush=True)


if __name__ == "__main__":
    main()
