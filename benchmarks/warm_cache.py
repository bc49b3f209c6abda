"""Compile caches that travel with a device call, so a fresh GPU host starts warm.

A device call lands on a fresh machine with empty caches: TileLang compiles our kernels (~70 s) and
FlashQLA's (minutes per shape), FLA's Triton kernels autotune (~140 s per head config). Three caches
travel instead:

* TileLang kernels, compiled here on the CPU for sm_90a. TileLang 0.1.15's disk cache key is a hash of
  the kernel's TIR, the resolved target ({"kind": "cuda", "arch": "sm_90a"}: what "auto" resolves to
  on an H100/H200, and what we give explicitly here), the host target ("c"), the execution backend
  (tvm_ffi), the pass configs, TileLang's version and the machine (x86_64). Paths, Python, torch and
  nvcc versions are not in it, and an entry (executable.so with the cubin inside, linking only libc;
  params.json; the two sources; manifest.json) loads on the host as it is. Packed with xz, our 98
  kernels of bench_ops.py's 7 head configs are about 0.7 MB (30 MB raw).
  FlashQLA's kernels are found by running its Python wrappers on the CPU with the launches, the
  Triton/torch.compile helpers and the device queries stubbed (an H200: sm_90, 132 SMs; the
  wrappers pick block sizes and intra-card CP from the SM count and the sequence lengths), recording
  every @tilelang.jit call, and compiling those calls.
* FLA's Triton autotune choices: only measurable on the GPU. The host writes them
  (<TRITON_CACHE_DIR>/<hash>/<fn>.autotune.json); `harvest` packs them into $OUT and `keep` files
  them under benchmarks/autotune/ (tracked: a few KB each, the measured H200 choices for this exact
  Triton 3.6.0 / FLA 0.6.0 / ptxas stack; a change of any of them changes the hash folder and the
  old files are simply not found).
* Triton's compiled kernels (optional, .gpu_cache/triton-bin.tar.xz): the cubin and metadata of each
  kernel the host compiled and its launcher modules, so that the chosen configs need not be compiled
  again either.

Here (CPU), once per change of the kernels; writes .gpu_cache/tilelang.tar.xz (ignored by git, carry it):

    python benchmarks/warm_cache.py build                    # ours: bench_ops.py's configs; FlashQLA: 32/16,8/2
    python benchmarks/warm_cache.py build --ours tests,bench --flashqla 32/16,8/2 --workers 2

On the host, carry [".gpu", ".gpu_cache"] and wrap the benchmark like this:

    source .gpu/env.sh && export TRITON_CACHE_DIR=/tmp/qla-triton-cache TRITON_CACHE_AUTOTUNING=1 \\
      && python benchmarks/warm_cache.py unpack && python benchmarks/bench_ops.py ...; \\
      python benchmarks/warm_cache.py harvest "$OUT"

    python benchmarks/warm_cache.py check      # on the host: which carried kernels load, without compiling

Back here, with the folder the call's files came back to:

    python benchmarks/warm_cache.py keep FILES_AT   # autotune JSONs -> benchmarks/autotune/,
                                                    # host-compiled TileLang / Triton kernels -> .gpu_cache/
"""

import argparse
import contextlib
import glob
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.hopper_compile_cpu import stub_libcuda  # noqa: E402

GPU_CACHE = os.path.join(ROOT, ".gpu_cache")          # ignored by git; carried
AUTOTUNE_DIR = os.path.join(ROOT, "benchmarks", "autotune")   # tracked
TARGET = {"kind": "cuda", "arch": "sm_90a"}
H200_SMS = 132
MANIFEST_DIR = "qla-manifests"                        # inside TILELANG_CACHE_DIR, beside the namespace
BUILD_CACHE = os.path.join(tempfile.gettempdir(), "qla-warm-cache", "tilelang")
FQ_SITE = os.path.join(tempfile.gettempdir(), "qla-warm-site")
DEVICE_LIMIT = 64 * 2 ** 20                            # what one device call may carry
RETURN_LIMIT = 16 * 2 ** 20                            # one file back from $OUT
TRITON_KEEP = (".json", ".cubin", ".so")               # what a cached Triton kernel needs to load


# ---------------------------------------------------------------------------------------------------
# archives

def _tar_xz(path, members):
    """members: [(arcname, file path)], written sorted, with fixed owner and time (reproducible)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".part"
    with tarfile.open(tmp, "w:xz", preset=9) as tar:
        for arc, src in sorted(members):
            info = tar.gettarinfo(src, arcname=arc)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            with open(src, "rb") as f:
                tar.addfile(info, f)
    os.replace(tmp, path)
    return os.path.getsize(path)


def _add_bytes(path, arcname, data):
    """A copy of the archive at path with one more member (for the manifest)."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "m")
        with open(src, "wb") as f:
            f.write(data)
        with tarfile.open(path, "r:xz") as tar:
            members = []
            for m in tar.getmembers():
                p = os.path.join(d, "x", m.name)
                os.makedirs(os.path.dirname(p), exist_ok=True)
                with open(p, "wb") as f:
                    f.write(tar.extractfile(m).read())
                members.append((m.name, p))
        return _tar_xz(path, members + [(arcname, src)])


def _extract(archive, dest):
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(archive, "r:xz") as tar:
        tar.extractall(dest, filter="data")
        return tar.getnames()


# ---------------------------------------------------------------------------------------------------
# TileLang's cache layout

def tilelang_namespace():
    """The kernels folder relative to TILELANG_CACHE_DIR ('0.1.15/linux-x86_64/kernels')."""
    from tilelang.cache.kernel_cache import KernelCache
    return os.path.join(KernelCache._get_cache_namespace(), KernelCache.cache_root_dir)


def pack_tilelang(cache_dir, namespace, keys, out, manifest):
    """Pack the entries <cache_dir>/<namespace>/<key>/ for keys into out (tar.xz), with the manifest
    as qla-manifests/<name of out>.json. Returns the archive's size."""
    members = []
    for key in sorted(set(keys)):
        d = os.path.join(cache_dir, namespace, key)
        files = sorted(os.listdir(d))
        if "manifest.json" not in files:
            raise FileNotFoundError(f"{d} is not a complete TileLang cache entry")
        members += [(os.path.join(namespace, key, f), os.path.join(d, f)) for f in files]
    with tempfile.TemporaryDirectory() as t:
        m = os.path.join(t, "manifest.json")
        with open(m, "w") as f:
            json.dump(dict(manifest, namespace=namespace, keys=sorted(set(keys)), archive=os.path.basename(out)), f,
                      indent=1, sort_keys=True)
        members.append((f"{MANIFEST_DIR}/{os.path.basename(out).split('.')[0]}.json", m))
        return _tar_xz(out, members)


def carried_manifests(cache_dir):
    out = []
    for p in sorted(glob.glob(os.path.join(cache_dir, MANIFEST_DIR, "*.json"))):
        with open(p) as f:
            out.append(json.load(f))
    return out


def unpack_tilelang(archives, cache_dir):
    """Extract the archives into cache_dir; returns the number of kernel entries they hold."""
    n = 0
    for a in archives:
        names = _extract(a, cache_dir)
        n += len({os.path.dirname(x) for x in names if x.endswith("/manifest.json")})
    return n


def new_tilelang_keys(cache_dir, namespace):
    """Entries in the cache that no carried archive brought: what this host compiled."""
    carried = {k for m in carried_manifests(cache_dir) for k in m["keys"]}
    root = os.path.join(cache_dir, namespace)
    if not os.path.isdir(root):
        return []
    return sorted(k for k in os.listdir(root)
                  if k not in carried and os.path.isfile(os.path.join(root, k, "manifest.json")))


# ---------------------------------------------------------------------------------------------------
# Triton's cache

def triton_autotune_files(triton_dir):
    """[(relative path '<hash>/<fn>.autotune.json', absolute path)]."""
    return [(os.path.relpath(p, triton_dir), p)
            for p in sorted(glob.glob(os.path.join(triton_dir, "*", "*.autotune.json")))]


def triton_binary_members(triton_dir, scratch):
    """Members for the compiled kernels in a Triton cache: each kernel's group file (its child paths
    made relative to the cache dir), metadata JSON and cubin, where all of them are there; and the
    compiled launcher / utility modules (*.so). The IRs (ttir, ttgir, llir, ptx, source) stay behind:
    a cached kernel loads without them."""
    members = []
    for grp in sorted(glob.glob(os.path.join(triton_dir, "*", "__grp__*.json"))):
        h = os.path.basename(os.path.dirname(grp))
        with open(grp) as f:
            children = json.load(f).get("child_paths") or {}
        keep = {c: p for c, p in children.items() if c.endswith(TRITON_KEEP)}
        local = {c: os.path.join(triton_dir, h, c) for c in keep}
        if not any(c.endswith(".cubin") for c in keep) or not all(os.path.exists(p) for p in local.values()):
            continue
        rel = os.path.join(scratch, h, os.path.basename(grp))
        os.makedirs(os.path.dirname(rel), exist_ok=True)
        with open(rel, "w") as f:
            json.dump({"child_paths": {c: f"{h}/{c}" for c in keep}, "qla_relative": True}, f)
        members.append((f"{h}/{os.path.basename(grp)}", rel))
        members += [(f"{h}/{c}", p) for c, p in local.items()]
    for so in sorted(glob.glob(os.path.join(triton_dir, "*", "*.so"))):
        members.append((os.path.relpath(so, triton_dir), so))
    return members


def unpack_triton_binaries(archive, triton_dir):
    """Extract, then point the group files' child paths at this cache dir."""
    names = _extract(archive, triton_dir)
    for n in names:
        if os.path.basename(n).startswith("__grp__"):
            p = os.path.join(triton_dir, n)
            with open(p) as f:
                g = json.load(f)
            if g.pop("qla_relative", False):
                g["child_paths"] = {c: os.path.join(triton_dir, r) for c, r in g["child_paths"].items()}
                with open(p, "w") as f:
                    json.dump(g, f)
    return len([n for n in names if os.path.basename(n).startswith("__grp__")])


def install_autotune(src_dir, triton_dir):
    """Copy <hash>/<fn>.autotune.json files from src_dir into the Triton cache (existing ones kept)."""
    n = 0
    for rel, p in triton_autotune_files(src_dir):
        dst = os.path.join(triton_dir, rel)
        if not os.path.exists(dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(p, dst)
            n += 1
    return n


# ---------------------------------------------------------------------------------------------------
# what to compile: (kind, factory, args, kwargs); args are JSON-able with torch dtypes tagged

def encode(x):
    import torch
    if isinstance(x, torch.dtype):
        return {"torch.dtype": str(x).removeprefix("torch.")}
    if isinstance(x, tuple):
        return {"tuple": [encode(v) for v in x]}
    if isinstance(x, list):
        return [encode(v) for v in x]
    if isinstance(x, dict):
        return {"dict": [[k, encode(v)] for k, v in x.items()]}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cannot record a {type(x).__name__} argument: {x!r}")


def decode(x):
    import torch
    if isinstance(x, list):
        return [decode(v) for v in x]
    if isinstance(x, dict):
        if "torch.dtype" in x:
            return getattr(torch, x["torch.dtype"])
        if "tuple" in x:
            return tuple(decode(v) for v in x["tuple"])
        return {k: decode(v) for k, v in x["dict"]}
    return x


def ours_items(configs):
    """Our Hopper kernels: bench_ops.py's head configs ('HV/H', the v-heads first), and 'tests' for
    the set benchmarks/hopper_smoke.py --precompile-only builds for the GPU tests."""
    from qla_megatron.ops.gated_delta_rule.hopper import chunk
    items = []
    for c in configs:
        if c == "tests":
            from benchmarks.hopper_smoke import gpu_test_kernels
            todo = gpu_test_kernels()
        elif c == "bench":
            from benchmarks.bench_ops import CONFIGS
            todo = [it for cc in CONFIGS.split(",") for it in chunk.kernel_set(*_hv_h(cc)[::-1], 128, 128)]
        else:
            HV, H = _hv_h(c)
            todo = chunk.kernel_set(H, HV, 128, 128)
        items += [{"kind": "ours", "factory": n, "args": encode(tuple(a)), "kwargs": encode(kw), "for": c}
                  for n, a, kw in todo]
    return _dedupe(items)


def _hv_h(c):
    HV, H = map(int, c.split("/"))
    return HV, H


def _dedupe(items):
    seen, out = set(), []
    for it in items:
        k = json.dumps([it["kind"], it["factory"], it["args"], it["kwargs"]], sort_keys=True)
        if k not in seen:
            seen.add(k)
            out.append(it)
    return out


def flashqla_site(site=None):
    """A folder holding flash_qla: given, importable already, or unpacked from .gpu/site.tar.xz."""
    if site:
        return site
    with contextlib.suppress(ImportError):
        import importlib.util
        if importlib.util.find_spec("flash_qla") is not None:
            return None
    stamp = os.path.join(FQ_SITE, ".unpacked")
    src = os.path.join(ROOT, ".gpu", "site.tar.xz")
    if not os.path.exists(stamp) or os.path.getmtime(stamp) < os.path.getmtime(src):
        os.makedirs(FQ_SITE, exist_ok=True)
        with tarfile.open(src, "r:xz") as tar:
            want = [m for m in tar.getmembers() if m.name.lstrip("./").startswith(("flash_qla/", "flash_qla-"))]
            tar.extractall(FQ_SITE, members=want, filter="data")
        open(stamp, "w").close()
    return FQ_SITE


def patch_for_flashqla_import(site, sms):
    """What FlashQLA asks of the device at import time, answered for an H200: compute version 9.0
    (when no target says otherwise) and the SM count. Only where torch sees no GPU."""
    import torch
    import tilelang.contrib.nvcc as nvcc
    if site and site not in sys.path:
        sys.path.insert(0, site)
    if torch.cuda.is_available() or getattr(nvcc, "_qla_patched", False):
        return
    orig = nvcc.get_target_compute_version

    def compute_version(target=None):
        try:
            return orig(target)
        except Exception:
            return "9.0"
    nvcc.get_target_compute_version = compute_version
    nvcc._qla_patched = True
    torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(
        multi_processor_count=sms, name="NVIDIA H200 (assumed)", major=9, minor=0)


def _jit_home():
    """JITImpl object id -> (module, attribute) over FlashQLA's modules."""
    jit = sys.modules["tilelang.jit"].JITImpl
    home = {}
    for name, mod in list(sys.modules.items()):
        if name.startswith("flash_qla") and mod is not None:
            for attr, val in vars(mod).items():
                if isinstance(val, jit):
                    home.setdefault(id(val), f"{name}:{attr}")
    return home


@contextlib.contextmanager
def _record_launches(calls):
    """FlashQLA's wrappers on CPU tensors: devices named cuda become cpu, no launch happens (each
    @tilelang.jit call is recorded and returns a no-op kernel), l2norm's torch.compile'd helpers
    return empty tensors of their shapes."""
    import torch
    from torch.overrides import TorchFunctionMode
    import flash_qla.utils.math as fm

    def cpu(d):
        if isinstance(d, str) and d.startswith("cuda"):
            return "cpu"
        if isinstance(d, torch.device) and d.type == "cuda":
            return torch.device("cpu")
        return d

    class CpuMode(TorchFunctionMode):
        def __torch_function__(self, func, types_, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if "device" in kwargs:
                kwargs["device"] = cpu(kwargs["device"])
            name = getattr(func, "__name__", "")
            if name == "cuda":
                return args[0]
            if name == "to":
                args = tuple(cpu(a) for a in args)
            return func(*args, **kwargs)

    def record(self, *args, **kwargs):
        calls.append((self, args, kwargs))
        return lambda *a, **k: None

    patches = [(torch.cuda, "is_available", lambda: True),
               (torch.cuda, "is_current_stream_capturing", lambda: False),
               (torch.cuda, "device", lambda *a, **k: contextlib.nullcontext()),
               (sys.modules["tilelang.jit"].JITImpl, "__call__", record),
               (fm, "l2norm_fwd_compiled", lambda x, eps=1e-6, dim=-1: (
                   x, torch.empty(x.shape[:-1] + (1,), dtype=torch.float32))),
               (fm, "l2norm_bwd_compiled", lambda dy, y, rstd, eps=1e-6, dim=-1: torch.empty(
                   dy.shape, dtype=torch.float32))]
    with contextlib.ExitStack() as st:
        for obj, name, val in patches:
            old = getattr(obj, name)
            setattr(obj, name, val)
            st.callback(setattr, obj, name, old)
        st.enter_context(CpuMode())
        yield


def flashqla_items(configs, lengths, sms=H200_SMS, site=None):
    """The @tilelang.jit calls FlashQLA 0.1.3 makes in bench_ops.py's measure(): for each config
    ('HV/H') and length ('BxT' or 'varlen'), the forward without autograd, then forward + backward
    with the inputs requiring grad (bf16 q, k, v, beta; fp32 g; int64 cu_seqlens for varlen; final
    state out; l2norm in kernel)."""
    import torch
    from benchmarks.bench_ops import K, V, parse_shape
    patch_for_flashqla_import(site, sms)
    from flash_qla.ops import chunk_gated_delta_rule as fq
    calls, items = [], []
    for c in configs:
        HV, H = _hv_h(c)
        for shape in lengths:
            B, T, cu = parse_shape(shape, "cpu")
            N = B if cu is None else cu.numel() - 1
            n0 = len(calls)
            with _record_launches(calls):
                q = torch.empty(B, T, H, K, dtype=torch.bfloat16)
                k = torch.empty_like(q)
                v = torch.empty(B, T, HV, V, dtype=torch.bfloat16)
                g = torch.empty(B, T, HV)
                b = torch.empty(B, T, HV, dtype=torch.bfloat16)
                with torch.no_grad():
                    fq(q, k, v, g, b, output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
                leaves = [t.detach().requires_grad_(True) for t in (q, k, v, g, b)]
                o, s = fq(*leaves, output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
                torch.autograd.grad((o, s), leaves, (torch.empty_like(v), torch.empty(N, HV, K, V)))
                del q, k, v, g, b, leaves, o, s
            home = _jit_home()
            for impl, a, kw in calls[n0:]:
                items.append({"kind": "flashqla", "factory": home[id(impl)], "args": encode(tuple(a)),
                              "kwargs": encode(kw), "for": f"{c} {shape}"})
    return _dedupe(items)


# ---------------------------------------------------------------------------------------------------
# compiling (worker processes) and loading without compiling (check)

def _factory(item):
    if item["kind"] == "ours":
        from qla_megatron.ops.gated_delta_rule.hopper import chunk
        return chunk._FACTORIES[item["factory"]]
    import importlib
    mod, attr = item["factory"].split(":")
    return getattr(importlib.import_module(mod), attr)


def _worker_init(site, sms):
    import tilelang  # noqa: F401
    patch_for_flashqla_import(site, sms)


def compile_item(item):
    """Compile one kernel through its @tilelang.jit factory (TileLang's cache on); returns
    (cache key, seconds)."""
    t = time.time()
    kern = _factory(item)(*decode(item["args"]), **decode(item["kwargs"]))
    return kern._tilelang_cache_key, time.time() - t


class CacheMiss(Exception):
    pass


@contextlib.contextmanager
def no_compile():
    """TileLang loads kernels from its disk cache but raises CacheMiss where it would compile."""
    import tilelang.cache.kernel_cache as kc
    real = kc.JITKernel

    class Guard:
        from_database = staticmethod(real.from_database)

        def __new__(cls, *a, **k):
            raise CacheMiss()
    kc.JITKernel = Guard
    try:
        yield
    finally:
        kc.JITKernel = real


# ---------------------------------------------------------------------------------------------------
# commands

def enumerate_items(ours, flashqla, flashqla_lengths, sms, site):
    """Every kernel a build with these arguments holds (and check looks for)."""
    items = ours_items(ours.split(",")) if ours else []
    if flashqla:
        from benchmarks.bench_ops import LENGTHS
        t0 = time.time()
        fq = flashqla_items(flashqla.split(","), (flashqla_lengths or LENGTHS).split(","), sms, site)
        print(f"FlashQLA: {len(fq)} distinct kernels recorded in {time.time() - t0:.0f} s", flush=True)
        items += fq
    return items


def cmd_build(args):
    import concurrent.futures as cf
    import multiprocessing as mp
    stub_libcuda()
    os.environ["TILELANG_CACHE_DIR"] = args.cache
    os.environ["TILELANG_DEFAULT_TARGET"] = json.dumps(TARGET)
    site = flashqla_site(args.site) if args.flashqla else None
    items = enumerate_items(args.ours, args.flashqla, args.flashqla_lengths, args.sms, site)
    if args.list:
        for it in items:
            print(it["kind"], it["factory"], it["for"], json.dumps(it["args"]), json.dumps(it["kwargs"]))
        return
    print(f"{len(items)} kernels to compile into {args.cache} ({args.workers} workers)", flush=True)
    t0 = time.time()
    with cf.ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                initargs=(site, args.sms)) as ex:
        res = list(ex.map(compile_item, items))
    for it, (key, dt) in zip(items, res):
        it["key"] = key
    slow = sorted(zip((r[1] for r in res), (f"{i['kind']} {i['factory']}" for i in items)), reverse=True)[:3]
    print(f"compiled in {time.time() - t0:.0f} s (slowest, cached ones ~0: {[(n, round(s)) for s, n in slow]})")
    import tilelang
    ns = tilelang_namespace()
    manifest = {"tilelang": tilelang.__version__, "target": TARGET, "sms": args.sms, "kernels": items,
                "built": time.strftime("%Y-%m-%d %H:%M"),
                "build": {"ours": args.ours, "flashqla": args.flashqla, "flashqla_lengths": args.flashqla_lengths}}
    size = pack_tilelang(args.cache, ns, [it["key"] for it in items], args.out, manifest)
    raw = sum(os.path.getsize(os.path.join(dp, f)) for k in {it["key"] for it in items}
              for dp, _, fs in os.walk(os.path.join(args.cache, ns, k)) for f in fs)
    print(f"{args.out}: {len({it['key'] for it in items})} entries, {raw / 1e6:.1f} MB raw, {size / 1e6:.2f} MB xz")
    budget()


def cmd_unpack(args):
    tl_dir = os.environ.get("TILELANG_CACHE_DIR") or os.path.expanduser("~/.tilelang/cache")
    archives = sorted(glob.glob(os.path.join(GPU_CACHE, "tilelang*.tar.xz")))
    t = time.time()
    n = unpack_tilelang(archives, tl_dir)
    print(f"unpack: {n} TileLang kernels from {len(archives)} archive(s) into {tl_dir}", end="")
    tr_dir = os.environ.get("TRITON_CACHE_DIR")
    if tr_dir:
        a = install_autotune(AUTOTUNE_DIR, tr_dir)
        b = sum(unpack_triton_binaries(p, tr_dir) for p in sorted(glob.glob(os.path.join(GPU_CACHE, "triton*.tar.xz"))))
        print(f"; {a} autotune choices and {b} compiled Triton kernels into {tr_dir}", end="")
    else:
        print("; TRITON_CACHE_DIR unset: Triton's caches not installed", end="")
    print(f" ({time.time() - t:.1f} s)", flush=True)


def cmd_check(args):
    """Would every kernel the carried archives were built for load from the cache? The kernel lists
    are enumerated again from the manifests' build arguments (with this tree's kernel code and, on a
    GPU host, the real SM count) and each kernel is loaded with compiling off. On the host, after
    unpack: TILELANG_CACHE_DIR. With --here (CPU or host): the archives in .gpu_cache unpacked into a
    temporary folder, so a stale archive shows before a device call is spent on it."""
    import torch
    gpu = torch.cuda.is_available()
    tmp = None
    if args.here:
        tmp = tempfile.mkdtemp(prefix="qla-check-")
        os.environ["TILELANG_CACHE_DIR"] = tmp
        unpack_tilelang(sorted(glob.glob(os.path.join(GPU_CACHE, "tilelang*.tar.xz"))), tmp)
    tl_dir = os.environ.get("TILELANG_CACHE_DIR") or os.path.expanduser("~/.tilelang/cache")
    if not gpu:
        os.environ.setdefault("TILELANG_DEFAULT_TARGET", json.dumps(TARGET))
    try:
        manifests = [m for m in carried_manifests(tl_dir) if m.get("build")]
        if not manifests:
            print(f"check: no build manifests under {tl_dir}/{MANIFEST_DIR} (run unpack first, or use --here)")
            return 1
        if gpu:
            p = torch.cuda.get_device_properties(0)
            print(f"device {p.name}, {p.multi_processor_count} SMs, sm_{p.major}{p.minor}; "
                  f"archives built for {sorted({m['sms'] for m in manifests})} SMs")
        hit, miss = 0, []
        for m in manifests:
            b = m["build"]
            site = flashqla_site(args.site) if b["flashqla"] else None
            items = enumerate_items(b["ours"], b["flashqla"], b["flashqla_lengths"], m["sms"], site)
            built = {json.dumps([i["kind"], i["factory"], i["args"], i["kwargs"]], sort_keys=True) for i in m["kernels"]}
            t = time.time()
            with no_compile():
                for it in items:
                    try:
                        compile_item(it)
                        hit += 1
                    except CacheMiss:
                        new = json.dumps([it["kind"], it["factory"], it["args"], it["kwargs"]], sort_keys=True) not in built
                        miss.append(it)
                        print(f"  MISS{' (not in the build: a new kernel)' if new else ' (code changed since the build)'}: "
                              f"{it['kind']} {it['factory']} [{it['for']}] {json.dumps(it['kwargs'])[:160]}")
            print(f"check {os.path.basename(str(m.get('archive', '')))}: {len(items)} kernels in "
                  f"{time.time() - t:.0f} s", flush=True)
        print(f"check: {hit} load from the carried cache, {len(miss)} would compile"
              + (": rebuild with warm_cache.py build" if miss else ""))
        return 1 if miss else 0
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def cmd_harvest(args):
    """On the host, after the benchmark: pack into OUT what this host made that the next one can use."""
    os.makedirs(args.out, exist_ok=True)
    tl_dir = os.environ.get("TILELANG_CACHE_DIR") or os.path.expanduser("~/.tilelang/cache")
    import tilelang
    ns = tilelang_namespace()
    keys = new_tilelang_keys(tl_dir, ns)
    if keys:
        name = "tilelang-host-" + hashlib.sha256("".join(keys).encode()).hexdigest()[:8] + ".tar.xz"
        size = pack_tilelang(tl_dir, ns, keys, os.path.join(args.out, name),
                             {"tilelang": tilelang.__version__, "from": "host", "kernels": []})
        print(f"harvest: {len(keys)} TileLang kernels compiled on this host -> {name} ({size / 1e6:.2f} MB)")
    else:
        print("harvest: no TileLang kernel was compiled on this host")
    tr_dir = os.environ.get("TRITON_CACHE_DIR")
    if not tr_dir or not os.path.isdir(tr_dir):
        print("harvest: TRITON_CACHE_DIR unset or missing, nothing of Triton's")
        return
    tuned = triton_autotune_files(tr_dir)
    if tuned:
        size = _tar_xz(os.path.join(args.out, "triton-autotune.tar.xz"), tuned)
        print(f"harvest: {len(tuned)} Triton autotune choices -> triton-autotune.tar.xz ({size / 1e3:.0f} kB)")
    if not args.no_binaries:
        with tempfile.TemporaryDirectory() as scratch:
            members = triton_binary_members(tr_dir, scratch)
            if members:
                size = _tar_xz(os.path.join(args.out, "triton-bin.tar.xz"), members)
                n = sum(os.path.basename(a).startswith("__grp__") for a, _ in members)
                print(f"harvest: {n} compiled Triton kernels -> triton-bin.tar.xz ({size / 1e6:.2f} MB)")
                if size > RETURN_LIMIT:
                    print("harvest: triton-bin.tar.xz is over 16 MiB and will not come back; use --no-binaries")


def cmd_keep(args):
    """Here, with the folder a call's files came back to."""
    src = args.files_at
    n = 0
    p = os.path.join(src, "triton-autotune.tar.xz")
    if os.path.exists(p):
        with tempfile.TemporaryDirectory() as d:
            _extract(p, d)
            new = [rel for rel, _ in triton_autotune_files(d) if not os.path.exists(os.path.join(AUTOTUNE_DIR, rel))]
            install_autotune(d, AUTOTUNE_DIR)
        print(f"keep: {len(new)} new autotune choices under {os.path.relpath(AUTOTUNE_DIR, ROOT)}/ (commit them)")
        n += 1
    os.makedirs(GPU_CACHE, exist_ok=True)
    for p in sorted(glob.glob(os.path.join(src, "tilelang-host-*.tar.xz")) + glob.glob(os.path.join(src, "triton-bin.tar.xz"))):
        shutil.copyfile(p, os.path.join(GPU_CACHE, os.path.basename(p)))
        print(f"keep: {os.path.basename(p)} -> .gpu_cache/")
        n += 1
    if not n:
        print(f"keep: nothing of ours in {src}")
    budget()


def budget():
    """What a device call would carry: tracked and untracked files, .gpu, .gpu_cache."""
    def size(paths):
        return sum(os.path.getsize(os.path.join(ROOT, p)) for p in paths if os.path.isfile(os.path.join(ROOT, p)))
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        return
    tree = size([p for p in listed if p])
    extra = {d: sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.join(ROOT, d)) for f in fs)
             for d in (".gpu", ".gpu_cache")}
    total = tree + sum(extra.values())
    print(f"a call carrying .gpu and .gpu_cache: tree {tree / 1e6:.1f} MB + .gpu {extra['.gpu'] / 1e6:.1f} MB + "
          f".gpu_cache {extra['.gpu_cache'] / 1e6:.1f} MB = {total / 2 ** 20:.1f} of 64 MiB"
          + ("  OVER THE LIMIT" if total > DEVICE_LIMIT else ""))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="(CPU) compile TileLang kernels for sm_90a and pack them")
    b.add_argument("--ours", default="bench", help="'bench' (bench_ops.py's configs), 'tests' (the GPU tests' "
                   "set), HV/H pairs, comma-separated; '' for none")
    b.add_argument("--flashqla", default="32/16,8/2", help="HV/H pairs for FlashQLA ('' for none)")
    b.add_argument("--flashqla-lengths", default=None, help="bench_ops.py lengths (default: all of bench_ops.LENGTHS)")
    b.add_argument("--sms", type=int, default=H200_SMS, help="SM count FlashQLA's wrappers see (H200: 132)")
    b.add_argument("--site", default=None, help="folder holding flash_qla (default: unpacked from .gpu/site.tar.xz)")
    b.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1))
    b.add_argument("--cache", default=BUILD_CACHE, help="TileLang cache to compile into (kept between builds)")
    b.add_argument("--out", default=os.path.join(GPU_CACHE, "tilelang.tar.xz"))
    b.add_argument("--list", action="store_true", help="print what would be compiled, compile nothing")
    sub.add_parser("unpack", help="(host) carried caches into TILELANG_CACHE_DIR / TRITON_CACHE_DIR")
    c = sub.add_parser("check", help="load the kernels the archives were built for, compiling off; report misses")
    c.add_argument("--here", action="store_true", help="check .gpu_cache's archives in a temporary cache folder")
    c.add_argument("--site", default=None, help="folder holding flash_qla (default: as build)")
    h = sub.add_parser("harvest", help="(host) pack what this host compiled and tuned into OUT")
    h.add_argument("out")
    h.add_argument("--no-binaries", action="store_true", help="only the autotune JSONs of Triton's cache")
    k = sub.add_parser("keep", help="(CPU) file a call's harvested files: autotune JSONs, host kernels")
    k.add_argument("files_at")
    args = ap.parse_args(argv)
    return {"build": cmd_build, "unpack": cmd_unpack, "check": cmd_check, "harvest": cmd_harvest,
            "keep": cmd_keep}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
