"""piapi against an HTTPS upstream, as every real provider is: the mock
serves TLS with a certificate from a throw-away CA that piapi trusts through
settings.caFile. The event loop drives libcurl's TLS connections like plain
ones; these checks show the bytes, the keys, the streaming, the connection
reuse and the certificate check all hold across TLS.

Real providers also speak HTTP/2, which libcurl negotiates by default:
TestHttp2Upstream puts a real nginx (`listen ssl http2`) in front of the
mock and checks the same over HTTP/2, including multiplexing, connections
the upstream ends (GOAWAY) under concurrent requests, and a reader that
stalls (flow control meets piapi's pause). TestEgressProxy runs piapi
with https_proxy in its environment, as a server behind an egress proxy
would: the provider's TLS goes through a CONNECT tunnel."""
import hashlib
import json
import os
import select
import socket
import subprocess
import threading
import time
import unittest

import harness
from mock_upstream import ANSWER, big_content
from test_gateway import bearer

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


class UpstreamChecks:
    """What must hold whatever carries the upstream exchange."""

    def setUp(self):
        self.stack.mock.reset()

    def req(self, method, path, body=None, headers=(), **kw):
        return self.stack.request(method, path, [bearer(MEMBER), *headers], body, **kw)

    def test_request_and_answer_cross_with_the_provider_key(self):
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

    def test_sse_arrives_event_by_event(self):
        req = harness.build_request("GET", "/piapi/cx/sse?n=8&interval=0.15",
                                    [bearer(MEMBER), ("Connection", "close")])
        ex = self.stack.raw(req, timeout=8)
        self.assertEqual(ex.status, 200, ex.raw[:500])
        times = [ex.arrival_of(b'data: {"i":%d}\n\n' % k) for k in range(8)]
        self.assertNotIn(None, times, f"missing events; body={ex.body()[:800]!r}")
        self.assertIsNotNone(ex.arrival_of(b"data: [DONE]\n\n"), "no [DONE]")
        self.assertTrue(ex.raw.endswith(b"0\r\n\r\n"), "stream not ended cleanly")
        distinct = 1 + sum(1 for a, b in zip(times, times[1:]) if b - a > 0.05)
        self.assertGreaterEqual(distinct, 7, f"events in lumps: {[round(t, 3) for t in times]}")


class TestTlsUpstream(UpstreamChecks, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.stack = harness.Stack("nginx", tls_config, name="tls", mock_tls=True)
        cls.addClassCleanup(cls.stack.stop)
        cls.stack.start()

    def test_tls_connection_is_reused(self):
        for i in range(20):
            r = self.req("POST", "/piapi/cx/echo", b'{"i":%d}' % i)
            self.assertEqual(r.status, 200, r.body[:300])
        stats = self.stack.mock.stats()
        print(f"\n  20 requests over TLS: {stats['connections']} new upstream connection(s)")
        self.assertEqual(stats["requests"], 20)
        self.assertLessEqual(stats["connections"], 1, stats)

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


# ------------------------------------------------------------ HTTP/2 ----

H2_NGINX = """\
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format h2 '$server_protocol $connection $server_port $request_uri $status';
    access_log {d}/access.log h2;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    client_max_body_size 64m;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_buffering off;
    server {{
        listen 127.0.0.1:{port} ssl http2;
        location / {{ proxy_pass http://127.0.0.1:{mock}; }}
    }}
    # Ends every connection after 3 requests (GOAWAY), as providers' edges
    # do after some number of requests or some time.
    server {{
        listen 127.0.0.1:{goaway_port} ssl http2;
        keepalive_requests 3;
        location / {{ proxy_pass http://127.0.0.1:{mock}; }}
    }}
}}
"""


def start_h2_front(stack, port, goaway_port, pki):
    """nginx serving HTTPS + HTTP/2 on port (and on goaway_port, where it
    ends each connection after 3 requests), proxying to the stack's mock."""
    d = stack.tmp / "h2"
    (d / "tmp").mkdir(parents=True)
    (d / "nginx.conf").write_text(H2_NGINX.format(d=d, port=port, goaway_port=goaway_port,
                                                  mock=stack.mock.port,
                                                  cert=pki["cert"], key=pki["key"]))
    argv = ["nginx", "-p", f"{d}/", "-c", str(d / "nginx.conf")]
    t = subprocess.run(argv + ["-t", "-q"], capture_output=True, text=True, timeout=10)
    if t.returncode != 0:
        raise harness.HarnessError(f"nginx -t (HTTP/2 front) failed:\n{t.stderr}")
    proc = harness.Proc("nginx-h2", argv + ["-g", "daemon off;"], stderr_path=d / "stderr.log")

    def listening(p):
        with socket.socket() as c:
            return c.connect_ex(("127.0.0.1", p)) == 0
    if not harness.wait_until(lambda: listening(port) and listening(goaway_port), 5.0):
        proc.stop()
        raise harness.HarnessError("HTTP/2 front did not listen")
    return proc, d / "access.log"


class TestHttp2Upstream(UpstreamChecks, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        port, goaway_port = harness.free_port(), harness.free_port()

        def config(stack):
            return {
                "providers": [{"name": "openai", "apiKeys": {"main": PROVIDER_KEY},
                               "services": [
                                   {"type": "cx", "baseUrl": f"https://127.0.0.1:{port}/v1"},
                                   {"type": "ga", "baseUrl": f"https://127.0.0.1:{goaway_port}/v1"},
                               ]}],
                "users": [{"name": "alice", "apiKey": MEMBER, "providerName": "openai",
                           "providerKeyName": "main"}],
                "settings": {"caFile": str(cls.pki["ca"]), "headerTimeoutMs": 3000,
                             "sseKeepaliveMs": 300},
            }
        cls.stack = harness.Stack("nginx", config, name="h2")
        cls.addClassCleanup(cls.stack.stop)
        cls.pki = harness.make_test_pki(cls.stack.tmp)
        cls.stack.start()
        cls.goaway_port = goaway_port
        cls.front, cls.access_log = start_h2_front(cls.stack, port, goaway_port, cls.pki)
        cls.addClassCleanup(cls.front.stop)

    def access(self):
        """(protocol, connection, port, uri, status) of every request the front saw."""
        lines = self.access_log.read_text().splitlines() if self.access_log.exists() else []
        return [tuple(l.split()) for l in lines]

    def burst(self, service, n):
        """n requests at once to service; their statuses, and the front's
        access lines for them (waited for)."""
        seen = len(self.access())
        statuses = []

        def one(i):
            r = self.req("POST", f"/piapi/{service}/echo?i={i}", b'{"i":%d}' % i, timeout=10)
            statuses.append(r.status)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        lines = harness.wait_until(lambda: (lambda a: a if len(a) >= n else None)(
            self.access()[seen:]), 2.0)
        self.assertTrue(lines, self.access()[seen:])
        return statuses, lines

    def test_requests_multiplex_over_one_http2_connection(self):
        self.assertEqual(self.req("POST", "/piapi/cx/echo", b"{}").status, 200)
        statuses, lines = self.burst("cx", 10)
        self.assertEqual(statuses, [200] * 10)
        conns = {c for _, c, *_ in lines}
        print(f"\n  10 concurrent requests: {sorted({p for p, *_ in lines})} on "
              f"{len(conns)} connection(s)")
        self.assertEqual({p for p, *_ in lines}, {"HTTP/2.0"})
        self.assertEqual(len(conns), 1, lines)

    def test_connections_the_upstream_ends_are_replaced_without_errors(self):
        conns = set()
        for _ in range(4):
            statuses, lines = self.burst("ga", 8)
            self.assertEqual(statuses, [200] * 8)
            self.assertEqual({port for _, _, port, *_ in lines}, {str(self.goaway_port)})
            conns |= {c for _, c, *_ in lines}
        print(f"\n  32 requests, connections ended after 3 requests each: "
              f"{len(conns)} upstream connections, all answered")
        self.assertGreaterEqual(len(conns), 11, "the upstream did not end connections")

    def test_stalled_reader_pauses_and_resumes_over_http2(self):
        # The answer outgrows every buffer on the way, so piapi pauses the
        # transfer (HTTP/2 flow control then holds the upstream) while other
        # requests on the same upstream connection go on; once the client
        # reads again the answer resumes and arrives intact.
        size = 24 << 20
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.connect(("127.0.0.1", self.stack.port))
        sock.sendall(harness.build_request("GET", f"/piapi/cx/big?bytes={size}",
                                           [bearer(MEMBER), ("Connection", "close")]))
        self.assertTrue(harness.wait_until(lambda: self.stack.mock.requests(), 3.0))
        time.sleep(1.0)
        slowest = 0.0
        for i in range(4):
            t = time.monotonic()
            r = self.req("POST", f"/piapi/cx/echo?during={i}", b"{}", timeout=5)
            self.assertEqual(r.status, 200, r.body[:300])
            slowest = max(slowest, time.monotonic() - t)
        print(f"\n  requests beside a stalled HTTP/2 reader: slowest {slowest * 1000:.0f} ms")
        self.assertLess(slowest, 2.0)
        head, body = harness.read_answer(sock)
        self.assertIn(b" 200 ", head.split(b"\r\n")[0], head[:200])
        self.assertEqual(len(body), size)
        self.assertEqual(hashlib.sha256(body).digest(), hashlib.sha256(big_content(size)).digest())


# ------------------------------------------------------ egress proxy ----

class ConnectProxy:
    """A minimal HTTP CONNECT proxy on 127.0.0.1. It records each request
    line and every byte it carried towards the upstream."""

    def __init__(self):
        self.sock, self.port = harness.listen_local()
        self.lock = threading.Lock()
        self.requests, self.carried = [], bytearray()
        harness.serve_connections(self.sock, self.tunnel)

    def tunnel(self, c):
        with c:
            head = harness.read_head(c)
            if head is None:
                return
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            with self.lock:
                self.requests.append(line)
            method, target = line.split(" ")[:2]
            host, _, port = target.rpartition(":")
            if method != "CONNECT":
                c.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            try:
                u = socket.create_connection((host, int(port)), timeout=5)
            except (OSError, ValueError):
                c.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            with u:
                c.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                self.pipe(c, u)

    def pipe(self, c, u):
        while True:
            r, _, _ = select.select([c, u], [], [], 30)
            if not r:
                return
            for s in r:
                try:
                    data = s.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                (u if s is c else c).sendall(data)
                if s is c:
                    with self.lock:
                        self.carried += data

    def close(self):
        self.sock.close()


class TestEgressProxy(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.proxy = ConnectProxy()
        cls.addClassCleanup(cls.proxy.close)
        env = {"https_proxy": f"http://127.0.0.1:{cls.proxy.port}", "no_proxy": "", "NO_PROXY": ""}
        cls.stack = harness.Stack("nginx", tls_config, name="proxy", mock_tls=True, piapi_env=env)
        cls.addClassCleanup(cls.stack.stop)
        cls.stack.start()

    def test_provider_tls_goes_through_one_connect_tunnel(self):
        for i in range(3):
            r = self.stack.request("POST", "/piapi/cx/echo", [bearer(MEMBER)], b'{"i":%d}' % i)
            self.assertEqual(r.status, 200, r.body[:300])
        self.assertEqual(self.proxy.requests, [f"CONNECT 127.0.0.1:{self.stack.mock.port} HTTP/1.1"])
        got = self.stack.mock.requests()
        self.assertEqual(len(got), 3)
        self.assertEqual(harness.header_values(got[0]["headers"], "Authorization"),
                         ["Bearer " + PROVIDER_KEY])
        with self.proxy.lock:
            carried = bytes(self.proxy.carried)
        self.assertGreater(len(carried), 0)
        self.assertNotIn(PROVIDER_KEY.encode(), carried, "the proxy saw the key in clear")
        self.assertNotIn(MEMBER.encode(), carried)


if __name__ == "__main__":
    unittest.main()
