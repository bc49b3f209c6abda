# Sourced by the *_verify.sh scripts: `step SECONDS NAME command...` runs one step under a timeout,
# tees its output to $log/NAME.log and keeps the first failing step's exit status in $status.
# The caller sets `log` (an existing folder) and `status=0` first.
step() {
    local t=$1 name=$2; shift 2
    echo "=== $name: $*" >&2
    timeout "$t" "$@" > >(tee "$log/$name.log") 2>&1
    local rc=$?
    echo "=== rc $rc: $name" >&2
    [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
    return $rc
}
