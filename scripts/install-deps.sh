#!/bin/sh
# Installs the Debian packages piapi needs, if any are missing. Idempotent
# and quiet when everything is present.
#   scripts/install-deps.sh        build and run (make, make run)
#   scripts/install-deps.sh test   + what the test suites use
set -eu

PKGS="build-essential pkg-config libfcgi-dev libcurl4-openssl-dev libyaml-dev
      libcjson-dev nginx-light curl"
if [ "${1:-}" = test ]; then
    # promtool (prometheus) checks the exposition; node runs the real
    # clients (Debian's nodejs only where no node is installed already).
    # openssl makes the test CA of the HTTPS upstream tests; strace watches
    # the event loop's syscalls (test_upstream_cache).
    PKGS="$PKGS libcunit1-dev lighttpd spawn-fcgi python3 valgrind prometheus openssl strace"
    command -v node >/dev/null 2>&1 || PKGS="$PKGS nodejs npm"
fi
[ -n "${PIAPI_EXTRA_PKGS:-}" ] && PKGS="$PKGS $PIAPI_EXTRA_PKGS"

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
