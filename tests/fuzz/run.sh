#!/bin/sh
# Builds every tests/fuzz/fuzz_*.c target with libFuzzer + ASan + UBSan and
# runs each for FUZZ_SECONDS (default 60) on a scratch copy of its seed
# corpus (tests/fuzz/corpus/<name>/). Ends with "fuzz: N passed, M failed".
set -u
cd "$(dirname "$0")/../.."
scripts/install-deps.sh fuzz || exit 1

SECONDS_EACH=${FUZZ_SECONDS:-60}
OUT=build/fuzz
mkdir -p "$OUT"
CFLAGS="-std=c11 -D_GNU_SOURCE -g -O1 -Iinclude -fsanitize=fuzzer,address,undefined"
LIBS="$(pkg-config --libs fcgi libcurl yaml-0.1 libcjson sqlite3 hiredis) -pthread"
SRCS=$(ls src/*.c | grep -v '/main\.c$')
passed=0
failed=0

for target in tests/fuzz/fuzz_*.c; do
    name=$(basename "$target" .c)
    corpus=tests/fuzz/corpus/${name#fuzz_}
    work=$OUT/corpus-$name
    echo "== $name (${SECONDS_EACH}s)"
    # shellcheck disable=SC2086
    if ! clang $CFLAGS -o "$OUT/$name" "$target" $SRCS $LIBS; then
        echo "fuzz $name: build failed"
        failed=$((failed + 1))
        continue
    fi
    rm -rf "$work"
    mkdir -p "$work"
    [ -d "$corpus" ] && cp -r "$corpus"/. "$work"/
    if "$OUT/$name" -max_total_time="$SECONDS_EACH" -max_len=8192 -timeout=10 \
            -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$OUT/$name-" \
            "$work" >"$OUT/$name.log" 2>&1; then
        grep -E 'stat::number_of_executed_units|cov:' "$OUT/$name.log" | tail -2
        passed=$((passed + 1))
    else
        tail -40 "$OUT/$name.log"
        echo "fuzz $name: crash, artifact in $OUT/"
        failed=$((failed + 1))
    fi
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
