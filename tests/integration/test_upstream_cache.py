"""The loop's upstream connection cache after a burst.

libcurl (7.88) checks every idle connection of a cache for liveness, one
poll() each, at most once a second, and it does so on the path of the next
transfer that needs a connection: after a burst of streams left N idle
connections, a request that came after a pause would wait for N polls
before its upstream request went out. piapi's loop runs that check itself
as soon as it falls due (src/loop.c, prune()), so a request finds it done.

Checked with strace on the loop thread, which accepts every FastCGI
connection and sends every upstream request: between a request's accept4
and its upstream sendto there is libcurl's one liveness poll of the
connection it reuses, not N. Before prune() existed, 2 of the 5 requests
below paid N polls (the first after the pause, and the first a second
later); one may still, if it arrives in the same millisecond the check
falls due.
"""
import shutil
import subprocess
import threading
import time
import unittest

import harness
from test_gateway import ALICE, bearer, gateway_config
from test_hardening import raw_get

BURST = 40          # concurrent streams: idle upstream connections after
REQUESTS = 5        # sparse requests, SPACING apart, watched by strace
SPACING = 0.45
PATH_POLLS = 3      # libcurl's liveness check of the reused connection, and slack


def poll_counts(trace):
    """Polls of the thread that accepts, split into those between an
    accept4 and the next upstream sendto (one list entry per request) and
    all the others."""
    loop_tid = None
    per_request, others, current = [], 0, None
    for line in trace.splitlines():
        tid, _, call = line.partition(" ")
        call = call.lstrip()
        if call.startswith("accept4(") and "= -1" not in call:
            loop_tid = tid
            current = 0
        elif tid != loop_tid:
            continue
        elif call.startswith("sendto(") and current is not None:
            per_request.append(current)
            current = None
        elif call.startswith("poll(") and "POLLPRI" in call:
            if current is None:
                others += 1
            else:
                current += 1
    return per_request, others


class TestIdleConnectionCheck(unittest.TestCase):

    def test_liveness_check_runs_off_the_request_path(self):
        if not shutil.which("strace"):
            self.skipTest("strace not installed (scripts/install-deps.sh test)")
        s = harness.Stack("nginx", gateway_config, name="cache-prune")
        self.addCleanup(s.stop)
        s.start()

        results = []
        req = raw_get("/piapi/cx/v1/sse?n=3&interval=0.1", [bearer(ALICE)])
        burst = [threading.Thread(target=lambda: results.append(s.raw(req, timeout=10)))
                 for _ in range(BURST)]
        for th in burst:
            th.start()
        for th in burst:
            th.join(15)
        self.assertEqual(sum(ex.arrival_of(b"data: [DONE]") is not None for ex in results), BURST)
        self.assertGreaterEqual(s.mock.stats()["open_connections"], BURST,
                                "the burst's connections are not cached")
        time.sleep(1.2)  # the check falls due

        out = s.tmp / "strace.txt"
        tracer = subprocess.Popen(["strace", "-f", "-e", "trace=accept4,poll,sendto",
                                   "-o", str(out), "-p", str(s.piapi.pid)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: tracer.poll() is None and tracer.kill())
        attached = tracer.stderr.readline()
        self.assertIn("attached", attached)
        for _ in range(REQUESTS):
            r = s.request("GET", "/piapi/cx/v1/models", [bearer(ALICE)], timeout=5)
            self.assertEqual(r.status, 200, r)
            time.sleep(SPACING)
        tracer.terminate()
        tracer.wait(5)

        per_request, others = poll_counts(out.read_text())
        print(f"\n  polls per request (accept4 to upstream send): {per_request}; "
              f"elsewhere: {others} ({BURST} idle connections)")
        self.assertEqual(len(per_request), REQUESTS, per_request)
        self.assertLessEqual(sum(n > PATH_POLLS for n in per_request), 1, per_request)
        # The check itself still runs: every idle connection, once a second.
        self.assertGreaterEqual(others, BURST)
        # ...and the transfer that runs it never reaches the upstream.
        self.assertEqual(len(s.mock.requests()), BURST + REQUESTS)


if __name__ == "__main__":
    unittest.main()
