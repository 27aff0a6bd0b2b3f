"""piapi behind nginx with `fastcgi_keep_conn on` and an upstream `keepalive`
cache: the pool must stay safe when nginx holds more kept FastCGI
connections than piapi has threads.

With keep-conn, libfcgi serves the next request of a kept connection on the
thread that served the last one, and that thread waits in read() on the
connection while nginx keeps it idle in its cache. A fixed pool deadlocks
behind idle kept connections. Control experiment (not re-run here; numbers
measured with a naive fixed libfcgi pool on this kind of machine):
  - 2 threads, 4 concurrent curls: 2 requests hung for 12 s (curl timeout);
  - 8 threads, wrk -c32: 24 connections stuck in the backlog, latency max 3.07 s;
  - after a keep-conn benchmark, a non-keep-conn location on the same socket
    got 0 req/s until nginx dropped its idle connections;
  - graceful shutdown waited until nginx closed its idle connections.

piapi never parks a thread on a kept connection: after each request the
connection goes back to the event loop (src/pool.c, src/loop.c), which waits
for its next request in epoll and serves it like a new connection's. Threads
only serve requests that may block (a body still arriving, a wait for a
request slot). This test holds it to that with a SMALL pool: --threads 4 (4
request slots, at most 8 threads) against nginx with `keepalive 32` per
worker (2 workers here):

  (a) 24 clients at once (a 0.5 s SSE stream each, then /echo in a tight
      loop for ~2.5 s): nginx opens far more FastCGI connections than piapi
      has threads, and caches them when the load stops;
  (b) then bursts of fresh requests through the keep-conn server AND through
      a second server that uses the same socket without keep-conn (the
      notes' 0 req/s case): every request must answer 200 within 2 s;
  (c) /metrics pool gauges stay <= the cap throughout; SIGTERM with nginx
      still holding idle kept connections: piapi closes them and exits 0
      within the grace.

Error counts per phase are printed (stderr) for the report; the target is 0.
test_1 failed on the tree of 2026-11-30 (1be44aa), when threads were parked
on kept connections: 1-7 of ~200 requests got 502 in (a).
test_hardening.TestArrival checks the same straight over FastCGI: idle kept
connections hold no thread, and each keeps serving its next request.
"""
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import unittest

import harness
from harness import DEPLOY, HarnessError
from test_gateway import ALICE, bearer, gateway_config

THREADS = 4                  # piapi --threads: request slots
CAP = THREADS + 4            # pool threads at most (src/pool.c: slots + accepters)
CLIENTS = 24                 # (a): concurrent clients, 3x the cap
KEEPALIVE = 32               # nginx upstream keepalive (per worker)
BOUND = 2.0                  # (b): seconds any single fresh request may take
GRACE = 2                    # piapi --grace
SOCK_LINE = "fastcgi_pass unix:/run/piapi/piapi.sock;"

ECHO = "/piapi/cx/v1/echo"
SSE = "/piapi/cx/v1/sse?n=5&interval=0.1"
BUSY = 'piapi_pool_threads{state="busy"}'
IDLE = 'piapi_pool_threads{state="idle"}'


def keepconn_snippet(sock):
    """deploy/nginx/piapi.conf with every `fastcgi_pass unix:...;` turned
    into the keep-conn upstream."""
    text = (DEPLOY / "nginx" / "piapi.conf").read_text()
    if SOCK_LINE not in text:
        raise HarnessError(f"deploy/nginx/piapi.conf: no {SOCK_LINE!r} to substitute")
    return text.replace(SOCK_LINE, "fastcgi_pass piapi;\n    fastcgi_keep_conn on;")


class KeepConnStack(harness.Stack):
    """harness.Stack with the nginx front rendered for keep-conn: the
    upstream block goes into nginx.conf's http {} (it must be at http
    level), the location snippet into the server. A second server on
    `plain_port` includes the unmodified snippet (no keep-conn) on the same
    socket."""

    def _start_nginx(self):
        d = self.tmp / "nginx"
        (d / "logs").mkdir(parents=True)
        (d / "tmp").mkdir()
        sock = str(self.socket_path)
        self.plain_port = harness.free_port()
        (d / "piapi-keepconn.conf").write_text(keepconn_snippet(sock))
        (d / "piapi.conf").write_text(self._render(DEPLOY / "nginx" / "piapi.conf",
                                                   [("/run/piapi/piapi.sock", sock)]))
        upstream = (f"upstream piapi {{\n        server unix:{sock};\n"
                    f"        keepalive {KEEPALIVE};\n    }}\n\n"
                    f"    server {{\n        listen 127.0.0.1:{self.plain_port};\n"
                    f"        include piapi.conf;\n    }}\n\n    server {{")
        conf = self._render(DEPLOY / "nginx" / "nginx.conf", [
            ("listen 9200;", f"listen 127.0.0.1:{self.port};"),
            ("listen [::]:9200;", f"listen [::1]:{self.port};"),
            ("/run/piapi-nginx.pid", d / "nginx.pid"),
            ("/var/log/nginx/", f"{d}/logs/"),
            ("/var/lib/nginx/", f"{d}/tmp/"),
            ("include piapi.conf;", "include piapi-keepconn.conf;"),
        ])
        if conf.count("    server {") != 1:
            raise HarnessError("deploy/nginx/nginx.conf: expected exactly one server block")
        (d / "nginx.conf").write_text(conf.replace("    server {", "    " + upstream, 1))
        shutil.copy("/etc/nginx/fastcgi_params", d / "fastcgi_params")
        argv = ["nginx", "-p", f"{d}/", "-c", d / "nginx.conf"]
        t = subprocess.run(argv + ["-t", "-q"], capture_output=True, text=True, timeout=10)
        if t.returncode != 0:
            raise HarnessError(f"nginx -t failed:\n{t.stderr}")
        self.front = harness.Proc("nginx", argv + ["-g", "daemon off;"],
                                  stderr_path=d / "stderr.log")
        self.front_error_log = d / "logs" / "piapi-error.log"


def note(msg):
    sys.stderr.write(f"[keepconn] {msg}\n")
    sys.stderr.flush()


class Outcome:
    """Thread-safe tally of (status or exception name, seconds)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.rows = []

    def add(self, what, secs):
        with self.lock:
            self.rows.append((what, secs))

    def counts(self):
        c = {}
        for what, _ in self.rows:
            c[what] = c.get(what, 0) + 1
        return c

    def slowest(self):
        return max((s for _, s in self.rows), default=0.0)

    def bad(self, ok=(200,)):
        return [(w, round(s, 3)) for w, s in self.rows if w not in ok]


def one(port, path, timeout, out, headers=(bearer(ALICE),)):
    t = time.monotonic()
    try:
        r = harness.http_request(port, "GET", path, list(headers), timeout=timeout)
        what = r.status
        if r.status == 200 and "sse" in path and b"data: [DONE]" not in r.body:
            what = "sse-truncated"
    except Exception as e:  # noqa: BLE001 - every failure is counted
        what = type(e).__name__
    out.add(what, time.monotonic() - t)
    return what


def run_threads(n, target):
    ts = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(n)]
    for th in ts:
        th.start()
    return ts


class TestKeepConnPool(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.stack = KeepConnStack("nginx", gateway_config, name="keepconn",
                                  piapi_args=["--threads", str(THREADS), "--grace", str(GRACE)])
        cls.addClassCleanup(cls.stack.stop)
        cls.stack.start()

    def gauges(self, port=None):
        """Pool gauges from /metrics (the plain server: no kept connection
        needed to read them), or None when it does not answer in 2 s."""
        try:
            r = harness.http_request(port or self.stack.plain_port, "GET", "/metrics", timeout=2)
        except OSError:
            return None
        if r.status != 200:
            return None
        g = {}
        for line in r.body.decode(errors="replace").splitlines():
            m = re.match(r"^(piapi_pool_\w+(?:\{[^}]*\})?|piapi_requests_in_flight)\s+(\S+)$", line)
            if m:
                g[m.group(1)] = float(m.group(2))
        return g

    # The three phases share one stack and run in order (test_1, _2, _3):
    # each needs the state the one before left behind.

    def test_1_overload_with_more_kept_connections_than_threads(self):
        """(a) 24 clients against 8 threads. Nothing may hang; requests
        beyond the 4 slots may wait (or get a clean 503 after
        --queue-timeout), but none may fail with 502: piapi must never
        close a kept connection that carries a request."""
        s = self.stack
        self.assertEqual(s.request("GET", ECHO, [bearer(ALICE)]).status, 200)
        stop = threading.Event()
        type(self).samples, type(self).sampler_stop = [], stop

        def sampler():
            while not stop.is_set():
                type(self).samples.append(self.gauges())
                stop.wait(0.1)
        threading.Thread(target=sampler, daemon=True).start()

        load = Outcome()
        until = time.monotonic() + 4.0

        def client(_i):
            one(s.port, SSE, 10.0, load)
            while time.monotonic() < until:
                one(s.port, ECHO, 10.0, load)
        t = time.monotonic()
        for th in run_threads(CLIENTS, client):
            th.join(30)
        note(f"(a) {CLIENTS} clients, {len(load.rows)} requests in {time.monotonic() - t:.1f} s: "
             f"{load.counts()}, slowest {load.slowest():.2f} s; gauges after: {self.gauges()}")
        time.sleep(0.5)  # nginx now holds the idle kept connections
        hung = [b for b in load.bad(ok=(200, 502, 503))]
        self.assertEqual(hung, [], "(a) requests hung or failed at the socket")
        if load.bad(ok=(200, 503)):
            aborts = sum(1 for r in s.piapi_log() if r.get("status") == 499)
            closed = s.front_log_text().count("upstream prematurely closed connection")
            self.fail(f"(a) {len(load.bad(ok=(200, 503)))} of {len(load.rows)} requests got 502: "
                      f"nginx logged {closed} x 'upstream prematurely closed connection while "
                      f"reading response header', piapi logged {aborts} x 499 client_abort right "
                      f"after reading the request: a kept connection was closed while it "
                      f"carried a request")

    def test_2_fresh_requests_never_wait_behind_idle_kept_connections(self):
        """(b) with nginx holding idle kept connections: bursts wider than
        the pool and sequential requests, through keep-conn and through the
        plain server on the same socket: every one 200 within BOUND."""
        s = self.stack
        fresh = Outcome()
        for _ in range(3):
            for th in run_threads(2 * CAP, lambda i: one(s.port if i % 4 else s.plain_port,
                                                         SSE if i % 3 == 0 else ECHO,
                                                         BOUND + 3, fresh)):
                th.join(BOUND + 10)
            time.sleep(0.3)
        for i in range(2 * CAP):
            one(s.port if i % 2 else s.plain_port, ECHO, BOUND + 3, fresh)
        note(f"(b) {len(fresh.rows)} fresh requests: {fresh.counts()}, "
             f"slowest {fresh.slowest():.2f} s")
        self.assertEqual(fresh.bad(), [], "(b) fresh requests not answered 200")
        self.assertLessEqual(fresh.slowest(), BOUND,
                             "(b) a fresh request waited behind idle kept connections")

    def test_3_gauges_within_cap_and_sigterm_closes_kept_connections(self):
        """(c) /metrics never showed more than --threads + 4 threads; SIGTERM
        while nginx still holds idle kept connections: exit 0 within the
        grace."""
        s = self.stack
        stop = getattr(type(self), "sampler_stop", None)
        if stop:
            stop.set()
        got = [g for g in getattr(type(self), "samples", []) if g] + [self.gauges() or {}]
        got = [g for g in got if g]
        self.assertTrue(got, "no /metrics answer")
        worst = max(g.get(BUSY, 0) + g.get(IDLE, 0) for g in got)
        note(f"(c) {len(got)} gauge samples; most threads seen {worst:.0f} (cap {CAP})")
        self.assertLessEqual(worst, CAP, "pool grew beyond --threads + 4")
        # one more request through keep-conn, so nginx surely holds an idle
        # kept connection when SIGTERM comes
        self.assertIsNotNone(self.gauges(s.port), "/metrics through keep-conn did not answer")
        self.assertTrue(s.piapi.alive(), s.piapi_log_text()[-2000:])
        t = time.monotonic()
        s.piapi.popen.send_signal(signal.SIGTERM)
        try:
            code = s.piapi.popen.wait(GRACE + 3)
        except subprocess.TimeoutExpired:
            code = None
        secs = time.monotonic() - t
        note(f"(c) SIGTERM -> exit {code} after {secs:.2f} s")
        self.assertIsNotNone(code, f"piapi still running {GRACE + 3} s after SIGTERM "
                                   "(idle kept connections not closed)")
        self.assertEqual(code, 0, s.piapi_log_text()[-2000:])
        self.assertLess(secs, GRACE + 1)

if __name__ == "__main__":
    unittest.main(verbosity=2)
