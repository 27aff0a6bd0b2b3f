"""What piapi relays back to the client, behind nginx and lighttpd:

- the provider key never comes back: not in a redirect that keeps the query
  (Location and its kin), not in another header, not in an error body that
  echoes it; in no spelling a URL could carry (raw, %XX in either case,
  twice encoded);
- every Connection header line names hop-by-hop headers (nginx passes two
  lines separately, lighttpd joins them);
- behind lighttpd, which never tells piapi that a client left, a client that
  closes during upstream silence is noticed within 2 s with the default
  settings, and nothing extra goes through nginx."""
import json
import re
import time
import unittest
import urllib.parse

import harness

ALICE = "piapi-user-alice-Rp3vN8qW1z"     # query-mode provider
BOB = "piapi-user-bob-Ty6uJ2kM9x"         # header-mode (Bearer) provider
# A key with bytes libcurl escapes when it puts it into the query.
QUERY_KEY = "sk-q+Key/9=&x~Zz-41c7"
HEADER_KEY = "sk-head-Xy12-7b3e9"


def config(settings=None):
    def build(stack):
        mock = f"http://127.0.0.1:{stack.mock.port}"
        cfg = {
            "providers": [
                {"name": "qp", "apiKeys": {"main": QUERY_KEY},
                 "services": [{"type": "oq", "baseUrl": mock + "/q",
                               "auth": {"mode": "query", "name": "api_key"}}]},
                {"name": "hp", "apiKeys": {"main": HEADER_KEY},
                 "services": [{"type": "cx", "baseUrl": mock + "/v1"}]},
            ],
            "users": [
                {"name": "alice", "apiKey": ALICE, "providerName": "qp", "providerKeyName": "main"},
                {"name": "bob", "apiKey": BOB, "providerName": "hp", "providerKeyName": "main"},
            ],
        }
        if settings is not None:
            cfg["settings"] = settings
        return cfg
    return build


def get(path, key, extra=()):
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {key}",
             *extra, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def spellings(key):
    """The key as a URL or a body may carry it."""
    enc = urllib.parse.quote(key, safe="")
    return {key, enc, enc.lower(), urllib.parse.quote_plus(key), urllib.parse.quote(key),
            urllib.parse.quote(enc, safe="")}


class LeakChecks:
    FORM = None

    @classmethod
    def setUpClass(cls):
        cls.stack = harness.Stack(cls.FORM, config(), name=f"resp-leak-{cls.FORM}")
        cls.addClassCleanup(cls.stack.stop)
        cls.stack.start()

    def assert_no_key(self, raw, key):
        text = raw.decode("latin-1")
        for form in spellings(key):
            self.assertNotIn(form, text, f"{form!r} reached the client")
        # any mix of %XX cases, once or twice encoded
        decoded = urllib.parse.unquote(urllib.parse.unquote(text))
        self.assertNotIn(key, decoded)

    def fetch(self, path, key):
        ex = self.stack.raw(get(path, key), timeout=10)
        self.assertTrue(ex.closed, ex.raw[-300:])
        self.assertIsNotNone(ex.status, ex.raw[:300])
        return ex

    def assert_length_right(self, ex):
        cl = ex.header("Content-Length")
        if cl is not None:
            self.assertEqual(int(cl), len(ex.body()), ex.raw[:600])

    def test_redirect_keeping_the_query(self):
        for enc in ("upper", "lower", "raw"):
            with self.subTest(enc=enc):
                ex = self.fetch(f"/piapi/oq/dir/redirect?enc={enc}&page=2", ALICE)
                self.assertEqual(ex.status, 301, ex.raw[:600])
                self.assert_no_key(ex.raw, QUERY_KEY)
                loc = urllib.parse.urlsplit(ex.header("Location"))
                self.assertEqual(loc.path, "/q/dir/redirect/")
                q = urllib.parse.parse_qs(loc.query)
                self.assertEqual(q.get("api_key"), ["REDACTED"], ex.header("Location"))
                self.assertEqual(q.get("page"), ["2"])
                for name in ("Content-Location", "Link", "Refresh"):
                    self.assertIn("api_key=REDACTED", ex.header(name) or "", name)
                self.assertIsNone(ex.header("X-Debug-Query"))
                self.assertIn(b"The document has moved", ex.body())
                self.assert_length_right(ex)
        # the mock did get the key: the redaction is piapi's
        sent = [r["path"] for r in self.stack.mock.requests()]
        self.assertTrue(any("api_key=" + urllib.parse.quote(QUERY_KEY, safe="") in p for p in sent),
                        sent)

    def test_error_body_echoing_the_key(self):
        for key, svc in ((ALICE, "oq"), (BOB, "cx")):
            provider_key = QUERY_KEY if svc == "oq" else HEADER_KEY
            for chunked in ("0", "1"):
                with self.subTest(svc=svc, chunked=chunked):
                    ex = self.fetch(f"/piapi/{svc}/key-error?chunked={chunked}", key)
                    self.assertEqual(ex.status, 401, ex.raw[:600])
                    self.assert_no_key(ex.raw, provider_key)
                    err = json.loads(ex.body())
                    self.assertIn("Incorrect API key provided: REDACTED", err["error"]["message"])
                    self.assertEqual(err["error"]["message"].count("REDACTED"), 3, err)
                    self.assert_length_right(ex)

    def test_normal_answers_untouched(self):
        ex = self.fetch("/piapi/cx/sse?n=3&interval=0.05", BOB)
        self.assertEqual(ex.status, 200)
        self.assertEqual(re.findall(rb"data: [^\n]*", ex.body()),
                         [b'data: {"i":0}', b'data: {"i":1}', b'data: {"i":2}', b"data: [DONE]"])
        ex = self.fetch("/piapi/cx/status/404", BOB)
        self.assertEqual(ex.status, 404)
        self.assertEqual(json.loads(ex.body())["mock_status"], 404)
        self.assert_length_right(ex)


class TestLeakNginx(LeakChecks, unittest.TestCase):
    FORM = "nginx"


class TestLeakLighttpd(LeakChecks, unittest.TestCase):
    FORM = "lighttpd-socket"


class ConnectionChecks:
    FORM = None

    @classmethod
    def setUpClass(cls):
        cls.stack = harness.Stack(cls.FORM, config(), name=f"resp-conn-{cls.FORM}")
        cls.addClassCleanup(cls.stack.stop)
        cls.stack.start()

    def test_every_connection_line(self):
        orders = (["Connection: close, X-Hop-A", "Connection: X-Hop-B"],
                  ["Connection: X-Hop-A", "Connection: close, X-Hop-B"])
        for conn in orders:
            with self.subTest(conn=conn):
                self.stack.mock.reset()
                extra = conn + ["X-Hop-A: a", "X-Hop-B: b", "X-Keep: k"]
                lines = ["GET /piapi/cx/echo HTTP/1.1", "Host: 127.0.0.1",
                         f"Authorization: Bearer {BOB}", *extra]
                ex = self.stack.raw(("\r\n".join(lines) + "\r\n\r\n").encode(), timeout=10)
                self.assertEqual(ex.status, 200, ex.raw[:400])
                reqs = self.stack.mock.requests()
                self.assertEqual(len(reqs), 1)
                names = {k.lower() for k, _ in reqs[0]["headers"]}
                self.assertIn("x-keep", names)
                self.assertNotIn("x-hop-a", names)
                self.assertNotIn("x-hop-b", names)


class TestConnectionNginx(ConnectionChecks, unittest.TestCase):
    FORM = "nginx"


class TestConnectionLighttpd(ConnectionChecks, unittest.TestCase):
    FORM = "lighttpd-socket"


STALL = "/piapi/cx/stall?after=1&delay=4"
FIRST = b'data: {"i":0}'


class TestSilentCloseLighttpd(unittest.TestCase):
    """lighttpd passes a client's close on only when a write to the client
    fails; with the shipped config and no sseKeepaliveMs of its own, piapi
    must still end the upstream transfer within 2 s of the close."""

    def stack(self, settings):
        s = harness.Stack("lighttpd-socket", config(settings), name="resp-silent-lighttpd")
        self.addCleanup(s.stop)
        s.start()
        return s

    def test_close_during_silence_reaches_the_upstream(self):
        s = self.stack(None)
        ex = s.raw(get(STALL, BOB), timeout=10, close_after=(FIRST, 0))
        self.assertIn(FIRST, ex.raw)
        closed = ex.closed_wall
        self.assertTrue(harness.wait_until(lambda: s.mock.events(), 4.0),
                        "the upstream never saw its connection close")
        gone = s.mock.events()[0]
        self.assertEqual(gone["event"], "client_gone")
        delay = gone["t"] - closed
        print(f"\n  lighttpd: upstream closed {delay * 1000:.0f} ms after the client")
        self.assertLess(delay, 2.0)

    def test_pings_only_during_silence_and_events_intact(self):
        s = self.stack(None)
        ex = s.raw(get("/piapi/cx/stall?after=2&delay=1.6", BOB), timeout=10)
        body = ex.body()
        self.assertEqual(re.findall(rb"data: [^\n]*", body),
                         [b'data: {"i":0}', b'data: {"i":1}', b'data: {"i":2}', b"data: [DONE]"])
        # every block is either an event or a comment, never one cut by another
        blocks = [b for b in body.split(b"\n\n") if b]
        for b in blocks:
            self.assertTrue(b.startswith(b"data: ") or b == b": ping", blocks)
        pings = blocks.count(b": ping")
        self.assertGreaterEqual(pings, 1, blocks)
        self.assertLessEqual(pings, 4, blocks)
        self.assertEqual(blocks.index(b": ping"), 2, blocks)  # only in the silence

    def test_explicit_setting_is_honoured(self):
        s = self.stack({"sseKeepaliveMs": 15000})
        ex = s.raw(get("/piapi/cx/stall?after=1&delay=2", BOB), timeout=10)
        self.assertIn(b"data: [DONE]", ex.body())
        self.assertNotIn(b": ping", ex.body())


class TestSilenceNginx(unittest.TestCase):
    """nginx closes the FastCGI connection the moment the client leaves:
    nothing extra goes to its clients during silence."""

    def test_no_extra_pings(self):
        s = harness.Stack("nginx", config(), name="resp-silent-nginx")
        self.addCleanup(s.stop)
        s.start()
        ex = s.raw(get(STALL, BOB), timeout=10)
        self.assertIn(b"data: [DONE]", ex.body())
        self.assertNotIn(b": ping", ex.body())
        # and a close during the silence is noticed at once
        s.mock.reset()
        ex = s.raw(get(STALL, BOB), timeout=10, close_after=(FIRST, 0))
        self.assertTrue(harness.wait_until(lambda: s.mock.events(), 4.0))
        self.assertLess(s.mock.events()[0]["t"] - ex.closed_wall, 1.0)


# ---- every error body scanned, whatever its size, framing or encoding ----

CAROL = "piapi-user-carol-Wq4eZ7rT2y"     # the long file: key
DAVE = "piapi-user-dave-Hs5kP1xV8n"       # services with baseUrl credentials
LONG_KEY = "k" * 8000
FN_CODE = "FNSECRET12345"
BASIC_USER, BASIC_PASS = "basicuser", "BASICPASS999"
WITHHELD = {"type": "error", "error": {
    "type": "upstream_error",
    "message": "upstream error body withheld: compressed, so it could not be checked for secrets"}}


def scan_config(stack):
    mock_port = stack.mock.port
    key_file = stack.tmp / "long.key"
    key_file.write_text(LONG_KEY + "\n")
    key_file.chmod(0o600)
    cfg = config()(stack)
    cfg["providers"] += [
        {"name": "lp", "apiKeys": {"main": f"file:{key_file}"},
         "services": [{"type": "lk", "baseUrl": f"http://127.0.0.1:{mock_port}/v1"}]},
        {"name": "bp", "apiKeys": {"main": "sk-base-Pq7wE3"},
         "services": [
             {"type": "fn", "baseUrl": f"http://127.0.0.1:{mock_port}/fn?code={FN_CODE}",
              "auth": {"mode": "header", "name": "x-functions-key"}},
             {"type": "ui", "baseUrl": f"http://{BASIC_USER}:{BASIC_PASS}@127.0.0.1:{mock_port}/ui",
              "auth": {"mode": "header", "name": "x-api-key"}}]},
    ]
    cfg["users"] += [
        {"name": "carol", "apiKey": CAROL, "providerName": "lp", "providerKeyName": "main"},
        {"name": "dave", "apiKey": DAVE, "providerName": "bp", "providerKeyName": "main"},
    ]
    return cfg


class ScanChecks:
    FORM = None

    @classmethod
    def setUpClass(cls):
        cls.stack = harness.Stack(cls.FORM, scan_config, name=f"resp-scan-{cls.FORM}")
        cls.addClassCleanup(cls.stack.stop)
        cls.stack.start()

    def fetch(self, path, key=BOB, extra=()):
        ex = self.stack.raw(get(path, key, extra), timeout=15)
        self.assertTrue(ex.closed, ex.raw[-300:])
        self.assertIsNotNone(ex.status, ex.raw[:300])
        return ex

    def assert_scanned(self, ex, key=HEADER_KEY, status=401):
        self.assertEqual(ex.status, status, ex.raw[:400])
        body = ex.body()
        for form in spellings(key):
            self.assertNotIn(form.encode(), ex.raw)
        self.assertIn(b"bad key REDACTED", body, body[-300:])
        cl = ex.header("Content-Length")
        if cl is not None:
            self.assertEqual(int(cl), len(body), ex.raw[:600])
        return body

    def test_long_key_on_a_pool_thread(self):
        """An 8,000-byte key echoed in a 401: the matcher must not recurse per
        key byte (a pool thread, which runs a transfer with a body over
        8 MiB, has a 512 KiB stack)."""
        ex = self.fetch("/piapi/lk/key-echo", CAROL)
        self.assert_scanned(ex, LONG_KEY)
        big = b"x" * (9 << 20)
        req = harness.build_request("POST", "/piapi/lk/key-echo",
                                    [("Authorization", "Bearer " + CAROL),
                                     ("Content-Type", "application/json"), ("Connection", "close")],
                                    body=big)
        ex = self.stack.raw(req, timeout=60)
        self.assert_scanned(ex, LONG_KEY)
        self.assertEqual(self.stack.request("GET", "/healthz").status, 200)

    def test_error_body_over_64k(self):
        # Content-Length over 64 KiB; chunked with the key across the point
        # where the held part outgrows 64 KiB (66,000 for 1,000-byte chunks;
        # the key starts 31 bytes after the padding) or later
        cases = [(0, 70000), (0, 65536 - 28), (1000, 66000 - 36), (1000, 66000 - 31 - 12),
                 (1000, 200000), (65536, 65536 - 28)]
        for chunk, pad in cases:
            with self.subTest(chunk=chunk, pad=pad):
                ex = self.fetch(f"/piapi/cx/key-echo?pad={pad}&chunk={chunk}")
                body = self.assert_scanned(ex)
                self.assertTrue(body.startswith(b"y" * pad))

    def test_accept_encoding_not_forwarded(self):
        self.stack.mock.reset()
        ex = self.fetch("/piapi/cx/key-echo?enc=auto", extra=["Accept-Encoding: gzip"])
        self.assertIsNone(ex.header("Content-Encoding"))
        self.assert_scanned(ex)
        reqs = self.stack.mock.requests()
        self.assertEqual(harness.header_values(reqs[-1]["headers"], "Accept-Encoding"), [])

    def test_compressed_error_withheld(self):
        for status in (401, 500, 302):
            with self.subTest(status=status):
                ex = self.fetch(f"/piapi/cx/key-echo?enc=gzip&status={status}")
                self.assertEqual(ex.status, status, ex.raw[:400])
                self.assertIsNone(ex.header("Content-Encoding"))
                self.assertEqual(ex.header("Content-Type"), "application/json")
                self.assertEqual(json.loads(ex.body()), WITHHELD)

    def test_framing_never_skips_the_scan(self):
        for q in ("cl=tab", "cl=zeros", "cl=comma", "enc=identity", "enc=empty",
                  "ctype=text/event-streamX", "ctype=text/event-stream-json"):
            with self.subTest(q=q):
                self.assert_scanned(self.fetch(f"/piapi/cx/key-echo?{q}"))

    def test_baseurl_credentials(self):
        import base64
        basic = base64.b64encode(f"{BASIC_USER}:{BASIC_PASS}".encode())
        for path in ("/piapi/fn/redirect?x=1", "/piapi/fn/key-echo?x=1",
                     "/piapi/ui/redirect", "/piapi/ui/key-echo"):
            with self.subTest(path=path):
                ex = self.fetch(path, DAVE)
                self.assertIn(ex.status, (301, 401), ex.raw[:400])
                for secret in (FN_CODE.encode(), BASIC_PASS.encode(), basic):
                    self.assertNotIn(secret, ex.raw)
                if "fn/redirect" in path:
                    self.assertIn("code=REDACTED", ex.header("Location"))
                    self.assertIn("x=1", ex.header("Location"))
        # the upstream did get them: the redaction is piapi's
        sent = self.stack.mock.requests()
        self.assertTrue(any(FN_CODE in r["path"] for r in sent))

    def test_bare_cr_header_dropped(self):
        ex = self.fetch("/piapi/cx/key-echo?hdr=barecr&status=404")
        self.assert_scanned(ex, status=404)
        names = {k.lower() for k, _ in ex.headers}
        self.assertNotIn("x-accel-redirect", names)
        self.assertNotIn("x-foo", names)
        self.assertNotIn(b"piapi_", ex.body())


class TestScanNginx(ScanChecks, unittest.TestCase):
    FORM = "nginx"


class TestScanLighttpd(ScanChecks, unittest.TestCase):
    FORM = "lighttpd-socket"
