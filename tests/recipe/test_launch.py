"""The launch scripts' commands pass the recipe's own checks for every config, TP size and length,
and the configs that cannot fit one H200 are the ones refused."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from .conftest import ROOT, recipe_args

H200_GIB = 139
MODELS, TPS = ("0p8b", "4b", "9b", "27b"), (1, 2, 4, 8)


def launch_flags(model, tp, length, *extra):
    out = subprocess.run(["bash", os.path.join(ROOT, "examples", "launch", "pretrain.sh"), "--dry-run",
                          model, str(tp), length, "--mock-data", *extra],
                         capture_output=True, text=True, check=True).stdout
    cmd = shlex.split(out.strip().splitlines()[-1])
    return cmd, cmd[cmd.index("examples/pretrain_gdn.py") + 1:]


def _parse(flags, gpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(gpus))
    config = flags[flags.index("--config") + 1]
    rest = flags[:flags.index("--config")] + flags[flags.index("--config") + 2:]
    return recipe_args(*rest, config=os.path.join(ROOT, config), gpu_memory_gib=H200_GIB)


@pytest.mark.parametrize("length", ["32k", "64k"])
def test_launch_matrix_fits_or_is_refused(length, monkeypatch):
    refused = set()
    for model in MODELS:
        for tp in TPS:
            cmd, flags = launch_flags(model, tp, length)
            assert cmd[:3] == ["torchrun", "--nproc-per-node", str(tp)]
            try:
                args = _parse(flags, tp, monkeypatch)
            except ValueError as e:
                assert "more than --gpu-memory-gib" in str(e), (model, tp, str(e))
                refused.add((model, tp))
                continue
            assert args.tensor_model_parallel_size == tp and args.seq_length == {"32k": 32768, "64k": 65536}[length]
            assert args.sequence_parallel == (tp > 1)
    # Weights + gradients + Adam state alone: ~9B needs TP >= 2, ~27B TP >= 4 on 139 GiB.
    assert refused == {("9b", 1), ("27b", 1), ("27b", 2)}


def test_long_context_uses_context_parallelism(monkeypatch):
    cmd, flags = launch_flags("4b", 2, "256k")
    assert "--nnodes" not in cmd and cmd[2] == "8"  # TP 2 x CP 4 = 8 GPUs: one node
    args = _parse(flags, 8, monkeypatch)
    assert args.context_parallel_size == 4 and args.seq_length == 262144
    cmd, _ = launch_flags("9b", 8, "128k")
    assert cmd[cmd.index("--nnodes") + 1] == "2"
