#!/usr/bin/env bash
# The recipe's GPU measurement (issue 13, item 7), on one H200: the ~4B Qwen3.5-like hybrid
# (examples/configs/qwen35_4b.args, TP 1) at 32k and 64k tokens, with our GDN layer and, in the same
# run, with megatron-core's own GatedDeltaNet (FLA's Triton kernels, FLA_FLASH_QLA=0 so that FLA does
# not hand off to FlashQLA). Each run: --mock-data, global batch 1 (one 32k / 64k sequence per
# iteration), ITERS iterations with --time-breakdown; the first 2 are warm-up (compiles) and left out.
#
#   source .gpu/env.sh    # the GPU host's packages (README, "GPU")
#   bash examples/launch/measure_h200.sh [ITERS] [OUT_DIR] [MODEL]   # defaults: 10, build/measure_h200, 4b
#
# Prints (and writes to OUT_DIR/summary.md) one table: tokens/s, ms/iteration, TFLOP/s per GPU and
# MFU against 989 TFLOP/s by Megatron's formula and by our chunk-64 kernel count, peak allocated
# memory, loss, and where an iteration's time goes (GDN op, rest of the GDN layers, attention,
# MLP, optimizer, other). Full logs: OUT_DIR/<run>.log. A run that fails (e.g. out of memory at
# 64k) is reported as failed with its last error line; the others still run.
# MODEL (third argument, default 4b) picks another config of examples/configs/qwen35_*.args, e.g.
# the ~0.8B one where the ~4B does not fit: bash examples/launch/measure_h200.sh 10 build/m08 0p8b
set -uo pipefail
cd "$(dirname "$0")/../.."
iters=${1:-10}
out=${2:-build/measure_h200}
model=${3:-4b}
mkdir -p "$out"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python -c "import torch, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'megatron-core', m.__version__)" | tee "$out/versions.txt"
git rev-parse HEAD 2>/dev/null | tee "$out/commit.txt"

export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
runs=()
for length in 32k 64k; do
  for impl in qla megatron; do
    name="${model}_${length}_${impl}"
    echo "=== $name ($(date -u +%H:%M:%S)) ==="
    extra=()
    [ "$impl" = megatron ] && extra=(--gdn-impl megatron)
    FLA_FLASH_QLA=0 bash examples/launch/pretrain.sh "$model" 1 "$length" --mock-data \
        --global-batch-size 1 --train-iters "$iters" --lr-warmup-iters 1 --time-breakdown \
        "${extra[@]}" > "$out/$name.log" 2>&1
    echo "exit code $?; $(grep -c '^iter ' "$out/$name.log") iterations logged"
    runs+=("$name=$out/$name.log")
  done
done
python examples/launch/summarize_logs.py --skip 2 "${runs[@]}" | tee "$out/summary.md"
echo "command: bash examples/launch/measure_h200.sh $iters $out $model" >> "$out/summary.md"
