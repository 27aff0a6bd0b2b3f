"""End-to-end checks of piapi behind a real front end, run against each of
the four launch forms (nginx, lighttpd-socket, lighttpd-binpath, spawn-fcgi).
What crossed the wire is read back from the mock upstream's record."""
import grp
import gzip
import hashlib
import json
import os
import pwd
import time
import unittest
from pathlib import Path

import harness
from harness import build_request, header_values
from mock_upstream import GZIP_TEXT, big_content

ALICE = "piapi-user-alice-Zr8wq3VnT0"      # openai / main   (cx, oq)
BOB = "piapi-user-bob-Kp4sX9mL2e"          # anthropic / main (cc)
CAROL = "piapi-user-carol-Hd7fY1bN6u"      # openai / backup  (no cc)
DAVE = "piapi-user-dave-Qw5eR2tY8i"        # dead provider (nothing listens)
MEMBER_KEYS = (ALICE, BOB, CAROL, DAVE)
OPENAI_MAIN = "sk-openai-main-4f9a2c7e1b"
OPENAI_BACKUP = "sk-openai-backup-8d3e6a0f5c"
ANTHROPIC_MAIN = "sk-ant-main-2b7c9e4d1a"
DEAD_KEY = "sk-dead-0000000000"
PROVIDER_KEYS = (OPENAI_MAIN, OPENAI_BACKUP, ANTHROPIC_MAIN, DEAD_KEY)


def gateway_config(stack):
    mock = f"http://127.0.0.1:{stack.mock.port}"
    return {
        "providers": [
            {"name": "openai",
             "apiKeys": {"main": OPENAI_MAIN, "backup": OPENAI_BACKUP},
             "services": [
                 {"type": "cx", "baseUrl": mock + "/codex"},   # default auth: Bearer
                 {"type": "oq", "baseUrl": mock + "/q",
                  "auth": {"mode": "query", "name": "api_key"}},
                 # a host name, as real providers have: libcurl resolves it
                 {"type": "ln", "baseUrl": f"http://localhost:{stack.mock.port}/named"},
             ]},
            {"name": "anthropic",
             "apiKeys": {"main": ANTHROPIC_MAIN},
             "services": [
                 {"type": "cc", "baseUrl": mock + "/anthropic",
                  "auth": {"mode": "header", "name": "x-api-key"}},
             ]},
            {"name": "dead",
             "apiKeys": {"only": DEAD_KEY},
             "services": [
                 {"type": "cx", "baseUrl": f"http://127.0.0.1:{stack.dead_port}/v1"},
             ]},
        ],
        "users": [
            {"name": "alice", "apiKey": ALICE, "providerName": "openai", "providerKeyName": "main"},
            {"name": "bob", "apiKey": BOB, "providerName": "anthropic", "providerKeyName": "main"},
            {"name": "carol", "apiKey": CAROL, "providerName": "openai", "providerKeyName": "backup"},
            {"name": "dave", "apiKey": DAVE, "providerName": "dead", "providerKeyName": "only"},
        ],
        "settings": {"headerTimeoutMs": 1500, "connectTimeoutMs": 2000, "sseKeepaliveMs": 500},
    }


def bearer(key):
    return ("Authorization", "Bearer " + key)


class GatewayChecks:
    """The checks; subclasses pick the launch form."""
    FORM = None
    SPAWN_USER = None

    @classmethod
    def setUpClass(cls):
        cls.stack = harness.Stack(cls.FORM, gateway_config, piapi_args=["--grace", "2"],
                                  spawn_user=cls.SPAWN_USER)
        cls.addClassCleanup(cls.stack.stop)
        cls.stack.start()

    def setUp(self):
        self.stack.mock.reset()

    # ---- helpers ----

    def req(self, method, path, headers=(), body=None, **kw):
        return self.stack.request(method, path, headers, body, **kw)

    def upstream(self, expect=1, timeout=2.0):
        """The requests the mock got since setUp (waits for `expect` of them)."""
        reqs = harness.wait_until(
            lambda: (lambda r: r if len(r) >= expect else None)(self.stack.mock.requests()),
            timeout)
        self.assertTrue(reqs, f"upstream got fewer than {expect} request(s)")
        return reqs

    def assert_no_member_key(self, rec):
        blob = rec["path"] + "\n" + json.dumps(rec["headers"])
        for key in MEMBER_KEYS:
            self.assertNotIn(key, blob, "member key reached the upstream (path/headers)")
            self.assertNotIn(key.encode(), rec["body"], "member key reached the upstream (body)")

    def assert_error(self, r, status, msg=""):
        ctx = f"{msg} {r!r}"
        self.assertEqual(r.status, status, ctx)
        self.assertTrue(r.header("X-Request-ID"), "error without X-Request-ID " + ctx)
        try:
            doc = r.json()
        except ValueError:
            self.fail("error body is not JSON " + ctx)
        self.assertEqual(doc.get("type"), "error", ctx)
        self.assertIsInstance(doc.get("error"), dict, ctx)
        self.assertIsInstance(doc["error"].get("type"), str, ctx)
        self.assertIsInstance(doc["error"].get("message"), str, ctx)
        for key in MEMBER_KEYS + PROVIDER_KEYS:
            self.assertNotIn(key.encode(), r.body, "key echoed in an error " + ctx)
        return doc

    # ---- 1. authentication and key injection ----

    def test_01_bearer_auth_injects_provider_bearer(self):
        r = self.req("POST", "/piapi/cx/v1/responses", [bearer(ALICE),
                     ("Content-Type", "application/json")], b'{"model":"m"}')
        self.assertEqual(r.status, 200, r)
        rec = self.upstream()[0]
        self.assertEqual(header_values(rec["headers"], "Authorization"), ["Bearer " + OPENAI_MAIN])
        self.assertEqual(header_values(rec["headers"], "x-api-key"), [])
        self.assertEqual(rec["body"], b'{"model":"m"}')
        self.assert_no_member_key(rec)

    def test_01_x_api_key_auth_injects_bare_x_api_key(self):
        r = self.req("POST", "/piapi/cc/v1/messages", [("x-api-key", BOB),
                     ("anthropic-version", "2023-06-01"), ("Content-Type", "application/json")],
                     b'{"model":"claude"}')
        self.assertEqual(r.status, 200, r)
        rec = self.upstream()[0]
        self.assertEqual(rec["path"], "/anthropic/v1/messages")
        self.assertEqual(header_values(rec["headers"], "x-api-key"), [ANTHROPIC_MAIN])
        self.assertEqual(header_values(rec["headers"], "Authorization"), [])
        self.assertEqual(header_values(rec["headers"], "anthropic-version"), ["2023-06-01"])
        self.assert_no_member_key(rec)

    def test_01_named_provider_key_is_the_users(self):
        r = self.req("GET", "/piapi/cx/v1/models", [bearer(CAROL)])
        self.assertEqual(r.status, 200, r)
        rec = self.upstream()[0]
        self.assertEqual(header_values(rec["headers"], "Authorization"), ["Bearer " + OPENAI_BACKUP])
        self.assert_no_member_key(rec)

    def test_01_query_mode_injects_api_key_param(self):
        r = self.req("GET", "/piapi/oq/v1/chat/completions?a=1&b=%20x&c=%2F", [bearer(ALICE)])
        self.assertEqual(r.status, 200, r)
        rec = self.upstream()[0]
        path, _, query = rec["path"].partition("?")
        self.assertEqual(path, "/q/v1/chat/completions")
        params = query.split("&")
        self.assertEqual(params.count("api_key=" + OPENAI_MAIN), 1, rec["path"])
        self.assertEqual([p for p in params if not p.startswith("api_key=")],
                         ["a=1", "b=%20x", "c=%2F"], rec["path"])
        self.assertEqual(header_values(rec["headers"], "Authorization"), [])
        self.assert_no_member_key(rec)

    # ---- 2. byte-exact path, query, body ----

    def test_02_path_and_query_byte_exact(self):
        r = self.req("GET", "/piapi/cx/v1/chat/completions?a=1&b=%20x&c=%2F", [bearer(ALICE)])
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.upstream()[0]["path"], "/codex/v1/chat/completions?a=1&b=%20x&c=%2F")

    def test_02_upstream_named_by_host_name(self):
        for _ in range(3):  # resolved, then from libcurl's DNS cache
            r = self.req("POST", "/piapi/ln/v1/echo", [bearer(ALICE)], b'{"x":1}')
            self.assertEqual(r.status, 200, r)
        got = self.upstream(3)
        self.assertEqual([g["path"] for g in got], ["/named/v1/echo"] * 3)
        self.assertEqual(harness.header_values(got[0]["headers"], "Host"),
                         [f"localhost:{self.stack.mock.port}"])

    def test_02_no_rest_is_base_url_path(self):
        r = self.req("GET", "/piapi/cx", [bearer(ALICE)])
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.upstream()[0]["path"], "/codex")

    def test_02_binary_body_byte_exact(self):
        body = bytes(range(256)) * 400  # 100 KiB with NUL, CR, LF, 0xff ...
        ctype = "application/x-piapi-test; charset=binary"
        r = self.req("POST", "/piapi/cx/v1/files", [bearer(ALICE), ("Content-Type", ctype)], body)
        self.assertEqual(r.status, 200, r)
        echo = r.json()
        self.assertEqual(echo["body_len"], len(body))
        self.assertEqual(echo["body_sha256"], hashlib.sha256(body).hexdigest())
        rec = self.upstream()[0]
        self.assertEqual(rec["method"], "POST")
        self.assertEqual(header_values(rec["headers"], "Content-Type"), [ctype])
        cl = header_values(rec["headers"], "Content-Length")
        if cl:
            self.assertEqual(cl, [str(len(body))])
        self.assertEqual(hashlib.sha256(rec["body"]).hexdigest(), hashlib.sha256(body).hexdigest())

    def test_02_chunked_upload(self):
        # A slow chunked upload (no Content-Length), as a streaming client sends it.
        body = big_content(50000)
        chunks = [b"%x\r\n%s\r\n" % (len(body[i:i + 10000]), body[i:i + 10000])
                  for i in range(0, len(body), 10000)] + [b"0\r\n\r\n"]
        req = build_request("POST", "/piapi/cx/v1/upload", [
            bearer(ALICE), ("Content-Type", "application/octet-stream"),
            ("Transfer-Encoding", "chunked"), ("Connection", "close")])
        ex = self.stack.raw(req, timeout=10, then=chunks, gap=0.05)
        if self.stack.front_kind == "lighttpd":
            # deploy/lighttpd enables server.stream-request-body, so lighttpd
            # itself answers 411 to a chunked upload it has not fully
            # received yet (the documented caveat)
            self.assertEqual(ex.status, 411, ex.raw[:300])
            return
        self.assertEqual(ex.status, 200, ex.raw[:500])
        rec = self.upstream()[0]
        self.assertEqual(rec["body"], body)
        te = [v.lower() for v in header_values(rec["headers"], "Transfer-Encoding")]
        cl = header_values(rec["headers"], "Content-Length")
        self.assertTrue((cl == [str(len(body))] and not te) or (te == ["chunked"] and not cl),
                        f"upstream framing: CL={cl} TE={te}")

    def test_02_big_response_intact(self):
        n = 3 * 1024 * 1024 + 17
        r = self.req("GET", f"/piapi/cx/v1/big?bytes={n}", [bearer(ALICE)], timeout=20)
        self.assertEqual(r.status, 200, r.status)
        self.assertEqual(len(r.body), n)
        self.assertEqual(hashlib.sha256(r.body).digest(), hashlib.sha256(big_content(n)).digest())

    # ---- 3. streaming ----

    def test_03_sse_streams_event_by_event(self):
        req = build_request("GET", "/piapi/cx/v1/sse?n=10&interval=0.2",
                            [bearer(ALICE), ("Accept", "text/event-stream"), ("Connection", "close")])
        ex = self.stack.raw(req, timeout=8)
        self.assertEqual(ex.status, 200, ex.raw[:500])
        self.assertIn("text/event-stream", ex.header("Content-Type") or "")
        self.assertTrue(ex.header("X-Request-ID"), "no X-Request-ID on the stream")
        times = [ex.arrival_of(b'data: {"i":%d}\n\n' % k) for k in range(10)]
        self.assertNotIn(None, times, f"missing events; body={ex.body()[:800]!r}")
        self.assertIsNotNone(ex.arrival_of(b"data: [DONE]\n\n"), "no [DONE]")
        distinct = 1 + sum(1 for a, b in zip(times, times[1:]) if b - a > 0.05)
        report = f"arrivals={[round(t, 3) for t in times]} headers_at={ex.headers_at}"
        self.assertGreaterEqual(distinct, 8, "events arrived in lumps: " + report)
        self.assertGreaterEqual(times[-1] - times[0], 1.5, report)
        self.assertLess(times[0], times[-1] - 1.0, "first event not early: " + report)
        self.assertIsNotNone(ex.headers_at)
        self.assertLess(ex.headers_at, 0.15, "headers held back until the first event: " + report)

    def test_03_client_abort_aborts_upstream(self):
        # The client reads 2 events then resets the connection while the
        # upstream is silent; piapi must drop the upstream transfer promptly.
        req = build_request("GET", "/piapi/cx/v1/stall?after=2&delay=6",
                            [bearer(ALICE), ("Connection", "close")])
        ex = self.stack.raw(req, timeout=5, close_after=(b'data: {"i":1}', 0.05), rst=True)
        self.assertEqual(ex.status, 200, ex.raw[:300])
        closed = ex.closed_wall
        events = harness.wait_until(
            lambda: [e for e in self.stack.mock.events() if e.get("event") == "client_gone"], 3.0)
        self.assertTrue(events, "upstream transfer still open 3 s after the client went away")
        self.assertLess(events[0]["t"] - closed, 2.0, events)

    def test_03_client_close_aborts_upstream(self):
        # A plain close (FIN) during upstream silence. nginx passes it on at
        # once; lighttpd only when a write to the client fails, which piapi's
        # SSE keepalive comments (sseKeepaliveMs 500 here) bring about.
        req = build_request("GET", "/piapi/cx/v1/stall?after=2&delay=6",
                            [bearer(ALICE), ("Connection", "close")])
        ex = self.stack.raw(req, timeout=5, close_after=(b'data: {"i":1}', 0.05))
        self.assertEqual(ex.status, 200, ex.raw[:300])
        events = harness.wait_until(
            lambda: [e for e in self.stack.mock.events() if e.get("event") == "client_gone"], 4.0)
        self.assertTrue(events, "upstream transfer still open 4 s after the client closed")
        bound = 1.0 if self.stack.front_kind == "nginx" else 2.5
        self.assertLess(events[0]["t"] - ex.closed_wall, bound, events)

    def test_03_sse_keepalive_comments_during_silence(self):
        req = build_request("GET", "/piapi/cx/v1/stall?after=1&delay=1.6",
                            [bearer(ALICE), ("Connection", "close")])
        ex = self.stack.raw(req, timeout=6)
        self.assertEqual(ex.status, 200, ex.raw[:300])
        body = ex.body()
        a, b = body.find(b'data: {"i":0}\n\n'), body.find(b'data: {"i":1}\n\n')
        self.assertTrue(0 <= a < b, body[:500])
        self.assertIn(b"data: [DONE]\n\n", body)
        between = body[a + len(b'data: {"i":0}\n\n'):b]
        # only whole comment events, at event boundaries
        self.assertRegex(between, rb"^(:[^\n]*\n\n)+$", f"silence carried {between!r}")
        self.assertGreaterEqual(between.count(b"\n\n"), 2, f"too few keepalives: {between!r}")

    # ---- 4. errors and X-Request-ID ----

    def test_04_no_key_401(self):
        self.assert_error(self.req("GET", "/piapi/cx/v1/models"), 401, "no key")
        self.assertEqual(self.stack.mock.requests(), [])

    def test_04_unknown_key_401(self):
        self.assert_error(self.req("GET", "/piapi/cx/v1/models",
                                   [bearer("piapi-user-nobody-000")]), 401, "unknown bearer")
        self.assert_error(self.req("GET", "/piapi/cc/v1/models",
                                   [("x-api-key", "piapi-user-nobody-000")]), 401, "unknown x-api-key")
        self.assertEqual(self.stack.mock.requests(), [])

    def test_04_service_not_offered_404(self):
        self.assert_error(self.req("POST", "/piapi/cc/v1/messages", [bearer(CAROL)], b"{}"),
                          404, "carol on cc")
        self.assertEqual(self.stack.mock.requests(), [])

    def test_04_upstream_unreachable_502(self):
        r = self.req("GET", "/piapi/cx/v1/models", [bearer(DAVE)])
        self.assert_error(r, 502, "closed upstream port")
        rid = r.header("X-Request-ID")
        line = self.stack.wait_log(lambda l: l.get("request_id") == rid and "status" in l)
        self.assertIsNotNone(line, "no log line for " + rid)
        self.assertEqual(line.get("error"), "connect", line)
        # libcurl's words, for the operator: which address failed, and how
        self.assertIn(f"port {self.stack.dead_port}", line.get("error_detail", ""), line)

    def test_04_upstream_reset_or_garbage_502(self):
        for what in ("reset", "garbage"):
            self.assert_error(self.req("GET", f"/piapi/cx/v1/{what}", [bearer(ALICE)]), 502, what)

    def test_04_upstream_slow_headers_504(self):
        t = time.monotonic()
        r = self.req("GET", "/piapi/cx/v1/slow-headers?delay=4", [bearer(ALICE)], timeout=8)
        self.assert_error(r, 504, "headerTimeoutMs 1500")
        self.assertLess(time.monotonic() - t, 3.5)

    def test_04_upstream_truncated_body_looks_truncated(self):
        # close-mid: the upstream promises 1000 bytes, sends 100 and closes.
        # The head is already out, so the client connection must be cut: not
        # ended cleanly (chunked terminator), not left hanging.
        req = build_request("GET", "/piapi/cx/v1/close-mid", [bearer(ALICE)])  # keep-alive
        ex = self.stack.raw(req, timeout=4)
        if ex.status is None or ex.status >= 500:
            # the front end got head, body and the broken end in one read and
            # answered nothing (or an error) instead: also visibly broken
            self.assertTrue(ex.closed or ex.status, f"no answer, connection left open: {ex.raw!r}")
            return
        self.assertEqual(ex.status, 200, ex.raw[:300])
        body_raw = ex.raw[ex.head_end:]
        te = (ex.header("Transfer-Encoding") or "").lower()
        cl = ex.header("Content-Length")
        if te == "chunked":
            complete = body_raw.endswith(b"0\r\n\r\n")
        elif cl is not None:
            complete = len(body_raw) >= int(cl)
        else:
            complete = True  # close-delimited: indistinguishable from a full answer
        self.assertFalse(complete, f"truncated answer relayed as complete: {ex.raw[:400]!r}")
        self.assertTrue(ex.closed, f"client left waiting on a truncated answer: {ex.raw[:400]!r}")

    def test_04_upstream_error_status_relayed(self):
        r = self.req("GET", "/piapi/cx/v1/status/429", [bearer(ALICE)])
        self.assertEqual(r.status, 429, r)
        self.assertEqual(r.json()["mock_status"], 429)
        self.assertTrue(r.header("X-Request-ID"))

    def test_04_request_id_generated_and_echoed(self):
        r = self.req("GET", "/piapi/cx/v1/models", [bearer(ALICE)])
        self.assertEqual(r.status, 200, r)
        generated = r.header("X-Request-ID")
        self.assertTrue(generated, "2xx without X-Request-ID")
        self.assertEqual(header_values(self.upstream()[0]["headers"], "X-Request-ID"), [generated])
        # the provider's own id (the mock sends req_mock_<n>) keeps a name of its own
        self.assertEqual(header_values(r.headers, "X-Request-ID"), [generated], r.headers)
        self.assertEqual(header_values(r.headers, "X-Upstream-Request-ID"), ["req_mock_0"], r.headers)
        line = self.stack.wait_log(lambda l: l.get("request_id") == generated and "status" in l)
        self.assertIsNotNone(line, "no log line for " + generated)
        self.assertEqual(line.get("upstream_request_id"), "req_mock_0", line)
        self.stack.mock.reset()
        r = self.req("GET", "/piapi/cx/v1/models", [bearer(ALICE), ("X-Request-ID", "abc-123")])
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("X-Request-ID"), "abc-123")
        self.assertEqual(header_values(self.upstream()[0]["headers"], "X-Request-ID"), ["abc-123"])

    # ---- 5. Content-Encoding ----

    def test_05_accept_encoding_not_forwarded(self):
        # Providers answer uncompressed, so piapi can read every error body
        # for secrets; the web server may compress towards the client.
        r = self.req("GET", "/piapi/cx/v1/gzip", [bearer(ALICE), ("Accept-Encoding", "gzip")])
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("Content-Encoding"), r.headers)
        self.assertEqual(r.body.decode(), GZIP_TEXT)
        self.assertEqual(header_values(self.upstream()[0]["headers"], "Accept-Encoding"), [])

    def test_05_gzip_passthrough(self):
        # an answer the provider compressed on its own still passes untouched
        r = self.req("GET", "/piapi/cx/v1/key-echo?enc=gzip&status=200", [bearer(ALICE)])
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("Content-Encoding"), "gzip", r.headers)
        self.assertEqual(r.body[:2], b"\x1f\x8b", "body is not raw gzip")
        self.assertIn(b'"message": "bad key ', gzip.decompress(r.body))

    def test_05_identity_when_not_accepted(self):
        r = self.req("GET", "/piapi/cx/v1/gzip", [bearer(ALICE)])
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("Content-Encoding"))
        self.assertEqual(r.body.decode(), GZIP_TEXT)

    # ---- 6. local endpoints ----

    def test_06_healthz(self):
        r = self.req("GET", "/healthz")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.body.strip(), b"ok")

    def test_06_metrics(self):
        self.req("GET", "/piapi/cx/v1/models", [bearer(ALICE)])
        r = self.req("GET", "/metrics")
        self.assertEqual(r.status, 200, r)
        text = r.body.decode()
        self.assertIn("piapi_requests_total", text)
        self.assertIn("piapi_request_latency_seconds", text)
        for key in MEMBER_KEYS + PROVIDER_KEYS:
            self.assertNotIn(key, text)

    def test_06_metrics_denied_to_non_local(self):
        # 127.0.0.2 is loopback but not 127.0.0.1: the deploy configs deny it
        self.assertEqual(self.req("GET", "/metrics", source="127.0.0.2").status, 403)
        self.assertEqual(self.req("GET", "/healthz", source="127.0.0.2").status, 200)

    # ---- 7. header policy ----

    def test_07_hop_by_hop_host_and_client_keys_dropped(self):
        r = self.req("POST", "/piapi/cx/v1/chat/completions", [
            bearer(ALICE),
            ("Connection", "keep-alive, X-Foo"), ("X-Foo", "conn-listed"),
            ("TE", "trailers"), ("Proxy-Authorization", "x"), ("Keep-Alive", "1"),
            ("X-Custom", "1"), ("Content-Type", "application/json")], b"{}")
        self.assertEqual(r.status, 200, r)
        rec = self.upstream()[0]
        names = {k.lower() for k, _ in rec["headers"]}
        for h in ("connection", "te", "proxy-authorization", "keep-alive", "x-foo",
                  "x-api-key", "upgrade", "proxy-connection"):
            self.assertNotIn(h, names, f"{h} reached the upstream: {rec['headers']}")
        self.assertEqual(header_values(rec["headers"], "X-Custom"), ["1"])
        self.assertEqual(header_values(rec["headers"], "Host"),
                         [f"127.0.0.1:{self.stack.mock.port}"])
        self.assert_no_member_key(rec)

    # ---- 8. the JSON log ----

    def test_08_log_line_per_request_without_secrets(self):
        rid = f"log-check-{self.FORM}"
        r = self.req("GET", "/piapi/cx/v1/models", [bearer(ALICE), ("X-Request-ID", rid)])
        self.assertEqual(r.status, 200, r)
        rec = self.stack.wait_log(lambda l: l.get("request_id") == rid and "status" in l)
        self.assertTrue(rec, "no log line with request_id " + rid +
                        "\n" + self.stack.piapi_log_text()[-2000:])
        for field in ("ts", "level", "msg", "user", "service_type", "upstream_provider",
                      "upstream_key", "method", "path", "status", "latency_ms"):
            self.assertIn(field, rec, rec)
        self.assertEqual(rec["user"], "alice")
        self.assertEqual(rec["service_type"], "cx")
        self.assertEqual(rec["upstream_provider"], "openai")
        self.assertEqual(rec["upstream_key"], "main")
        self.assertEqual(rec["status"], 200)
        text = self.stack.piapi_log_text()
        for key in MEMBER_KEYS + PROVIDER_KEYS:
            self.assertNotIn(key, text, "a key value appears in the log")


class TestNginx(GatewayChecks, unittest.TestCase):
    FORM = "nginx"


class TestLighttpdSocket(GatewayChecks, unittest.TestCase):
    FORM = "lighttpd-socket"


class TestLighttpdBinPath(GatewayChecks, unittest.TestCase):
    FORM = "lighttpd-binpath"


class TestSpawnFcgi(GatewayChecks, unittest.TestCase):
    FORM = "spawn-fcgi"


class TestSpawnFcgiServiceUser(GatewayChecks, unittest.TestCase):
    """The documented production form: piapi runs as an unprivileged user,
    the socket is 0660 group www-data, and nginx's workers reach it."""
    FORM = "spawn-fcgi"
    SPAWN_USER = "nobody"

    def test_00_piapi_runs_as_the_service_user(self):
        status = Path(f"/proc/{self.stack.piapi.pid}/status").read_text()
        uid = next(l for l in status.splitlines() if l.startswith("Uid:")).split()[1]
        self.assertEqual(int(uid), pwd.getpwnam("nobody").pw_uid)
        st = os.stat(self.stack.socket_path)
        self.assertEqual(st.st_mode & 0o777, 0o660)
        self.assertEqual(grp.getgrgid(st.st_gid).gr_name, "www-data")


if __name__ == "__main__":
    unittest.main(verbosity=2)
