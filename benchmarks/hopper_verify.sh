#!/usr/bin/env bash
# Verify and time one Hopper forward variant (hopper/chunk.py: rs) against forward.py's (fused)
# in one device call:
#
#     source .gpu/env.sh && bash benchmarks/hopper_verify.sh rs [peers]
#
# 1. precompile the kernels the tests need, both variants (parallel, into TileLang's disk cache);
# 2. one small test of the variant under a short timeout: a barrier bug hangs rather than fails, and
#    must not eat the rest of the call;
# 3. every GPU test of the variant (-k VARIANT: o and final state vs the float64 recurrence, 1000
#    bit-identical reruns, the variant vs fused on 37 chunks);
# 4. per-stage times of both variants at 1 x 32768 (8/2 and 32/16 heads), same run;
# 5. bench_ops.py: both variants (or $BENCH_VARIANTS, e.g. rs-exact,rs-gate) and the
#    peers (default fla), 8/2 and 32/16 at 1x32768 and 4x8192, table written to
#    benchmarks/results/ops_forward_h100_VARIANT.md.
# The timeouts add up to 580 s, under the 600 s a device command may run. Exit status: that of the
# first step that failed (124 = it timed out).
set -u
variant=${1:?usage: hopper_verify.sh rs [peers]}
peers=${2:-fla}
status=0
step() {   # step SECONDS command...
    local t=$1; shift
    echo "=== $*" >&2
    timeout "$t" "$@"
    local rc=$?
    echo "=== rc $rc: $*" >&2
    [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
    return $rc
}
step 130 python benchmarks/hopper_smoke.py --precompile-only --forward "fused,$variant" || exit $status
step 40 python -m pytest -m gpu tests/ops/test_hopper_forward.py -x -q \
    -k "test_heads and $variant and H2-HV8 and B1-T64" || exit $status
step 100 python -m pytest -m gpu tests/ops/test_hopper_forward.py -q -k "$variant"
step 100 python benchmarks/hopper_smoke.py --breakdown --forward "fused,$variant"
step 210 python benchmarks/bench_ops.py --forward "${BENCH_VARIANTS:-fused,$variant}" --peers "$peers" --configs 8/2,32/16 \
    --lengths 1x32768,4x8192 --out "benchmarks/results/ops_forward_h100_$variant"
exit $status
