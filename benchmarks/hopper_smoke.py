"""GPU smoke for the Hopper forward: cold compile time of the forward set, parallel precompile of the
kernels the GPU tests need, then a quick timing of ours. Used from one device call:

    source .gpu/env.sh && python benchmarks/hopper_smoke.py
"""
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from qla_megatron.ops.gated_delta_rule.hopper.chunk import _compile_one, forward_set, precompile  # noqa: E402


def main():
    if "--precompile-only" in sys.argv:
        return precompile_tests()
    if "--breakdown" in sys.argv:
        return breakdown()
    if "--warm" in sys.argv:   # a fresh process, kernels already in TileLang's disk cache
        t = time.time()
        for it in forward_set(16, 32, 128, 128):
            _compile_one(it)
        print(f"warm start from the disk cache, forward set 32/16: {time.time() - t:.2f} s", flush=True)
        return
    # Cold compile of one (H, HV) forward set, sequential, in a fresh cache (what a user waits for).
    cache = os.environ.get("TILELANG_CACHE_DIR")
    items = forward_set(16, 32, 128, 128)
    per = [_compile_one(it) for it in items]
    print(f"cold compile, forward set 32/16 (sequential, cache {cache}): total {sum(per):.1f} s; "
          f"each {[round(p, 1) for p in per]}", flush=True)
    t = time.time()
    _compile_one(items[0])
    print(f"warm start (in-process cache) {time.time() - t:.3f} s", flush=True)
    precompile_tests()


def precompile_tests():
    """Kernels the GPU tests and bench_ops.py use, compiled in parallel into the disk cache."""
    heads = [(2, 8), (4, 16), (8, 32), (16, 32), (16, 48), (16, 64), (32, 32)]
    todo = [it for h, hv in heads for i, it in enumerate(forward_set(h, hv, 128, 128)) if i in (0, 1, 2, 5)]
    todo += [it for V in (64, 128, 256) for i, it in enumerate(forward_set(2, 4, 128, V)) if i in ((0, 2) if V == 64 else (2,))]
    todo += [it for i, it in enumerate(forward_set(2, 4, 128, 128, torch.float16)) if i in (0, 2)]
    print(f"parallel precompile of {len(todo)} kernels: {precompile(todo, workers=15):.1f} s", flush=True)


def breakdown():
    """Per-stage times (median, do_bench) of the Hopper forward at 1 x 32768 tokens."""
    import triton
    from qla_megatron.ops.gated_delta_rule.hopper import chunk as hc
    from qla_megatron.ops.gated_delta_rule.intra_cp import IntraCPConfig
    bench = lambda f: triton.testing.do_bench(f, warmup=10, rep=50, return_mode="median")
    for HV, H in ((32, 16), (8, 2)):
        T, K = 32768, 128
        dev = "cuda"
        q = torch.nn.functional.normalize(torch.randn(T, H, K, device=dev), dim=-1).bfloat16()
        k = torch.nn.functional.normalize(torch.randn(T, H, K, device=dev), dim=-1).bfloat16()
        v = torch.randn(T, HV, K, device=dev).bfloat16()
        g = -torch.rand(T, HV, device=dev)
        b = torch.rand(T, HV, device=dev)
        bounds = (0, T)
        seg = hc.plan_segment_len([T], HV, K, K, hc._num_sms(0), BV=hc.BV)
        whole = hc._make_plan(bounds, None, torch.device(dev))
        Gc, Bc, Rk, A = hc.prepare(k, g, b, whole.chunks, HV, l2norm=True)
        out = {"prepare": bench(lambda: hc.prepare(k, g, b, whole.chunks, HV, l2norm=True)),
               "forward, no intra-CP": bench(lambda: hc.forward(q, k, v, Gc, Bc, Rk, A, whole.segs, 0.1,
                                                                n_final=1, l2norm=True))}
        if seg:
            p = hc._make_plan(bounds, seg, torch.device(dev))
            out["summary"] = bench(lambda: hc.forward(q, k, v, Gc, Bc, Rk, A, p.sum_segs, 0.1,
                                                      n_final=p.sum_segs.shape[0], summary=True, l2norm=True))
            h0 = torch.zeros(p.NS, HV, K, K, device=dev)
            out[f"forward, {p.NS} segments"] = bench(lambda: hc.forward(q, k, v, Gc, Bc, Rk, A, p.segs, 0.1,
                                                                         h0=h0, n_final=1, l2norm=True))
            out["whole op (intra-CP)"] = bench(lambda: hc.chunk_gated_delta_rule_fwd(
                q[None], k[None], v[None], g[None], b[None], None, None, True, None, True))
        out["whole op (no intra-CP)"] = bench(lambda: hc.chunk_gated_delta_rule_fwd(
            q[None], k[None], v[None], g[None], b[None], None, None, True, None, True,
            intra_cp=IntraCPConfig(enabled=False)))
        print(f"breakdown {HV}/{H} 1x{T} (seg {seg}): " + ", ".join(f"{n} {t:.3f} ms" for n, t in out.items()),
              flush=True)


if __name__ == "__main__":
    main()
