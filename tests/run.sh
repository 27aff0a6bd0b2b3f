#!/bin/sh
# Runs the unit suites and/or the integration suites and ends with one line
# "N passed, M failed" summing every suite. Usage: tests/run.sh [unit|integration]
set -u
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
what=${1:-all}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0

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
    BUILD="$BUILD" python3 tests/integration/run.py 2>&1 | tee -a "$log"
fi

passed=$(sed -nE 's/^(unit|integration)[^:]*: ([0-9]+) passed, ([0-9]+) failed.*/\2/p' "$log" | awk '{s+=$1} END {print s+0}')
failed=$(sed -nE 's/^(unit|integration)[^:]*: ([0-9]+) passed, ([0-9]+) failed.*/\3/p' "$log" | awk '{s+=$1} END {print s+0}')
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ] || status=1
echo "$passed passed, $failed failed"
exit $status
