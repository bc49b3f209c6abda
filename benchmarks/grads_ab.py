"""A/B of the backward's gradient kernel (hopper/backward_grads.py) against other versions of it, in
one device call: same random inputs, outputs poisoned with NaN before each launch, do_bench medians
in interleaved rounds, the relative L2 difference of every output from the checkout's, and whether
20 reruns give the same bits (a race would not). For kernel work on a GPU lent by the minute: the
candidate's outputs must equal the verified baseline's (up to summation order) before the float64
suite is worth a call.

    git show HEAD~1:qla_megatron/ops/gated_delta_rule/hopper/backward_grads.py > .gpu/grads_base.py
    python benchmarks/grads_ab.py build --baseline .gpu/grads_base.py     # here: compile both for sm_90a
    # (--variant FILE, repeatable: more candidates, each timed against the checkout's kernel)
    # device call, carry [".gpu", ".gpu_cache"]:
    source .gpu/env.sh && python benchmarks/warm_cache.py unpack && \
        python benchmarks/grads_ab.py time --baseline .gpu/grads_base.py
    source .gpu/env.sh && PROFILE=1 ncu --clock-control none --profile-from-start off --launch-count 1 \\
        -k regex:kernel_kernel --section SourceCounters -o grads python benchmarks/grads_ab.py profile

`build` compiles into build/grads_ab_cache and packs every kernel that cache holds into
.gpu_cache/tilelang-grads-ab.tar.xz (xz: ~0.3 MB a kernel instead of ~1 MB raw), which
`warm_cache.py unpack` installs on the host with the other carried kernels, so the device spends no
time compiling. Inputs are random (S, dS, Ai, P too): the timing is the
kernel's on data of the right shapes, not a check of its mathematics (tests/ops/test_hopper_backward.py
does that against the float64 recurrence). The last chunk holds 37 tokens, so masked rows are covered.
"""

import argparse
import importlib.util
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CACHE = os.path.join(ROOT, "build", "grads_ab_cache")                   # ignored by git, not carried
ARCHIVE = os.path.join(ROOT, ".gpu_cache", "tilelang-grads-ab.tar.xz")
K = 128


def factories(baseline, variants=()):
    """[(name, kernel factory)]: the checkout's kernel first, then the baseline's, then each variant's
    (named by its file)."""
    from qla_megatron.ops.gated_delta_rule.hopper.backward_grads import backward_grads_kernel
    out = [("current", backward_grads_kernel)]
    files = ([("baseline", baseline)] if baseline else []) + [
        (os.path.splitext(os.path.basename(f))[0], f) for f in variants]
    for name, path in files:
        spec = importlib.util.spec_from_file_location(f"grads_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        out.append((name, mod.backward_grads_kernel))
    return out


def heads(arg):
    """'HV/H,...' -> [(H, HV), ...]"""
    return [tuple(int(x) for x in c.split("/"))[::-1] for c in arg.split(",")]


def build(args):
    from benchmarks.hopper_compile_cpu import stub_libcuda
    stub_libcuda()
    os.environ["TILELANG_CACHE_DIR"] = CACHE
    os.environ["TILELANG_DEFAULT_TARGET"] = json.dumps({"kind": "cuda", "arch": "sm_90a"})
    from benchmarks.warm_cache import TARGET, pack_tilelang, tilelang_namespace
    for H, HV in heads(args.heads):
        for name, fac in factories(args.baseline, args.variant):
            t = time.time()
            fac(H, HV, K, K, "bfloat16", l2norm=True)
            print(f"{HV}/{H} {name}: {time.time() - t:.0f} s", flush=True)
    # Every kernel this cache holds (earlier builds' candidates too, these among them), so that a
    # build for one more variant does not drop the others from the archive.
    ns = tilelang_namespace()
    keys = [d for d in os.listdir(os.path.join(CACHE, ns)) if os.path.isfile(os.path.join(CACHE, ns, d, "manifest.json"))]
    os.makedirs(os.path.dirname(ARCHIVE), exist_ok=True)
    import tilelang
    size = pack_tilelang(CACHE, ns, keys, ARCHIVE,
                         {"tilelang": tilelang.__version__, "target": TARGET, "built": time.strftime("%Y-%m-%d %H:%M"),
                          "grads_ab": {"heads": args.heads, "baseline": args.baseline, "variants": args.variant}})
    print(f"{ARCHIVE}: {len(keys)} kernels, {size / 1e6:.2f} MB", flush=True)


def inputs(H, HV, T, dev="cuda"):
    import torch
    gen = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, device=dev, generator=gen) * scale).bfloat16()
    NC = T // 64
    n = torch.full((NC,), 64, device=dev)
    n[-1] = 37
    chunks = torch.stack([torch.arange(NC, device=dev) * 64, n], 1).int().contiguous()
    # decays from weak to strong across the v-heads
    g = -torch.rand(T, HV, device=dev, generator=gen) * torch.linspace(0.01, 3, HV, device=dev)
    beta = torch.rand(T, HV, device=dev, generator=gen)
    return (rnd(T, H, K), rnd(T, H, K), rnd(T, HV, K), rnd(T, HV, K), g, beta, chunks,
            rnd(NC, HV, 64, 64, scale=0.1), rnd(NC, HV, 64, 64, scale=0.1), rnd(NC, HV, K, K, scale=0.1),
            rnd(NC, HV, K, K, scale=0.1), torch.randn(NC, HV, K, device=dev, generator=gen) * 1e-3, K ** -0.5)


def poisoned(H, HV, T, dev="cuda"):
    import torch
    nan = float("nan")
    return [torch.full((T, H, K), nan, device=dev).bfloat16(), torch.full((T, H, K), nan, device=dev).bfloat16(),
            torch.full((T, HV), nan, device=dev), torch.full((T, HV), nan, device=dev)]


def run(args):
    import torch
    import triton
    for H, HV in heads(args.heads):
        x = inputs(H, HV, args.tokens)
        ref, kerns = None, []
        for name, fac in factories(*((args.baseline, args.variant) if args.cmd == "time" else (None,))):
            kern = fac(H, HV, K, K, "bfloat16", l2norm=True)
            out = poisoned(H, HV, args.tokens)
            kern(*x, *out)
            torch.cuda.synchronize()
            if args.cmd == "profile":
                torch.cuda.profiler.start()
                kern(*x, *out)
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
                return
            res = [o.float().clone() for o in out]
            nans = ",".join(str(int(torch.isnan(r).sum())) for r in res)   # the masked rows only
            res = [torch.nan_to_num(r, nan=0.0) for r in res]
            # A race shows as reruns that differ: the outputs of 20 more launches against the first's.
            same = True
            for _ in range(20):
                kern(*x, *out)
                same = same and all(torch.equal(torch.nan_to_num(o.float(), nan=0.0), r) for o, r in zip(out, res))
            diff = f"  20 reruns bit-identical: {'yes' if same else 'NO'}"
            if ref is not None:
                diff += "  rel. diff dq dk dg dbeta from current: " + " ".join(
                    f"{float((a - b).norm() / b.norm()):.2e}" for a, b in zip(ref, res))
            ref = ref if ref is not None else res
            print(f"{HV}/{H} 1x{args.tokens} {name:9s} NaN (masked rows) dq dk dg dbeta: {nans}{diff}", flush=True)
            kerns.append((name, kern, out))
        # Interleaved rounds: a clock or thermal drift shows as a spread between them, not as a difference.
        times = {name: [] for name, _, _ in kerns}
        for _ in range(args.rounds):
            for name, kern, out in kerns:
                times[name].append(triton.testing.do_bench(lambda: kern(*x, *out), warmup=20, rep=100,
                                                           return_mode="median"))
        for name, ts in times.items():
            print(f"{HV}/{H} 1x{args.tokens} {name:9s} {min(ts):.4f} ms (rounds: {' '.join(f'{t:.4f}' for t in ts)})",
                  flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cmd", choices=("build", "time", "profile"))
    ap.add_argument("--baseline", default=None, help="another version of backward_grads.py to compare with")
    ap.add_argument("--variant", action="append", default=[],
                    help="another backward_grads.py to time against the checkout's (repeatable)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--heads", default="32/16,8/2", help="v-heads/qk-heads, comma-separated")
    ap.add_argument("--tokens", type=int, default=32768)
    args = ap.parse_args()
    build(args) if args.cmd == "build" else run(args)


if __name__ == "__main__":
    main()
