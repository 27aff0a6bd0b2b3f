#!/bin/sh
# Installs the Debian packages piapi needs to build, test and run, if any
# are missing. Idempotent and quiet when everything is present.
set -eu

PKGS="build-essential pkg-config libfcgi-dev libcurl4-openssl-dev libyaml-dev
      libcjson-dev libcunit1-dev nginx-light lighttpd spawn-fcgi curl
      python3 valgrind"
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
