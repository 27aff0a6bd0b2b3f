"""The deploy/ configs on their own: nginx and lighttpd rendered from
deploy/ in front of fcgi_stub.py (a tiny FastCGI responder standing in for
piapi), so a front-end config problem is told apart from a piapi bug."""
import hashlib
import shutil
import subprocess
import tempfile
import unittest
from pathlib import Path

import harness
from harness import build_request
from mock_upstream import big_content

STUB = harness.HERE / "fcgi_stub.py"


class StaticChecks(unittest.TestCase):
    """Config syntax, including composition with Debian's stock configs."""

    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="piapi-it-deploy-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def test_nginx_conf_and_tls_example_pass_nginx_t(self):
        d = self.tmp
        shutil.copy(harness.DEPLOY / "nginx" / "piapi.conf", d)
        shutil.copy("/etc/nginx/fastcgi_params", d)
        conf = (harness.DEPLOY / "nginx" / "nginx.conf").read_text()
        conf = conf.replace("/run/piapi-nginx.pid", f"{d}/nginx.pid")
        (d / "nginx.conf").write_text(conf)
        r = subprocess.run(["nginx", "-t", "-p", f"{d}/", "-c", d / "nginx.conf"],
                           capture_output=True, text=True, timeout=10)
        self.assertEqual(r.returncode, 0, r.stderr)
        # the TLS server, with a throwaway certificate in place of the placeholders
        if not shutil.which("openssl"):
            self.skipTest("openssl not installed")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=gateway.example.com", "-keyout", d / "k.pem",
                        "-out", d / "c.pem"], capture_output=True, check=True, timeout=30)
        tls = (harness.DEPLOY / "nginx" / "tls-server.conf.example").read_text()
        tls = tls.replace("/etc/ssl/certs/gateway.example.com.fullchain.pem", f"{d}/c.pem")
        tls = tls.replace("/etc/ssl/private/gateway.example.com.key", f"{d}/k.pem")
        (d / "tls-server.conf").write_text(tls)
        self.assertIn("# include tls-server.conf;", conf)
        (d / "nginx.conf").write_text(conf.replace("# include tls-server.conf;",
                                                   "include tls-server.conf;"))
        r = subprocess.run(["nginx", "-t", "-p", f"{d}/", "-c", d / "nginx.conf"],
                           capture_output=True, text=True, timeout=10)
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_lighttpd_snippets_compose_with_debian_stock_conf(self):
        stock = Path("/etc/lighttpd/lighttpd.conf")
        if not stock.exists():
            self.skipTest("no Debian stock lighttpd.conf")
        for name in ("piapi-socket.conf", "piapi-bin-path.conf"):
            snippet = self.tmp / name
            shutil.copy(harness.DEPLOY / "lighttpd" / name, snippet)
            conf = stock.read_text() + f'\ninclude "{snippet}"\n'
            (self.tmp / "lighttpd.conf").write_text(conf)
            r = subprocess.run(["lighttpd", "-tt", "-f", self.tmp / "lighttpd.conf"],
                               capture_output=True, text=True, timeout=10)
            self.assertEqual(r.returncode, 0, f"{name}: {r.stdout}{r.stderr}")


class DeployChecks:
    FORM = None

    @classmethod
    def setUpClass(cls):
        cls.stack = harness.Stack(cls.FORM, {"stub": True}, piapi_bin_path=STUB,
                                  name=f"deploy-{cls.FORM}")
        cls.addClassCleanup(cls.stack.stop)
        cls.stack.start()

    def params(self, path, headers=(), body=None, method="GET"):
        r = self.stack.request(method, path, headers, body)
        self.assertEqual(r.status, 200, r)
        return r.json()

    def test_request_uri_raw_and_key_headers_passed(self):
        uri = "/piapi/cx/v1/a%2Fb/c%7e%20d?a=1&b=%20x&c=%2F&d=%7e"
        doc = self.params(uri, [("Authorization", "Bearer k1"), ("x-api-key", "k2")])
        p = doc["params"]
        self.assertEqual(p["REQUEST_URI"], uri)
        self.assertEqual(p["HTTP_AUTHORIZATION"], "Bearer k1")
        self.assertEqual(p["HTTP_X_API_KEY"], "k2")

    def test_healthz_and_metrics_routed(self):
        self.assertEqual(self.stack.request("GET", "/healthz").body.strip(), b"ok")
        self.assertEqual(self.params("/metrics")["params"]["REQUEST_URI"], "/metrics")

    def test_metrics_local_only(self):
        self.assertEqual(self.stack.request("GET", "/metrics", source="127.0.0.2").status, 403)
        self.assertEqual(self.stack.request("GET", "/healthz", source="127.0.0.2").status, 200)

    def test_outside_base_path_not_routed(self):
        r = self.stack.request("GET", "/piapix/cx")
        self.assertEqual(r.status, 404, r)

    def test_response_streamed(self):
        ex = self.stack.raw(build_request("GET", "/piapi/cx/sse?n=5&interval=0.2",
                                          [("Connection", "close")]), timeout=5)
        times = [ex.arrival_of(b'data: {"i":%d}' % k) for k in range(5)]
        self.assertNotIn(None, times, ex.raw[:300])
        self.assertLess(ex.headers_at, 0.15)
        self.assertGreater(times[-1] - times[0], 0.6, times)
        self.assertLess(times[0], 0.35, times)

    def test_big_body_accepted(self):
        body = big_content(20 * 1024 * 1024)  # under client_max_body_size 32m
        doc = self.params("/piapi/cx/v1/up", [("Content-Type", "application/octet-stream")],
                          body, method="POST")
        self.assertEqual(doc["body_len"], len(body))
        self.assertEqual(doc["body_sha256"], hashlib.sha256(body).hexdigest())
        self.assertEqual(doc["params"]["CONTENT_LENGTH"], str(len(body)))

    def test_cut_stream_recipe_cuts_the_client(self):
        # How a responder makes a cut answer look cut on both servers: bytes
        # outside any record AND closing without FCGI_END_REQUEST. (nginx needs
        # the junk, lighttpd ignores junk and needs the missing END_REQUEST.)
        ex = self.stack.raw(build_request("GET", "/piapi/cx/cut-both"), timeout=3)
        self.assertEqual(ex.status, 200, ex.raw[:200])
        self.assertTrue(ex.closed, f"client connection not cut: {ex.raw[-40:]!r}")
        self.assertFalse(ex.raw.endswith(b"0\r\n\r\n"), "clean chunked end")


class TestDeployNginx(DeployChecks, unittest.TestCase):
    FORM = "nginx"


class TestDeployLighttpdSocket(DeployChecks, unittest.TestCase):
    FORM = "lighttpd-socket"


class TestDeployLighttpdBinPath(DeployChecks, unittest.TestCase):
    FORM = "lighttpd-binpath"


class TestDeploySpawnFcgi(DeployChecks, unittest.TestCase):
    FORM = "spawn-fcgi"


if __name__ == "__main__":
    unittest.main(verbosity=2)
