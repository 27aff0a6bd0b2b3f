#!/usr/bin/env python3
"""Instructions per request of piapi builds, counted by callgrind: a
measure that does not move with the machine's load, for A/B comparisons
where wall-clock rounds disagree by more than the difference sought.

    python3 tests/bench/instructions.py BINARY [BINARY ...]

Each binary serves the same stack (nginx + the integration tests' mock
upstream, loopback only) under valgrind --tool=callgrind twice: 200 and
1,200 sequential 1 KB POSTs on one kept client connection. The difference
of the two totals over 1,000 is the cost of one request in the piapi
process (piapi, libcurl, libfcgi, libc), start-up and shutdown cancelled
out. Needs valgrind (scripts/install-deps.sh profile). Takes about a
minute per binary."""
import glob
import http.client
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
import harness  # noqa: E402

MEMBER = "piapi-user-bench-instructions"
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 900}]}).encode()


def config(stack):
    return {
        "providers": [{"name": "bench", "apiKeys": {"main": "sk-bench-instructions-1"},
                       "services": [{"type": "cx", "baseUrl": stack.mock.base + "/v1"}]}],
        "users": [{"name": "bench", "apiKey": MEMBER, "providerName": "bench",
                   "providerKeyName": "main"}],
    }


def count(binary, requests, work):
    out = work / f"callgrind.{requests}"
    wrapper = work / f"piapi-under-callgrind-{requests}.sh"
    wrapper.write_text("#!/bin/sh\nexec valgrind --tool=callgrind "
                       f"--callgrind-out-file={out}.%p {binary} \"$@\"\n")
    wrapper.chmod(0o755)
    stack = harness.Stack("nginx", config, piapi_bin_path=wrapper,
                          piapi_args=["--threads", "64", "--log-level", "info"],
                          name="instructions")
    stack.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
        for _ in range(requests):
            conn.request("POST", "/piapi/cx/chat/completions", body=BODY,
                         headers={"Authorization": "Bearer " + MEMBER,
                                  "Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise SystemExit(f"{binary}: HTTP {r.status}")
        stack.piapi.popen.send_signal(signal.SIGTERM)
        stack.piapi.popen.wait(timeout=60)
    finally:
        stack.stop()
    total = 0
    for f in glob.glob(f"{out}.*"):
        for line in open(f):
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    return total


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    os.environ.setdefault("PIAPI_LOG_LEVEL", "info")
    print("| binary | instructions @200 | @1,200 | per request |\n|---|---:|---:|---:|")
    for binary in sys.argv[1:]:
        with tempfile.TemporaryDirectory(prefix="piapi-instructions-") as d:
            a = count(os.path.abspath(binary), 200, Path(d))
            b = count(os.path.abspath(binary), 1200, Path(d))
        print(f"| {binary} | {a:,} | {b:,} | {(b - a) / 1000:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
