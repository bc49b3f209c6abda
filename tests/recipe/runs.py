"""Launching the recipe from tests: the small config, torchrun, and the losses a run logs."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from .conftest import ROOT, TINY

# Smaller than the make-run model: 6 iterations of 4 x 128 tokens.
SMALL = ["--config", TINY, "--hidden-size", "64", "--ffn-hidden-size", "192", "--seq-length", "128",
         "--max-position-embeddings", "128", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--train-iters", "6", "--lr-warmup-iters", "1"]
LOSS = re.compile(r"^iter (\d+)/\d+ \| loss (\S+) \|", re.M)


def launch(script, *flags, nproc=1, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script, *flags]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_recipe(*flags, nproc=1):
    proc = launch(os.path.join(ROOT, "examples", "pretrain_gdn.py"), *SMALL, *flags, nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def losses(out: str) -> dict[int, str]:
    """iteration -> loss as printed (6 decimals: equal strings mean equal to float32 print)."""
    return {int(i): v for i, v in LOSS.findall(out)}
