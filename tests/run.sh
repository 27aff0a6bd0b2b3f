#!/bin/sh
# Runs the unit suites and/or the integration suites and ends with one line
# "N passed, M failed" summing every suite.
# Usage: tests/run.sh [unit | integration [FILTER...]]  (FILTER: see run.py)
# PIAPI_SANITIZER_LOGS=DIR (set by `make asan` and `make tsan`, which point
# the sanitizers' log_path there): every report a sanitizer wrote in DIR,
# at any process's exit too, where no test would see it, counts as a failure.
set -u
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
what=${1:-all}
[ $# -gt 0 ] && shift
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
san_dir=${PIAPI_SANITIZER_LOGS:-}
if [ -n "$san_dir" ]; then
    mkdir -p "$san_dir" && rm -f "$san_dir"/report.*
fi

if [ "$what" = all ] || [ "$what" = unit ]; then
    for t in "$BUILD"/tests/test_*; do
        [ -x "$t" ] || continue
        "$t" 2>&1 | tee -a "$log" | grep -E '^(unit |  Test: .*FAILED|.*CU_ASSERT)' || true
        # a crashed binary prints no summary line: count it as a failure
        grep -q "^unit $(basename "$t" | sed 's/^test_//'): " "$log" \
            || echo "unit $(basename "$t"): 0 passed, 1 failed" | tee -a "$log"
    done
fi
if [ "$what" = all ] || [ "$what" = integration ]; then
    BUILD="$BUILD" python3 tests/integration/run.py "$@" 2>&1 | tee -a "$log"
fi

if [ -n "$san_dir" ]; then
    found=$(find "$san_dir" -name 'report.*' -size +0 | sort)
    n=$(printf '%s' "$found" | grep -c . || true)
    for r in $(printf '%s\n' "$found" | head -5); do
        echo "--- $r"; head -40 "$r"
    done
    if [ "$n" -eq 0 ]; then
        echo "sanitizer: no reports in $san_dir"
    else
        echo "sanitizer: 0 passed, $n failed (reports in $san_dir)" | tee -a "$log"
    fi
fi

passed=$(sed -nE 's/^(unit|integration|sanitizer)[^:]*: ([0-9]+) passed, ([0-9]+) failed.*/\2/p' "$log" | awk '{s+=$1} END {print s+0}')
failed=$(sed -nE 's/^(unit|integration|sanitizer)[^:]*: ([0-9]+) passed, ([0-9]+) failed.*/\3/p' "$log" | awk '{s+=$1} END {print s+0}')
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ] || status=1
echo "$passed passed, $failed failed"
exit $status
