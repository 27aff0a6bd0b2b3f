"""Answers given before the request body is read, slow bodies, and
pipelined FastCGI requests.

1. Early answers (TestEarlyAnswer*): piapi answers 413 (body over
   maxBodyBytes), 401 (wrong key) and 404 (service type not bound to the
   key) from the params alone, while the web server is still sending a
   large body. If piapi closes the connection with the body still arriving,
   the web server's write fails (nginx: `writev() failed (32: Broken pipe)
   while sending request to upstream`) and the client gets 502 while piapi
   logs and counts the status it meant. Every try must get its status and
   JSON body, through nginx (client_max_body_size raised so nginx passes
   the bodies on) and lighttpd (as shipped: it streams request bodies).
   On the tree before the fix, nginx: 413 x 40 MiB 4/20 502, 401 x 40 MiB
   2/20, 404 x 4 MiB 1/20 (issue 16); numbers of this test's own runs are
   printed.

2. Slow bodies (TestSlowBody): lighttpd as shipped streams request bodies.
   Requests with a valid key that send 10 bytes of a 100000-byte body and
   then drip must not pin the request slots: the body's idle deadline
   (bodyIdleTimeoutMs, short here) answers them 408, and meanwhile other
   members' requests, /healthz and /metrics answer 200. On the tree before
   the fix the drippers held every slot and everything else got 503.

3. Pipelining (TestPipelined): a direct FastCGI client sends request 2 on
   a kept connection before request 1's FCGI_END_REQUEST. libfcgi reads
   ahead and frees what it read past request 1's end with request 1, so
   request 2 was never answered and the connection stayed open (5 in 11
   in issue 16; here every try). piapi now answers request 1 and, when
   libfcgi swallowed part of request 2, closes the connection: the client
   sees the connection end instead of waiting forever.
"""
import json
import os
import socket
import sys
import threading
import time
import unittest

import harness
from test_hardening import (ALICE, BOB, auth, fcgi_connect, fcgi_encode, fcgi_exchange,
                            fcgi_params, hardening_config, metric_value)

TRIES = int(os.environ.get("PIAPI_EARLY_TRIES", "30"))
MIB = 1024 * 1024
BIG = 40 * MIB           # over maxBodyBytes (32 MiB, the default)
NGINX_MAX_BODY = "client_max_body_size 64m;"


def note(msg):
    sys.stderr.write(f"[early] {msg}\n")
    sys.stderr.flush()


class BigBodyStack(harness.Stack):
    """harness.Stack with nginx's client_max_body_size raised above the
    bodies sent here, so nginx hands them to piapi instead of answering
    413 itself (the deploy snippet's 32m equals piapi's default limit)."""

    def _render(self, src, subs):
        text = super()._render(src, subs)
        if str(src).endswith("piapi.conf"):
            if "client_max_body_size 32m;" not in text:
                raise harness.HarnessError(f"{src}: no client_max_body_size 32m; to raise")
            text = text.replace("client_max_body_size 32m;", NGINX_MAX_BODY)
        return text


def post_big(port, path, key, size, timeout=30.0):
    """A POST of `size` bytes on a raw socket: (status, parsed JSON or None,
    error text or None). The body is sent while the answer is read, so an
    early answer (and a close) is seen however far the upload got."""
    body = b"x" * size
    head = harness.build_request("POST", path, [("Authorization", "Bearer " + key),
                                                ("Content-Type", "application/json"),
                                                ("Content-Length", str(size)),
                                                ("Connection", "close")])
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    got = bytearray()
    done = threading.Event()

    def reader():
        try:
            while True:
                d = s.recv(65536)
                if not d:
                    break
                got.extend(d)
        except OSError:
            pass
        done.set()

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        s.sendall(head)
        view = memoryview(body)
        for i in range(0, size, MIB):
            if done.is_set():
                break
            s.sendall(view[i:i + MIB])
    except OSError:
        pass  # answered early and closed: read what came
    th.join(timeout)
    s.close()
    raw = bytes(got)
    head_b, _, payload = raw.partition(b"\r\n\r\n")
    try:
        status = int(head_b.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None, None, f"no status line: {raw[:200]!r}"
    if b"transfer-encoding: chunked" in head_b.lower():
        out, i = b"", 0
        while True:
            j = payload.index(b"\r\n", i)
            n = int(payload[i:j].split(b";")[0], 16)
            if n == 0:
                break
            out += payload[j + 2:j + 2 + n]
            i = j + 2 + n + 2
        payload = out
    try:
        return status, json.loads(payload), None
    except ValueError:
        return status, None, f"not JSON: {payload[:200]!r}"


# ============================================ 1: early answers =========

class EarlyAnswerChecks:
    FORM = None

    @classmethod
    def setUpClass(cls):
        cls.stack = BigBodyStack(cls.FORM, hardening_config({}), name=f"early-{cls.FORM}")
        cls.addClassCleanup(cls.stack.stop)
        cls.stack.start()

    def run_tries(self, what, path, key, size, status):
        t = time.monotonic()
        tally, bad = {}, []
        for i in range(TRIES):
            st, js, err = post_big(self.stack.port, path, key, size)
            tally[st] = tally.get(st, 0) + 1
            ok = st == status and js is not None and js.get("type") == "error"
            if not ok:
                bad.append((i, st, err or js))
        secs = time.monotonic() - t
        note(f"{self.FORM}: {what}: {TRIES} tries of {size // MIB} MiB -> {tally} "
             f"in {secs:.1f} s")
        self.assertEqual(bad, [], f"{what}: tries without their {status} JSON answer")
        self.assertTrue(self.stack.piapi.alive() if self.stack.piapi else True)

    def test_413_body_over_the_limit(self):
        self.run_tries("413", "/piapi/cx/v1/echo", ALICE, BIG, 413)

    def test_401_wrong_key(self):
        self.run_tries("401", "/piapi/cx/v1/echo", "piapi-user-nobody-000000000", BIG, 401)

    def test_404_unbound_service_type(self):
        # bob's provider offers cc only
        self.run_tries("404", "/piapi/cx/v1/echo", BOB, BIG, 404)


class TestEarlyAnswerNginx(EarlyAnswerChecks, unittest.TestCase):
    FORM = "nginx"


class TestEarlyAnswerLighttpd(EarlyAnswerChecks, unittest.TestCase):
    FORM = "lighttpd-socket"


# ============================================ 2: slow bodies ===========

SLOTS = 4                 # piapi --threads
DRIPPERS = 4              # one per slot
BODY_IDLE_MS = 1000       # bodyIdleTimeoutMs, short so the test is quick
DRIP_EVERY = 3.0          # seconds between dripped bytes: past the idle deadline


def drip(port, key, out, i, stop_after=8.0):
    """Sends a POST announcing 100000 body bytes, 10 of them, then one
    byte every DRIP_EVERY seconds, reading the answer meanwhile. out[i] =
    (seconds until the answer ended or the connection closed, raw bytes)."""
    head = harness.build_request("POST", "/piapi/cx/v1/echo",
                                 [("Authorization", "Bearer " + key),
                                  ("Content-Type", "application/json"),
                                  ("Content-Length", "100000")])
    s = socket.create_connection(("127.0.0.1", port), timeout=stop_after)
    t0 = time.monotonic()
    got = b""
    try:
        s.sendall(head + b'{"pad":"xx')
        next_drip = t0 + DRIP_EVERY
        while time.monotonic() - t0 < stop_after:
            s.settimeout(max(0.01, min(next_drip - time.monotonic(), 0.2)))
            try:
                d = s.recv(65536)
                if not d:
                    break
                got += d
                continue
            except socket.timeout:
                pass
            except OSError:
                break
            if time.monotonic() >= next_drip:
                try:
                    s.sendall(b"x")
                except OSError:
                    break
                next_drip += DRIP_EVERY
    finally:
        s.close()
    out[i] = (time.monotonic() - t0, got)


class TestSlowBody(unittest.TestCase):
    """lighttpd as shipped (server.stream-request-body = 1) hands piapi a
    body as it arrives. Four drippers against four request slots."""

    @classmethod
    def setUpClass(cls):
        cls.stack = harness.Stack("lighttpd-socket",
                                  hardening_config({"bodyIdleTimeoutMs": BODY_IDLE_MS}),
                                  piapi_args=["--threads", str(SLOTS)], name="early-slow")
        cls.addClassCleanup(cls.stack.stop)
        cls.stack.start()

    def timed(self, method, path, headers=(), body=None):
        t = time.monotonic()
        r = self.stack.request(method, path, list(headers), body, timeout=10)
        return r, time.monotonic() - t

    def test_drippers_get_408_and_pin_nothing(self):
        s = self.stack
        out = [None] * DRIPPERS
        threads = [threading.Thread(target=drip, args=(s.port, ALICE, out, i))
                   for i in range(DRIPPERS)]
        t0 = time.monotonic()
        for th in threads:
            th.start()
        time.sleep(0.3)   # every slot is taken by a dripper now (was: for good)
        health, h_secs = self.timed("GET", "/healthz")
        metrics, m_secs = self.timed("GET", "/metrics")
        other, o_secs = self.timed("POST", "/piapi/cc/v1/messages",
                                   [("x-api-key", BOB), ("Content-Type", "application/json")],
                                   b'{"model":"m","messages":[]}')
        for th in threads:
            th.join(15)
        note(f"slow bodies: /healthz {health.status} in {h_secs:.3f} s, /metrics "
             f"{metrics.status} in {m_secs:.3f} s, another member {other.status} in "
             f"{o_secs:.3f} s; drippers: "
             f"{[(round(o[0], 2), o[1][:12]) if o else None for o in out]}")
        self.assertEqual(health.status, 200, health)
        self.assertLess(h_secs, 0.5, "/healthz waited for a request slot")
        self.assertEqual(metrics.status, 200, metrics)
        self.assertLess(m_secs, 0.5, "/metrics waited for a request slot")
        self.assertEqual(other.status, 200, f"another member while the drippers drip: {other!r}")
        for i, o in enumerate(out):
            self.assertIsNotNone(o, f"dripper {i} did not end")
            secs, raw = o
            # piapi's idle deadline ends it: a 408 JSON answer, or (if
            # lighttpd can no longer deliver one) the connection's end
            self.assertLess(secs, BODY_IDLE_MS / 1000.0 + 2.5,
                            f"dripper {i} held on for {secs:.1f} s: {raw[:200]!r}")
            if raw:
                self.assertTrue(raw.startswith(b"HTTP/1.1 408"), f"dripper {i}: {raw[:300]!r}")
                body = raw.partition(b"\r\n\r\n")[2]
                self.assertEqual(json.loads(body).get("type"), "error", raw[:300])
        line = s.wait_log(lambda l: l.get("status") == 408)
        self.assertTrue(line, "no 408 log line")
        r = s.request("POST", "/piapi/cx/v1/echo", [auth()], b'{"after":1}', timeout=5)
        self.assertEqual(r.status, 200, r)
        self.assertLess(time.monotonic() - t0, 20)

    def test_streamed_body_that_stalls_gets_408(self):
        """A body over 8 MiB streams from FastCGI to the upstream on a pool
        thread: a stall in it ends the transfer with 408 too (no answer
        head went out yet), not with a body cut short upstream."""
        size = 10 * MIB
        head = harness.build_request("POST", "/piapi/cx/v1/echo",
                                     [auth(), ("Content-Type", "application/json"),
                                      ("Content-Length", str(size))])
        s = socket.create_connection(("127.0.0.1", self.stack.port), timeout=10)
        t0 = time.monotonic()
        try:
            s.sendall(head + b"x" * (2 * MIB))
            got = b""
            while True:
                try:
                    d = s.recv(65536)
                except (socket.timeout, ConnectionResetError):
                    break
                if not d:
                    break
                got += d
        finally:
            s.close()
        secs = time.monotonic() - t0
        note(f"stalled streamed body: {got[:12]!r} after {secs:.2f} s")
        self.assertTrue(got.startswith(b"HTTP/1.1 408"), got[:300])
        self.assertLess(secs, BODY_IDLE_MS / 1000.0 + 3)
        self.assertTrue(self.stack.wait_log(
            lambda l: l.get("status") == 408 and l.get("bytes_in", 0) >= MIB), "no 408 log line")


# ============================================ 3: pipelining ============

def read_records(s, timeout):
    """FastCGI records from s until EOF or `timeout`: (END_REQUEST count,
    stdout bytes, 'eof' or 'timeout')."""
    buf, stdout, ends = b"", b"", 0
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return ends, stdout, "timeout"
        s.settimeout(left)
        try:
            d = s.recv(65536)
        except socket.timeout:
            return ends, stdout, "timeout"
        except ConnectionResetError:
            return ends, stdout, "eof"
        if not d:
            return ends, stdout, "eof"
        buf += d
        while len(buf) >= 8:
            _, rtype, _, clen, plen = __import__("struct").unpack("!BBHHBx", buf[:8])
            if len(buf) < 8 + clen + plen:
                break
            content, buf = buf[8:8 + clen], buf[8 + clen + plen:]
            if rtype == 6:
                stdout += content
            elif rtype == 3:
                ends += 1
        if ends >= 2:
            return ends, stdout, "answered"


class TestPipelined(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.stack = harness.Stack("nginx", hardening_config({}), name="early-pipe")
        cls.addClassCleanup(cls.stack.stop)
        cls.stack.start()

    def test_second_request_is_answered_or_the_connection_ends(self):
        """11 tries each (issue 16: 5 of 11 hung): request 1 is always
        answered; request 2 is answered too or the connection closes,
        within 3 s, never left waiting. Request 1 small (the event loop
        reads it) and with a 100 KB body (a pool thread reads it)."""
        def encode(body):
            params = fcgi_params("/piapi/cx/v1/echo", "POST", [auth()],
                                 content_length=len(body))
            return fcgi_encode(params, body, flags=1)
        second = encode(b'{"n":2}')
        tally = {}
        for first, what in ((encode(b'{"n":1}'), "small"),
                            (encode(b'{"pad":"' + b"x" * 100000 + b'"}'), "100 KB")):
            for i in range(11):
                s = fcgi_connect(self.stack.socket_path)
                try:
                    s.sendall(first + second)
                    ends, stdout, how = read_records(s, 3.0)
                finally:
                    s.close()
                key = (what, ends, how)
                tally[key] = tally.get(key, 0) + 1
                ctx = f"{what} request 1, try {i}"
                self.assertGreaterEqual(ends, 1, f"{ctx}: request 1 unanswered ({how})")
                self.assertTrue(stdout.startswith(b"Status: 200"), f"{ctx}: {stdout[:200]!r}")
                self.assertNotEqual(how, "timeout",
                                    f"{ctx}: request 2 neither answered nor the connection closed")
        note(f"pipelined: (answers, end) -> {tally}")
        r = self.stack.request("POST", "/piapi/cx/v1/echo", [auth()], b"{}", timeout=5)
        self.assertEqual(r.status, 200, r)


if __name__ == "__main__":
    unittest.main()
