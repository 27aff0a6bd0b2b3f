#!/bin/sh
# Installs the Debian packages piapi needs, if any are missing. Idempotent
# and quiet when everything is present.
#   scripts/install-deps.sh          build and `make run`
#   scripts/install-deps.sh test     + what the unit and integration suites
#                                      run (make test, unit, integration, asan, tsan)
#   scripts/install-deps.sh bench    + what `make bench` runs (tests/bench)
#   scripts/install-deps.sh profile  + what `tests/bench/run.sh profile` runs
#   scripts/install-deps.sh fuzz     + what `make fuzz` runs (tests/fuzz)
#   scripts/install-deps.sh screenshot  test + what scripts/monitoring-screenshot.sh runs
#   scripts/install-deps.sh --list MODE   prints MODE's packages, installs nothing
# Programs from Debian's required/essential packages (coreutils, grep, sed,
# perl-base, util-linux, ...) are on every Debian 12 system and not listed.
# tests/integration/test_tools.py checks that every program the suites,
# scripts and make targets run comes from one of these lists (or from that
# base system).
set -eu

list=0
if [ "${1:-}" = --list ]; then list=1; shift; fi
mode=${1:-run}

# cc, make (build-essential), the -dev packages (Makefile PKGS), nginx and
# curl (make run: the front end and its readiness probe).
PKGS="build-essential pkg-config libfcgi-dev libcurl4-openssl-dev libyaml-dev
      libcjson-dev libsqlite3-dev libhiredis-dev nginx-light curl"
case $mode in
run) ;;
test|screenshot)
    # promtool (prometheus) checks the exposition; node runs the real
    # clients (Debian's nodejs only where no node is installed already).
    # openssl makes the test CA of the HTTPS upstream tests; strace watches
    # the event loop's syscalls (test_upstream_cache); cgi-fcgi (libfcgi-bin)
    # is the Dockerfile HEALTHCHECK and k8s liveness probe the deploy tests
    # run; python3-yaml reads docker-compose.yml and the k8s manifest;
    # redis-server: the shared-limits tests start their own on loopback;
    # redis-cli (redis-tools) pokes at it.
    PKGS="$PKGS libcunit1-dev lighttpd spawn-fcgi python3 python3-yaml valgrind prometheus
          openssl strace libfcgi-bin redis-server redis-tools"
    if [ "$list" = 1 ] || ! command -v node >/dev/null 2>&1; then PKGS="$PKGS nodejs npm"; fi
    # the README's dashboard picture: headless Chromium, then pngquant
    [ "$mode" = screenshot ] && PKGS="$PKGS chromium pngquant" ;;
bench|profile)
    # bench.py (python3) drives wrk, counts syscalls with strace, names
    # the measured tree with git and makes the TLS phase's test CA with
    # openssl; `profile` adds perf, or callgrind without it.
    PKGS="$PKGS python3 wrk strace git openssl"
    [ "$mode" = profile ] && PKGS="$PKGS linux-perf valgrind" ;;
fuzz)
    # libFuzzer's runtime is libclang-rt-14-dev (clang only recommends it)
    PKGS="$PKGS clang libclang-rt-14-dev" ;;
*)
    echo "install-deps.sh: unknown mode '$mode' (run, test, bench, profile, fuzz, screenshot)" >&2
    exit 2 ;;
esac
[ -n "${PIAPI_EXTRA_PKGS:-}" ] && PKGS="$PKGS $PIAPI_EXTRA_PKGS"

if [ "$list" = 1 ]; then
    # shellcheck disable=SC2086
    printf '%s\n' $PKGS
    exit 0
fi

missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
        || missing="$missing $p"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" != 0 ]; then
    echo "piapi: missing packages:$missing (run as root or: sudo apt-get install$missing)" >&2
    exit 1
fi
echo "piapi: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $missing >/dev/null
