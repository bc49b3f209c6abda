#!/usr/bin/env bash
# The layer's Triton kernels on a GPU host, in two device calls (a call may run 600 s; on a fresh
# host each part takes 5-9 minutes, most of it compiling):
#
#     source .gpu/env.sh && bash benchmarks/layer_kernels_verify.sh LOG_DIR tests
#     source .gpu/env.sh && bash benchmarks/layer_kernels_verify.sh LOG_DIR bench
#
# tests: the kernels' GPU tests (real sizes vs float64, the layer with the kernels vs its torch path)
#        and the layer's CUDA-graph tests (the tilelang one compiles the Hopper kernels first);
# bench: each kernel against the torch path it replaces and FLA's conv / gated norm, with the GPU
#        kernels of each forward+backward (bench_layer_kernels.py --profile); then one layer, ours vs
#        Megatron's, at 1 x 32768 with the op breakdown (bench_layer.py; FLA autotunes for ~140 s).
# Exit status: that of the first step that failed (124 = it timed out). Logs go to LOG_DIR.
set -u
log=${1:?usage: layer_kernels_verify.sh LOG_DIR tests|bench}
part=${2:?usage: layer_kernels_verify.sh LOG_DIR tests|bench}
mkdir -p "$log"
status=0
source "$(dirname "$0")/verify_steps.sh"   # step SECONDS NAME command...
case $part in
  tests)
    step 500 gpu_tests python -m pytest -m gpu tests/layers/test_kernels.py tests/layers/test_options.py -v \
        --durations=0 -p no:cacheprovider ;;
  bench)
    step 180 kernel_bench python benchmarks/bench_layer_kernels.py --tokens 8192 32768 --profile
    step 380 layer_bench python benchmarks/bench_layer.py --tokens 32768 --op-backends auto --op-breakdown --iters 5 ;;
  *) echo "unknown part '$part' (tests or bench)" >&2; exit 2 ;;
esac
exit $status
