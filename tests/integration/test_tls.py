"""piapi against an HTTPS upstream, as every real provider is: the mock
serves TLS with a certificate from a throw-away CA that piapi trusts through
settings.caFile. The event loop drives libcurl's TLS connections like plain
ones; these checks show the bytes, the keys, the streaming, the connection
reuse and the certificate check all hold across TLS."""
import hashlib
import json
import os
import unittest

import harness
from mock_upstream import ANSWER, big_content

MEMBER = "piapi-user-alice-Tl5sUp7Kq2"
PROVIDER_KEY = "sk-openai-tls-9c4e1a7b3d"


def tls_config(stack):
    port = stack.mock.port
    return {
        "providers": [
            {"name": "openai",
             "apiKeys": {"main": PROVIDER_KEY},
             "services": [
                 {"type": "cx", "baseUrl": f"https://127.0.0.1:{port}/v1"},
                 # the certificate names 127.0.0.1 only
                 {"type": "ln", "baseUrl": f"https://localhost:{port}/v1"},
             ]},
        ],
        "users": [
            {"name": "alice", "apiKey": MEMBER, "providerName": "openai",
             "providerKeyName": "main"},
        ],
        "settings": {"caFile": str(stack.tls["ca"]), "headerTimeoutMs": 3000},
    }


def bearer(key):
    return ("Authorization", "Bearer " + key)


class TestTlsUpstream(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.stack = harness.Stack("nginx", tls_config, name="tls", mock_tls=True)
        cls.addClassCleanup(cls.stack.stop)
        cls.stack.start()

    def setUp(self):
        self.stack.mock.reset()

    def req(self, method, path, body=None, headers=(), **kw):
        return self.stack.request(method, path, [bearer(MEMBER), *headers], body, **kw)

    def test_request_and_answer_cross_tls_with_the_provider_key(self):
        body = json.dumps({"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]})
        r = self.req("POST", "/piapi/cx/chat/completions", body.encode(),
                     [("Content-Type", "application/json")])
        self.assertEqual(r.status, 200, r.body[:300])
        self.assertIn(ANSWER, r.json()["choices"][0]["message"]["content"])
        (got,) = self.stack.mock.requests()
        self.assertEqual(got["path"], "/v1/chat/completions")
        self.assertEqual(harness.header_values(got["headers"], "Authorization"),
                         ["Bearer " + PROVIDER_KEY])
        self.assertEqual(got["body"], body.encode())
        wire = json.dumps(got["headers"]).encode() + got["body"]
        self.assertNotIn(MEMBER.encode(), wire, "member key reached the upstream")

    def test_tls_connection_is_reused(self):
        for i in range(20):
            r = self.req("POST", "/piapi/cx/echo", b'{"i":%d}' % i)
            self.assertEqual(r.status, 200, r.body[:300])
        stats = self.stack.mock.stats()
        print(f"\n  20 requests over TLS: {stats['connections']} new upstream connection(s)")
        self.assertEqual(stats["requests"], 20)
        self.assertLessEqual(stats["connections"], 1, stats)

    def test_sse_over_tls_arrives_event_by_event(self):
        req = harness.build_request("GET", "/piapi/cx/sse?n=8&interval=0.15",
                                    [bearer(MEMBER), ("Connection", "close")])
        ex = self.stack.raw(req, timeout=8)
        self.assertEqual(ex.status, 200, ex.raw[:500])
        times = [ex.arrival_of(b'data: {"i":%d}\n\n' % k) for k in range(8)]
        self.assertNotIn(None, times, f"missing events; body={ex.body()[:800]!r}")
        self.assertIsNotNone(ex.arrival_of(b"data: [DONE]\n\n"), "no [DONE]")
        self.assertTrue(ex.raw.endswith(b"0\r\n\r\n"), "stream not ended cleanly")
        report = f"arrivals={[round(t, 3) for t in times]}"
        distinct = 1 + sum(1 for a, b in zip(times, times[1:]) if b - a > 0.05)
        self.assertGreaterEqual(distinct, 7, "events arrived in lumps: " + report)

    def test_large_answer_and_large_body_intact(self):
        # TLS records hold data that epoll does not see: an answer several
        # times libcurl's buffer must still arrive whole and at once.
        n = 3_000_000
        r = self.req("GET", f"/piapi/cx/big?bytes={n}", timeout=20)
        self.assertEqual(r.status, 200)
        self.assertEqual(len(r.body), n)
        self.assertEqual(hashlib.sha256(r.body).digest(), hashlib.sha256(big_content(n)).digest())
        body = os.urandom(300_000)
        r = self.req("POST", "/piapi/cx/echo", body, [("Content-Type", "application/octet-stream")])
        self.assertEqual(r.status, 200, r.body[:300])
        self.assertEqual(r.json()["body_sha256"], hashlib.sha256(body).hexdigest())

    def test_certificate_name_is_checked(self):
        r = self.req("GET", "/piapi/ln/echo")
        self.assertEqual(r.status, 502, r.body[:300])
        self.assertEqual(r.json()["error"]["message"], "upstream TLS failure")
        self.assertEqual(self.stack.mock.requests(), [], "request sent over an unverified connection")
        line = self.stack.wait_log(lambda l: l.get("path") == "/piapi/ln/echo" and "status" in l)
        self.assertIsNotNone(line, "no log line for the refused upstream")
        self.assertEqual(line.get("error"), "tls", line)
        self.assertIn("localhost", line.get("error_detail", ""), line)


if __name__ == "__main__":
    unittest.main()
