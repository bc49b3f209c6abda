"""Compile Hopper kernels for sm_90a on a machine without a GPU and report what ptxas says.

TileLang generates and nvcc compiles sm_90a code without a GPU; only libcuda is needed at link time,
and an empty stub serves (stub_libcuda; benchmarks/warm_cache.py uses it too). For every kernel this
prints the TileLang compile time, then registers per thread, spills, named barriers and shared memory
from `nvcc -Xptxas -v` on the generated source:

    python benchmarks/hopper_compile_cpu.py                       # chunk.kernel_set, H/HV 2/8 and 16/32
    python benchmarks/hopper_compile_cpu.py --kernel forward --heads 2/8
    python benchmarks/hopper_compile_cpu.py --kernel backward_dh,backward_grads --keep /tmp/bw   # keep the .cu

Compile times are cold (TileLang's cache off) unless --warm; the nvcc run for the report is extra.

Development only; warm_cache.py (and with it tests/test_warm_cache.py) imports its stub_libcuda.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGET = {"kind": "cuda", "arch": "sm_90a"}


def stub_libcuda():
    """An empty libcuda.so on LIBRARY_PATH: all that linking TileLang's host code needs without a GPU."""
    d = os.path.join(tempfile.gettempdir(), "cudastub")
    so = os.path.join(d, "libcuda.so")
    if not os.path.exists(so):
        os.makedirs(d, exist_ok=True)
        subprocess.run(["gcc", "-shared", "-x", "c", "-", "-o", so], input=b"", check=True)
    os.environ["LIBRARY_PATH"] = d + (":" + os.environ["LIBRARY_PATH"] if os.environ.get("LIBRARY_PATH") else "")


def ptxas_report(src: str, keep_as: str = None):
    """(registers, spill store bytes, spill load bytes, named barriers, ptxas warned about setmaxnreg)."""
    import tilelang.env as env
    with tempfile.TemporaryDirectory() as d:
        cu = os.path.join(d, "k.cu")
        open(cu, "w").write(src)
        if keep_as:
            open(keep_as, "w").write(src)
        cmd = ["nvcc", "-std=c++20", "-w", "-Xcudafe", "--diag_suppress=177", "-cubin",
               "-gencode", "arch=compute_90a,code=sm_90a", "--use_fast_math", "-Xptxas", "-v",
               "-I" + env.TILELANG_TEMPLATE_PATH, "-I" + env.CUTLASS_INCLUDE_DIR, cu, "-o",
               os.path.join(d, "k.cubin")]
        out = subprocess.run(cmd, capture_output=True, text=True)
        roles = role_registers(os.path.join(d, "k.cubin")) if out.returncode == 0 else {}
    log = out.stdout + out.stderr
    if out.returncode:
        raise RuntimeError(log[-3000:])
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    st, ld = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    bars = re.search(r"used (\d+) barriers", log)
    warn = "C7508" in log or "setmaxnreg" in log and "ignored" in log
    return regs, st, ld, int(bars.group(1)) if bars else 0, warn, roles


def role_registers(cubin: str):
    """Highest register index + 1 in the SASS after each setmaxnreg (USETMAXREG), keyed by its
    operand, e.g. {"entry": 36, "DEALLOC 0x28": 38, "TRY_ALLOC 0xf0": 152}. Approximate: code is
    attributed to the last USETMAXREG above it in the listing. Needs Triton's cuobjdump."""
    import shutil
    try:
        import triton
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    except ImportError:
        tool = None
    tool = tool if tool and os.path.exists(tool) else shutil.which("cuobjdump")
    if not tool:
        return {}
    sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True).stdout
    name, mx = "entry", {}
    for line in sass.splitlines():
        if "USETMAXREG" in line:
            op = line.split("USETMAXREG")[1].split(";")[0].replace(".CTAPOOL", "").replace("UP0,", "")
            name = " ".join(op.replace(".", "").split())
        for r in re.findall(r"\bR(\d+)\b", line):
            mx[name] = max(mx.get(name, 0), int(r) + 1)
    return mx


def dynamic_smem(host_src: str, threads: int):
    """Dynamic shared memory of the launch, read off the host wrapper: the launch arguments are
    grid (3), block (3), then the dynamic shared-memory bytes."""
    vals = [int(v) for v in re.findall(r"\.v_int64\) = \(\(int64_t\)(\d+)\);", host_src)]
    for i in range(len(vals) - 3):
        if vals[i:i + 3] == [threads, 1, 1]:
            return vals[i + 3]
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default="all",
                    help="comma list of kernel families (prepare, forward, compose, backward_dh, backward_grads) or all")
    ap.add_argument("--heads", default="2/8,16/32", help="H/HV pairs")
    ap.add_argument("--keep", default=None, help="folder to keep the generated .cu files in")
    ap.add_argument("--warm", action="store_true", help="use TileLang's cache (default: cold compiles)")
    args = ap.parse_args()
    stub_libcuda()
    import tilelang
    if not args.warm:
        tilelang.disable_cache()
    from qla_megatron.ops.gated_delta_rule.hopper import chunk
    want = None if args.kernel == "all" else set(args.kernel.split(","))
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    rows = []
    for hh in args.heads.split(","):
        H, HV = map(int, hh.split("/"))
        for name, pos, kw in chunk.kernel_set(H, HV, 128, 128):
            if want is not None and name not in want:
                continue
            factory = chunk._FACTORIES[name]
            # The factories' own pass configs (fast math or not), read off their @tilelang.jit.
            cfg = getattr(factory, "pass_configs", None)
            t = time.time()
            kern = tilelang.compile(factory.get_tir(*pos, **kw), target=TARGET, pass_configs=cfg)
            dt = time.time() - t
            tag = f"{name}_H{H}_HV{HV}_" + "_".join(f"{k}{int(v) if isinstance(v, bool) else v}" for k, v in kw.items())
            keep = os.path.join(args.keep, tag + ".cu") if args.keep else None
            regs, st, ld, bars, warn, roles = ptxas_report(kern.get_kernel_source(), keep)
            m = re.search(r"__launch_bounds__\((\d+)", kern.get_kernel_source())
            smem = dynamic_smem(kern.get_host_source(), int(m.group(1))) if m else None
            rows.append((tag, dt, regs, st, ld, bars, smem, warn))
            print(f"{tag}: compile {dt:.1f} s; {regs} regs/thread, spill st/ld {st}/{ld} B, {bars} named "
                  f"barriers, dynamic smem {smem} B{'; setmaxnreg IGNORED' if warn else ''}"
                  + (f"; registers used per role (SASS, after setmaxnreg): {roles}" if len(roles) > 1 else ""),
                  flush=True)
    return rows


if __name__ == "__main__":
    main()
