#!/usr/bin/env bash
# The layer's Triton kernels on a GPU host in one device call (about 4 minutes at most):
#
#     source .gpu/env.sh && bash benchmarks/layer_kernels_verify.sh LOG_DIR
#
# 1. the kernels' GPU tests (real sizes vs float64, the layer with the kernels vs its torch path) and
#    the layer's CUDA-graph test (which now captures the kernels too);
# 2. each kernel against the torch path it replaces and FLA's conv / gated norm (bench_layer_kernels.py);
# 3. one layer, ours vs Megatron's, at 1 x 32768 with the op breakdown (bench_layer.py).
# Exit status: that of the first step that failed (124 = it timed out). Logs go to LOG_DIR.
set -u
log=${1:?usage: layer_kernels_verify.sh LOG_DIR}
mkdir -p "$log"
status=0
source "$(dirname "$0")/verify_steps.sh"   # step SECONDS NAME command...
step 130 gpu_tests python -m pytest -m gpu tests/layers/test_kernels.py tests/layers/test_options.py -q -p no:cacheprovider
step 70 kernel_bench python benchmarks/bench_layer_kernels.py --tokens 8192 32768
step 90 layer_bench python benchmarks/bench_layer.py --tokens 32768 --op-backends auto --op-breakdown --iters 5
exit $status
