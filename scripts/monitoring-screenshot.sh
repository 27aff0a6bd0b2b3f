#!/bin/sh
# Renders the dashboard's main queries from a real run into a PNG for the
# README (docs/monitoring-dashboard.png): tests/integration/test_monitoring.py
# drives traffic through nginx + piapi for a few minutes while Debian's
# Prometheus scrapes it, then headless Chromium (Debian's) screenshots
# Prometheus's own graph page. Grafana is not packaged for Debian, so the
# page is Prometheus's, not Grafana's; the queries are the dashboard's, with
# $__rate_interval as 30s.
#   scripts/monitoring-screenshot.sh [OUT.png] [TRAFFIC_SECONDS]
# Needs root for the install (chromium and pngquant are not in the test set).
set -eu
cd "$(dirname "$0")/.."
out=${1:-docs/monitoring-dashboard.png}
secs=${2:-150}
scripts/install-deps.sh screenshot
make --no-print-directory
raw=$(mktemp --suffix=.png)
trap 'rm -f "$raw"' EXIT
PIAPI_MONITORING_TRAFFIC_S="$secs" PIAPI_MONITORING_SCREENSHOT="$raw" \
    BUILD=${BUILD:-build} tests/run.sh integration test_monitoring.TestLivePrometheus
# keep the committed PNG small: 256 colours are plenty for line graphs
if command -v pngquant >/dev/null 2>&1; then
    pngquant --force --quality 60-90 --output "$out" "$raw"
else
    cp "$raw" "$out"
fi
echo "wrote $out ($(wc -c < "$out") bytes)"
