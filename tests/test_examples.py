"""The README's example commands run as written (at small sizes, so that CI stays quick)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env, check=True).stdout


def test_quickstart_prints_backend_time_and_errors():
    out = run("examples/quickstart.py", "--tokens", "200", "--head-dim", "32")
    assert "backend: torch" in out
    err_line = next(line for line in out.splitlines() if line.startswith("rel. L2 error vs float64"))
    errors = [float(tok.rstrip(",")) for tok in err_line.split() if tok[0].isdigit()]
    assert len(errors) == 2 and max(errors) <= 1e-5, err_line


def test_hybrid_gpt_example_trains():
    out = run("examples/hybrid_gpt.py", "--steps", "3", "--seq", "64", "--hidden", "64", "--head-dim", "16")
    assert "'GatedDeltaNet', 'GatedDeltaNet', 'GatedDeltaNet', 'SelfAttention'" in out
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in out.splitlines() if "loss" in line]
    assert len(losses) == 3 and losses[-1] < losses[0], out


def test_readme_python_blocks_run():
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    assert blocks, "the README has a python example"
    for block in blocks:
        scope = {}
        exec(compile(block, "README.md", "exec"), scope)
        # Whatever the example leaves in o / final must be a usable result (no NaN from, e.g.,
        # unnormalised keys without use_qk_l2norm_in_kernel).
        import torch
        for name in ("o", "final"):
            if isinstance(scope.get(name), torch.Tensor):
                assert torch.isfinite(scope[name]).all(), f"README example: {name} is not finite"
