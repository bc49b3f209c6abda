"""benchmarks/warm_cache.py: the caches that travel to a fresh GPU host. CPU only: the archives'
round trips (TileLang entries, Triton autotune choices, Triton kernels pruned to what loads), the
argument encoding of recorded kernel calls, and the compile guard of `check`."""

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from benchmarks import warm_cache as w

NS = os.path.join("0.1.15", "linux-x86_64", "kernels")


def _entry(root, key, payload):
    d = os.path.join(root, NS, key)
    os.makedirs(d)
    for name, data in (("executable.so", payload), ("params.json", b"{}"), ("manifest.json", b"{}"),
                       ("device_kernel.cu", b"// d"), ("host_kernel.cu", b"// h")):
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


def _tree(root):
    out = {}
    for dp, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(dp, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def test_tilelang_archive_round_trip_and_host_new_keys(tmp_path):
    src, host = tmp_path / "src", tmp_path / "host"
    _entry(str(src), "a" * 64, os.urandom(5000))
    _entry(str(src), "b" * 64, os.urandom(7000))
    _entry(str(src), "c" * 64, b"not asked for")
    out = str(tmp_path / "gpu_cache" / "tilelang.tar.xz")
    w.pack_tilelang(str(src), NS, ["a" * 64, "b" * 64, "a" * 64], out, {"kernels": [{"key": "a" * 64}]})
    assert w.unpack_tilelang([out], str(host)) == 2
    got, want = _tree(str(host)), _tree(str(src))
    for key in ("a" * 64, "b" * 64):
        for name in ("executable.so", "params.json", "manifest.json", "device_kernel.cu", "host_kernel.cu"):
            rel = os.path.join(NS, key, name)
            assert got[rel] == want[rel]
    assert not any(("c" * 64) in k for k in got)
    (m,) = w.carried_manifests(str(host))
    assert m["keys"] == ["a" * 64, "b" * 64] and m["namespace"] == NS
    assert w.new_tilelang_keys(str(host), NS) == []
    _entry(str(host), "d" * 64, b"compiled on the host")
    os.makedirs(os.path.join(host, NS, "e" * 64))            # incomplete: no manifest.json
    assert w.new_tilelang_keys(str(host), NS) == ["d" * 64]


def test_pack_refuses_an_incomplete_entry(tmp_path):
    os.makedirs(tmp_path / NS / ("f" * 64))
    with pytest.raises(FileNotFoundError):
        w.pack_tilelang(str(tmp_path), NS, ["f" * 64], str(tmp_path / "x.tar.xz"), {})


def test_recorded_arguments_round_trip():
    args = (32, 16, 128, 128, 64, 128 ** -0.5, "float32", None, True)
    kwargs = {"qkva_dtype": torch.bfloat16, "seqlen_dtype": torch.int64, "mask": torch.bool, "shape": (1, 2)}
    enc = json.loads(json.dumps([w.encode(args), w.encode(kwargs)]))
    a, k = w.decode(enc[0]), w.decode(enc[1])
    assert a == args and type(a) is tuple and a[5] == 128 ** -0.5
    assert k == kwargs and type(k["shape"]) is tuple
    with pytest.raises(TypeError):
        w.encode(torch.zeros(1))


def test_harvest_keep_unpack_of_autotune_choices(tmp_path, monkeypatch):
    """Host: harvest packs <hash>/<fn>.autotune.json; here: keep files them under the autotune dir;
    next host: unpack puts them back at the same relative paths."""
    tr1, tr2, out = tmp_path / "triton1", tmp_path / "triton2", tmp_path / "out"
    for h, fn in (("H1", "chunk_fwd_kernel_o"), ("H2", "recompute_w_u_fwd_kernel")):
        os.makedirs(tr1 / h)
        (tr1 / h / f"{fn}.autotune.json").write_text(json.dumps({"key": [h], "configs_timings": [[{}, [1.0]]]}))
        (tr1 / h / f"{fn}.ptx").write_text("not an autotune file")
    monkeypatch.setattr(w, "GPU_CACHE", str(tmp_path / "gpu_cache"))
    monkeypatch.setattr(w, "AUTOTUNE_DIR", str(tmp_path / "autotune"))
    monkeypatch.setenv("TILELANG_CACHE_DIR", str(tmp_path / "tl"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tr1))
    w.cmd_harvest(argparse.Namespace(out=str(out), no_binaries=True))
    assert os.listdir(out) == ["triton-autotune.tar.xz"]
    w.cmd_keep(argparse.Namespace(files_at=str(out)))
    assert sorted(os.listdir(tmp_path / "autotune")) == ["H1", "H2"]
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tr2))
    w.cmd_unpack(argparse.Namespace())
    want = {k: v for k, v in _tree(str(tr1)).items() if k.endswith(".autotune.json")}
    assert _tree(str(tr2)) == want


def _triton_ok():
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception:
        return False
    return True


COMPILE = textwrap.dedent("""
    import json, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def copy(x, y, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y + i, tl.load(x + i, mask=i < n), mask=i < n)

    src = ASTSource(fn=copy, signature={"x": "*fp32", "y": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                    constexprs={"BLOCK": 128})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    print(json.dumps({"asm": sorted(k.asm), "hash": k.hash, "cubin": len(k.asm["cubin"])}))
""")


@pytest.mark.skipif(not _triton_ok(), reason="needs triton")
def test_triton_kernels_pruned_to_json_and_cubin_load_from_another_cache_dir(tmp_path):
    """Triton compiles for sm_90 without a GPU; the pruned entry, unpacked into a different cache dir,
    is what the second compile finds (it would carry every IR if it had compiled again)."""
    script = tmp_path / "compile_copy.py"
    script.write_text(COMPILE)

    def run(cache):
        env = dict(os.environ, TRITON_CACHE_DIR=str(cache))
        r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])
    first = run(tmp_path / "a")
    assert "ptx" in first["asm"]
    members = w.triton_binary_members(str(tmp_path / "a"), str(tmp_path / "scratch"))
    assert all(a.endswith(w.TRITON_KEEP) for a, _ in members)
    arch = str(tmp_path / "triton-bin.tar.xz")
    w._tar_xz(arch, members)
    shutil.rmtree(tmp_path / "a")
    assert w.unpack_triton_binaries(arch, str(tmp_path / "b")) == 1
    second = run(tmp_path / "b")
    assert second["hash"] == first["hash"] and second["cubin"] == first["cubin"]
    assert second["asm"] == ["cubin"]


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("gcc") is None, reason="needs nvcc and gcc")
def test_check_guard_loads_a_cached_kernel_and_reports_a_miss_without_compiling(tmp_path):
    """A tiny TileLang kernel compiled for sm_90a on the CPU into a cache; a second process, under
    no_compile(), loads it from that cache, and a variant raises CacheMiss at once."""
    code = textwrap.dedent(f"""
        import json, sys, time
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
        from benchmarks import warm_cache as w
        w.stub_libcuda()
        import tilelang, tilelang.language as T

        @tilelang.jit
        def scale(N, f):
            @T.prim_func
            def k(x: T.Tensor((N,), "float32"), y: T.Tensor((N,), "float32")):
                with T.Kernel(N // 128, threads=128) as bx:
                    for i in T.Parallel(128):
                        y[bx * 128 + i] = x[bx * 128 + i] * f
            return k

        res = {{}}
        if sys.argv[1] == "compile":
            res["key"] = scale(1024, 2.0)._tilelang_cache_key
        else:
            with w.no_compile():
                res["key"] = scale(1024, 2.0)._tilelang_cache_key
                t = time.time()
                try:
                    scale(2048, 2.0)
                    res["variant"] = "compiled"
                except w.CacheMiss:
                    res["variant"] = "miss"
                res["miss_s"] = time.time() - t
        print(json.dumps(res))
    """)
    env = dict(os.environ, TILELANG_CACHE_DIR=str(tmp_path / "tl"),
               TILELANG_DEFAULT_TARGET=json.dumps(w.TARGET))

    script = tmp_path / "scale_kernel.py"
    script.write_text(code)

    def run(mode):
        r = subprocess.run([sys.executable, str(script), mode], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])
    compiled = run("compile")
    checked = run("check")
    assert checked["key"] == compiled["key"]
    assert checked["variant"] == "miss" and checked["miss_s"] < 5
