#!/usr/bin/env bash
# Verify the Hopper path on a GPU host in one device call:
#
#     source .gpu/env.sh && bash benchmarks/hopper_verify.sh [LOG_DIR]
#
# 1. precompile every kernel the GPU tests need (parallel, into TileLang's disk cache), after unpacking
#    the carried kernels (.gpu_cache, `python benchmarks/warm_cache.py build --ours tests --flashqla ''`
#    here): a fresh H100 host compiled the 139 kernels in 126 s (2026-12-07), the carried ones load;
# 2. one small forward+backward test under a short timeout: a barrier bug hangs rather than fails,
#    and must not eat the rest of the call;
# 3. the backward GPU tests (-s: each check prints what its gradients reach), then the forward's;
# 4. per-stage times of forward and backward at 1 x 32768 (32/16 and 8/2 heads).
# The timeouts add up to under the 600 s a device command may run. Exit status: that of the first
# step that failed (124 = it timed out). Logs go to LOG_DIR (default: the current folder).
set -u
log=${1:-.}
mkdir -p "$log"
status=0
source "$(dirname "$0")/verify_steps.sh"   # step SECONDS NAME command...
[ -d "$(dirname "$0")/../.gpu_cache" ] && python "$(dirname "$0")/warm_cache.py" unpack
step 150 precompile python benchmarks/hopper_smoke.py --precompile-only || exit $status
step 40 smoke python -m pytest -m gpu tests/ops/test_hopper_backward.py -x -q -s -k "test_heads and H2-HV8 and B2-T200" \
    || exit $status
step 260 backward_tests python -m pytest -m gpu tests/ops/test_hopper_backward.py -q -s --durations=15 -p no:cacheprovider
step 50 forward_tests python -m pytest -m gpu tests/ops/test_hopper_forward.py -q -p no:cacheprovider
step 70 breakdown python benchmarks/hopper_smoke.py --breakdown
exit $status
