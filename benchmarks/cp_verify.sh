#!/usr/bin/env bash
# Cross-GPU CP on the Hopper kernels, on one GPU, in one device call:
#
#     source .gpu/env.sh && bash benchmarks/cp_verify.sh LOG_DIR
#
# 1. the emulated-ranks GPU tests (tests/parallel/test_cp_emulation.py: the piece summaries, the
#    backward summaries and the compose kernel against the float64 recurrence, two layouts and packed);
# 2. what CP adds on one card: bench_cp_emulated.py at 8/2 and 32/16, cp 2 and 4, 32k tokens a rank;
# 3. the CP model's phase times and predictions (cp_model.py; the all-gather rate is an assumption).
# Exit status: that of the first step that failed (124 = it timed out). Logs go to LOG_DIR.
set -u
log=${1:?usage: cp_verify.sh LOG_DIR}
mkdir -p "$log"
status=0
source "$(dirname "$0")/verify_steps.sh"   # step SECONDS NAME command...
step 240 emulated_tests python -m pytest -m gpu tests/parallel/test_cp_emulation.py -v -s -p no:cacheprovider \
    || exit $status
step 180 emulated_bench python benchmarks/bench_cp_emulated.py --configs 8/2,32/16 --cps 2,4 --out "$log/cp_emulated"
step 150 model python benchmarks/cp_model.py --configs 32/16 --tokens-per-rank 32768 --ag-gbps 300 \
    --ag-latency-us 20 --out "$log/cp_model"
exit $status
