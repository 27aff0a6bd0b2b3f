"""Paths and secrets in URLs, through real nginx and lighttpd: encoded
slashes reach the upstream byte-exact, a raw '#' is refused, a credential
the client sent never leaves in the query (however often encoded), the
path (refused), another header (dropped) or X-Request-ID (replaced),
whichever one authenticated, and credentials inside a baseUrl (userinfo,
query) are sent but never logged.

The dot-segment spellings piapi refuses are rows of the hostile table in
test_hardening.py; tests/unit/test_route.c has the full tables.
"""
import base64
import json
import subprocess
import tempfile
import unittest
from pathlib import Path

import harness
from harness import build_request, header_values

ALICE = "piapi-user-alice-Pt7hQ2xVn8"
PROVIDER_KEY = "sk-paths-main-Zq4Wm9Lr2T"
JUNK_BEARER = "junk-bearer-Kx81"
FN_USER, FN_PASS, FN_CODE = "fnuser", "fnPassW0rd-Jd3", "SECRETcode-Hv95"
SECRETS = (ALICE, PROVIDER_KEY, FN_PASS, FN_CODE, FN_USER + ":")


def paths_config(stack):
    mock = f"127.0.0.1:{stack.mock.port}"
    fn = f"http://{FN_USER}:{FN_PASS}@{{}}/api/fn?code={FN_CODE}"
    return {
        "providers": [{
            "name": "p", "apiKeys": {"main": PROVIDER_KEY},
            "services": [
                {"type": "cx", "baseUrl": f"http://{mock}/codex"},
                {"type": "oq", "baseUrl": f"http://{mock}/q",
                 "auth": {"mode": "query", "name": "api_key"}},
                {"type": "br", "baseUrl": f"http://{mock}/bedrock"},
                {"type": "fn", "baseUrl": fn.format(mock),
                 "auth": {"mode": "header", "name": "x-functions-key"}},
                {"type": "fd", "baseUrl": fn.format(f"127.0.0.1:{stack.dead_port}"),
                 "auth": {"mode": "header", "name": "x-functions-key"}},
            ]}],
        "users": [{"name": "alice", "apiKey": ALICE, "providerName": "p",
                   "providerKeyName": "main"}],
        "settings": {"connectTimeoutMs": 2000, "headerTimeoutMs": 5000},
    }


class PathChecks:
    FORM = None

    @classmethod
    def setUpClass(cls):
        cls.stack = harness.Stack(cls.FORM, paths_config, name=f"paths-{cls.FORM}")
        cls.addClassCleanup(cls.stack.stop)
        cls.stack.start()

    def setUp(self):
        self.stack.mock.reset()

    def raw(self, path, rid, headers=None):
        """One request over a raw socket (nothing normalises the target)."""
        hs = headers if headers is not None else [("Authorization", "Bearer " + ALICE)]
        req = build_request("GET", path, hs + [("X-Request-ID", rid), ("Connection", "close")])
        return self.stack.raw(req, timeout=6)

    def log_line(self, rid):
        line = self.stack.wait_log(lambda l: l.get("request_id") == rid and "status" in l, 3.0)
        self.assertTrue(line, f"no log line for {rid}")
        return line

    def test_encoded_slashes_reach_upstream_byte_exact(self):
        arn = ("arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Aapplication-inference-profile"
               "%2Fus.anthropic.claude-opus-4-1-20250805-v1%3A0")
        cases = [
            (f"/piapi/br/model/{arn}/invoke", f"/bedrock/model/{arn}/invoke"),
            (f"/piapi/br/model/{arn}/invoke-with-response-stream?x=1",
             f"/bedrock/model/{arn}/invoke-with-response-stream?x=1"),
            ("/piapi/cx/v1/files/a%2Fb", "/codex/v1/files/a%2Fb"),
            ("/piapi/cx/v1/files/a%2fb%2Fc", "/codex/v1/files/a%2fb%2Fc"),
            ("/piapi/cx/v1/a%5Cb%5cc", "/codex/v1/a%5Cb%5cc"),
            ("/piapi/cx/v1/a%2F.b%2F...%2Fc.d", "/codex/v1/a%2F.b%2F...%2Fc.d"),
        ]
        for i, (path, want) in enumerate(cases):
            with self.subTest(path=path):
                self.stack.mock.reset()
                rid = f"slash-{self.FORM}-{i}"
                ex = self.raw(path, rid)
                self.assertEqual(ex.status, 200, ex.raw[:300])
                got = [r["path"] for r in self.stack.mock.requests()]
                print(f"\n  {self.FORM}: {path[:60]} -> upstream {got}")
                self.assertEqual(got, [want])
                self.assertEqual(self.log_line(rid).get("path"), path.partition("?")[0])

    def test_raw_fragment_refused(self):
        # Both fronts pass a raw '#' on in REQUEST_URI (the log's path shows
        # what piapi received); libcurl would have cut the URL there.
        cases = ["/piapi/oq/v1/echo#frag", "/piapi/oq/v1/echo?a=1#frag",
                 "/piapi/oq/v1/echo?a=1#&b=2", "/piapi/cx/v1/echo#"]
        for i, path in enumerate(cases):
            with self.subTest(path=path):
                self.stack.mock.reset()
                base = self.stack.mock.stats()["accepted"]
                rid = f"frag-{self.FORM}-{i}"
                ex = self.raw(path, rid)
                self.assertEqual(ex.status, 400, ex.raw[:300])
                self.assertEqual(ex.header("X-Request-ID"), rid, "not piapi's answer")
                self.assertEqual(json.loads(ex.body())["type"], "error")
                self.assertEqual(self.stack.mock.requests(), [])
                self.assertEqual(self.stack.mock.stats()["accepted"] - base, 2,
                                 "something reached the upstream")
                line = self.log_line(rid)
                print(f"\n  {self.FORM}: sent {path!r}, REQUEST_URI path {line.get('path')!r}")
                self.assertNotIn("upstream_url", line)

    def test_member_key_in_query_dropped_whichever_credential_matched(self):
        # A junk bearer next to the valid x-api-key: the member's key (the
        # credential that authenticated) and the junk both stay home.
        rid = f"junk-bearer-{self.FORM}"
        hs = [("Authorization", "Bearer " + JUNK_BEARER), ("x-api-key", ALICE)]
        ex = self.raw(f"/piapi/cx/v1/echo?session={ALICE}&x=1&t={JUNK_BEARER}", rid, hs)
        self.assertEqual(ex.status, 200, ex.raw[:300])
        reqs = self.stack.mock.requests()
        self.assertEqual([r["path"] for r in reqs], ["/codex/v1/echo?x=1"])
        self.assertNotIn(ALICE, json.dumps(reqs[0]["headers"]))
        self.assertEqual(header_values(reqs[0]["headers"], "Authorization"),
                         ["Bearer " + PROVIDER_KEY])
        line = self.log_line(rid)
        self.assertNotIn(ALICE, json.dumps(line))
        self.assertNotIn(ALICE, self.stack.piapi_log_text())

    def test_auth_parameter_look_alikes_dropped(self):
        # Parsers differ: some match names in any case, PHP reads
        # api_key[] as an array, Python before 3.9.2 split on ';' too.
        # Only the injected api_key may reach the upstream.
        rid = f"lookalike-{self.FORM}"
        q = "?API_KEY=a&Api_Key=b&api_key[]=c&api_key%5B0%5D=d&x=1;api_key=e&+api_key+=f&y=2"
        ex = self.raw("/piapi/oq/v1/echo" + q, rid)
        self.assertEqual(ex.status, 200, ex.raw[:300])
        got = [r["path"] for r in self.stack.mock.requests()]
        self.assertEqual(got, [f"/q/v1/echo?y=2&api_key={PROVIDER_KEY}"])

    def test_auth_parameter_spellings_dropped(self):
        # Names a parser may still read as api_key once it trims blanks
        # and controls, decodes again, reads '.', ' ' or '[' as '_' (PHP)
        # or stops at a bracket; and a ';' or '&' that only decoding shows.
        rid = f"spelling-{self.FORM}"
        q = ("?api.key=d&api_key]=e&api%255fkey=f&a=1%3Bapi_key=g&api+key=h"
             "&%20api_key%20=i&x[api_key]=kept&y=2")
        ex = self.raw("/piapi/oq/v1/echo" + q, rid)
        self.assertEqual(ex.status, 200, ex.raw[:300])
        got = [r["path"] for r in self.stack.mock.requests()]
        self.assertEqual(got, [f"/q/v1/echo?x[api_key]=kept&y=2&api_key={PROVIDER_KEY}"])
        # encoded controls: lighttpd refuses them itself, nginx passes them
        for i, q in enumerate(["?%09api_key=a&y=2", "?api_key%09=b&y=2", "?api_key%0a=c&y=2",
                               "?%0d%0bapi_key%7f=d&y=2"]):
            with self.subTest(query=q):
                self.stack.mock.reset()
                ex = self.raw("/piapi/oq/v1/echo" + q, f"{rid}-{i}")
                got = [r["path"] for r in self.stack.mock.requests()]
                if self.FORM.startswith("lighttpd") and ex.status == 400:
                    self.assertIsNone(ex.header("X-Request-ID"), "expected lighttpd's answer")
                    self.assertEqual(got, [])
                    continue
                self.assertEqual(ex.status, 200, ex.raw[:300])
                self.assertEqual(got, [f"/q/v1/echo?y=2&api_key={PROVIDER_KEY}"])

    def test_member_key_decoded_twice_in_query_dropped(self):
        once = "".join("%%%02X" % ord(c) for c in ALICE)
        twice = once.replace("%", "%25")
        rid = f"twice-{self.FORM}"
        ex = self.raw(f"/piapi/cx/v1/echo?a=%2570{ALICE[1:]}&b={twice}&c=%25252570{ALICE[1:]}&x=1",
                      rid)
        self.assertEqual(ex.status, 200, ex.raw[:300])
        self.assertEqual([r["path"] for r in self.stack.mock.requests()], ["/codex/v1/echo?x=1"])
        self.assertNotIn(ALICE, json.dumps(self.log_line(rid)))

    def test_request_id_holding_a_credential_replaced(self):
        # The client's id is logged, forwarded and echoed: one that holds a
        # credential the client presented (the member key, or the junk
        # bearer next to it) is replaced by a generated one.
        cases = [
            (ALICE, [("Authorization", "Bearer " + ALICE)]),
            ("trace-" + ALICE + ":1", [("x-api-key", ALICE)]),
            ("t." + JUNK_BEARER, [("Authorization", "Bearer " + JUNK_BEARER), ("x-api-key", ALICE)]),
        ]
        for given, hs in cases:
            with self.subTest(given=given):
                self.stack.mock.reset()
                ex = self.raw("/piapi/cx/v1/echo", given, hs)
                self.assertEqual(ex.status, 200, ex.raw[:300])
                rid = ex.header("X-Request-ID")
                self.assertRegex(rid or "", r"^[0-9a-f]{32}$")
                reqs = self.stack.mock.requests()
                self.assertEqual(header_values(reqs[0]["headers"], "X-Request-ID"), [rid])
                self.assertNotIn(ALICE, json.dumps(reqs[0]["headers"]))
                line = self.log_line(rid)
                self.assertEqual(line.get("status"), 200)
        log = self.stack.piapi_log_text()
        self.assertNotIn(ALICE, log)
        self.assertNotIn(JUNK_BEARER, log)
        # an id holding none of them is kept
        ex = self.raw("/piapi/cx/v1/echo", f"keep-{self.FORM}-piapi-user")
        self.assertEqual(ex.header("X-Request-ID"), f"keep-{self.FORM}-piapi-user")

    def test_key_in_path_refused_never_logged(self):
        once = "".join("%%%02X" % ord(c) for c in ALICE)
        paths = [f"/piapi/cx/v1/{ALICE}/x", f"/piapi/cx/v1/files/k{ALICE}z?x=1",
                 f"/piapi/cx/v1/{once}", f"/piapi/cx/%2570{ALICE[1:]}",
                 f"/piapi/cx/v1/a%2F{ALICE}"]
        for i, path in enumerate(paths):
            with self.subTest(path=path):
                self.stack.mock.reset()
                base = self.stack.mock.stats()["accepted"]
                rid = f"inpath-{self.FORM}-{i}"
                ex = self.raw(path, rid)
                self.assertEqual(ex.status, 400, ex.raw[:300])
                self.assertEqual(ex.header("X-Request-ID"), rid, "not piapi's answer")
                doc = json.loads(ex.body())
                self.assertEqual(doc["error"]["message"], "request path contains your API key")
                self.assertEqual(self.stack.mock.requests(), [])
                self.assertEqual(self.stack.mock.stats()["accepted"] - base, 2,
                                 "something reached the upstream")
                line = self.log_line(rid)
                self.assertEqual(line.get("path"), "REDACTED")
        # an unknown key in the path is no member's key, but was presented
        rid = f"inpath-unknown-{self.FORM}"
        ex = self.raw(f"/piapi/cx/v1/{JUNK_BEARER}", rid, [("Authorization", "Bearer " + JUNK_BEARER)])
        self.assertEqual(ex.status, 400, ex.raw[:300])
        log = self.stack.piapi_log_text()
        self.assertNotIn(ALICE, log)
        self.assertNotIn(JUNK_BEARER, log)

    def test_headers_holding_a_credential_dropped(self):
        once = "".join("%%%02X" % ord(c) for c in ALICE)
        hs = [("Authorization", "Bearer " + JUNK_BEARER), ("x-api-key", ALICE),
              ("Cookie", f"session=1; k={ALICE}"), ("X-Forwarded-Authorization", "Bearer " + ALICE),
              ("X-Encoded", once), ("X-Junk", "j=" + JUNK_BEARER),
              ("X-Keep", "piapi-user"), ("Content-Type", "text/plain; k=" + ALICE)]
        rid = f"hdrs-{self.FORM}"
        ex = self.raw("/piapi/cx/v1/echo", rid, hs)
        self.assertEqual(ex.status, 200, ex.raw[:300])
        got = self.stack.mock.requests()[0]["headers"]
        names = {k.lower() for k, _ in got}
        for dropped in ("cookie", "x-forwarded-authorization", "x-encoded", "x-junk", "content-type"):
            self.assertNotIn(dropped, names)
        self.assertEqual(header_values(got, "X-Keep"), ["piapi-user"])
        self.assertEqual(header_values(got, "Authorization"), ["Bearer " + PROVIDER_KEY])
        self.assertNotIn(ALICE, json.dumps(got))
        self.assertNotIn(JUNK_BEARER, json.dumps(got))

    def test_base_url_credentials_sent_never_logged(self):
        rid = f"fn-{self.FORM}"
        ex = self.raw("/piapi/fn/run?x=1", rid)
        self.assertEqual(ex.status, 200, ex.raw[:300])
        reqs = self.stack.mock.requests()
        self.assertEqual([r["path"] for r in reqs], [f"/api/fn/run?code={FN_CODE}&x=1"])
        basic = base64.b64encode(f"{FN_USER}:{FN_PASS}".encode()).decode()
        self.assertEqual(header_values(reqs[0]["headers"], "Authorization"), ["Basic " + basic])
        self.assertEqual(header_values(reqs[0]["headers"], "x-functions-key"), [PROVIDER_KEY])
        line = self.log_line(rid)
        self.assertEqual(line.get("upstream_url"),
                         f"http://127.0.0.1:{self.stack.mock.port}/api/fn/run?code=REDACTED&x=1")

        # an upstream failure: libcurl's words are logged, the secrets not
        rid = f"fd-{self.FORM}"
        ex = self.raw("/piapi/fd/run", rid)
        self.assertEqual(ex.status, 502, ex.raw[:300])
        line = self.log_line(rid)
        self.assertEqual(line.get("error"), "connect", line)
        self.assertIn("upstream_url", line)

        metrics = self.stack.request("GET", "/metrics", timeout=5).body.decode()
        log = self.stack.piapi_log_text()
        for secret in SECRETS:
            self.assertNotIn(secret, log, "a secret in the piapi log")
            self.assertNotIn(secret, metrics, "a secret in /metrics")


class TestPathsNginx(PathChecks, unittest.TestCase):
    FORM = "nginx"


class TestPathsLighttpd(PathChecks, unittest.TestCase):
    FORM = "lighttpd-socket"


class TestCheckConfigSecrets(unittest.TestCase):
    """--check-config never quotes a baseUrl's credentials, not even where
    a mistake puts one in a place that is quoted."""

    def test_check_config_never_prints_base_url_secrets(self):
        text = f"""\
providers:
  - name: p
    apiKeys:
      main: {PROVIDER_KEY}
    services:
      - type: fn
        baseUrl: http://{FN_USER}:{FN_PASS}@fn.example/api?code={FN_CODE}
        auth:
          mode: header
          name: x-functions-key
users:
  - name: alice
    apiKey: {ALICE}
    providerName: p
    providerKeyName: {FN_CODE}
  - name: bob
    apiKey: piapi-user-bob-Qw3Rt6Yu9I
    providerName: {FN_PASS}
    providerKeyName: main
"""
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "config.yaml"
            path.write_text(text)
            path.chmod(0o600)
            r = subprocess.run([str(harness.piapi_bin()), "--check-config", "--config", str(path)],
                               capture_output=True, text=True, timeout=10)
        out = r.stdout + r.stderr
        print("\n" + out)
        self.assertEqual(r.returncode, 1, out)
        self.assertIn("users[0].providerKeyName", out)
        self.assertIn("users[1].providerName", out)
        for secret in SECRETS:
            self.assertNotIn(secret, out)
        self.assertIn("<redacted>", out)
