#!/bin/sh
# make bench: builds the bench helpers and runs tests/bench/bench.py.
#
#   tests/bench/run.sh            the benchmark; table in $BUILD/bench/results.md
#   tests/bench/run.sh profile    CPU profile + syscall counts of piapi under wrk ($BUILD/bench/profile/)
#   tests/bench/run.sh serve      start the stack and keep it up (BENCH_SERVE_SECONDS, max 3600)
#
# Environment (defaults in brackets):
#   BENCH_ROUNDS [3; 4 in A/B, must be even]  BENCH_DURATION [8] s at -c64  BENCH_LAT_DURATION [DURATION/2] s at -c1
#   BENCH_CONNECTIONS [64]  BENCH_WRK_THREADS [2]  BENCH_STREAMS [200,1000]
#   BENCH_UNLOADED_STREAMS [5]  BENCH_SSE_CHUNKS [50]  BENCH_SSE_INTERVAL_MS [20]
#   BENCH_PIAPI_THREADS [1100]  BENCH_FLOOR_THREADS [8]  BENCH_NGINX_WORKERS [1]
#   BENCH_PORT [18480] (uses PORT..PORT+8 on 127.0.0.1)  BENCH_WARMUP [1]
#   BENCH_PHASES [wrk64,wrk1,sse,unloaded,kcover,tls]  BENCH_SETTLE [0.5] s between phases
#   tls: proxy_pass and piapi to the same mocks behind a TLS nginx (HTTP/1.1 and
#     HTTP/2 ports; throw-away CA made with openssl), wrk -c CONNECTIONS for
#     DURATION and UNLOADED streams per target, new TLS handshakes counted (own table)
#   BENCH_KEEPCONN [1]: also the floor and piapi behind fastcgi_keep_conn (wrk
#     phases, own table)  BENCH_KC_KEEPALIVE [32] (nginx upstream keepalive)
#   BENCH_FLOOR_KC_THREADS [KEEPALIVE x nginx workers + CONNECTIONS]
#   BENCH_KC_OVERLOAD_THREADS [4]  BENCH_KC_OVERLOAD_DURATION [5]: phase kcover,
#     a keep-conn piapi with that small a pool under wrk -c CONNECTIONS, once
#   BENCH_PIAPI [$BUILD/piapi]  BENCH_PIAPI_B [unset]: a second build run side by
#     side with an A/B table appended to results.md; A (own nginx server on
#     PORT+8) and B (PORT+3) are measured alike, in ABBA turns (bench.py's docstring)
#   BENCH_B_CONFIG_EXTRA [unset]: YAML merged into slot B's config (B defaults
#     to A's binary: a config variant); BENCH_A_CONFIG_EXTRA the same for A
#   BENCH_AB_SLICES [8] turns per slot in a wrk phase (its duration split among
#     them)  BENCH_AB_REPEATS [2] turns per slot in a stream phase
#   BENCH_PIN [unset]: CPU affinity per kind, e.g. "piapi=1 front=0 load=0-1"
#     (kinds front, up, sse, tls, floor, piapi, load)
#   BENCH_LOG_LEVEL [info]  BENCH_LOG_MAX_MB [64] (logs are truncated past this)
#   BENCH_CONN_COUNT [stub_status if nginx has it, else log]
# Everything listens on loopback only; every load is bounded in time.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"
BUILD=${BUILD:-build}
export BUILD

# wrk, strace, git (and perf for `profile`) on top of the project's own
# dependencies: scripts/install-deps.sh lists them.
if [ "${1:-}" = profile ]; then scripts/install-deps.sh profile; else scripts/install-deps.sh bench; fi

[ -x "${BENCH_PIAPI:-$BUILD/piapi}" ] || { echo "bench: ${BENCH_PIAPI:-$BUILD/piapi} missing; run make" >&2; exit 1; }

bin="$BUILD/bench/bin"
mkdir -p "$bin"
CC=${CC:-cc}
for prog in sse_server sse_client; do
    if [ ! -x "$bin/$prog" ] || [ "$here/$prog.c" -nt "$bin/$prog" ]; then
        $CC -O2 -Wall -Wextra -o "$bin/$prog" "$here/$prog.c"
    fi
done
if [ ! -x "$bin/floor" ] || [ "$here/floor.c" -nt "$bin/floor" ]; then
    $CC -O2 -Wall -Wextra -pthread -o "$bin/floor" "$here/floor.c" -lfcgi
fi

# 1,000 streams need ~2,000 fds in nginx and ~4,000 in piapi.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec python3 "$here/bench.py" "$@"
