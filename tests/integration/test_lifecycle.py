"""piapi's process life: --check-config, SIGTERM (idle and mid-stream),
lighttpd bin-path shutdown, a live socket not stolen, config hot reload."""
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import unittest
from pathlib import Path
from types import SimpleNamespace

import harness
from harness import build_request
from test_gateway import ALICE, gateway_config, bearer

EVE = "piapi-user-eve-Lm3nB7vC0x"


def reload_config(path, cfg):
    """Replace the config the way editors and deploy tools do: write a temp
    file next to it, then rename over it."""
    tmp = Path(path).with_name(".config.yaml.tmp")
    harness.write_config(tmp, cfg)
    os.rename(tmp, path)


class TestPiapiProcess(unittest.TestCase):
    """piapi alone, no front end."""

    def setUp(self):
        if not harness.piapi_bin().exists():
            self.fail(f"piapi binary not found: {harness.piapi_bin()}")
        self.tmp = Path(tempfile.mkdtemp(prefix="piapi-it-proc-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.procs = []
        self.addCleanup(lambda: [p.stop(timeout=2) for p in self.procs])
        self.cfg = self.tmp / "config.yaml"
        # no upstream needed: nothing here is proxied
        ports = SimpleNamespace(mock=SimpleNamespace(port=harness.closed_port()),
                                dead_port=harness.closed_port())
        harness.write_config(self.cfg, gateway_config(ports))

    def start(self, sock, name="piapi"):
        p = harness.Proc(name, [harness.piapi_bin(), "--config", self.cfg, "--socket", sock,
                                "--socket-mode", "0666", "--grace", "2"],
                         stderr_path=self.tmp / f"{name}.stderr")
        self.procs.append(p)
        return p

    def test_check_config(self):
        r = subprocess.run([harness.piapi_bin(), "--check-config", "--config", self.cfg],
                           capture_output=True, text=True, timeout=10)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        text = self.cfg.read_text().replace('providerKeyName: "backup"', 'providerKeyName: "nope"')
        bad = self.tmp / "bad.yaml"
        harness.write_config(bad, text)
        r = subprocess.run([harness.piapi_bin(), "--check-config", "--config", bad],
                           capture_output=True, text=True, timeout=10)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("users[2].providerKeyName", r.stdout + r.stderr)
        for secret in ("sk-openai-main", "piapi-user-alice"):
            self.assertNotIn(secret, r.stdout + r.stderr)

    def test_sigterm_exits_and_removes_socket(self):
        sock = self.tmp / "piapi.sock"
        p = self.start(sock)
        self.assertTrue(harness.wait_until(sock.exists, 5), p.stderr_text())
        t = time.monotonic()
        p.popen.send_signal(signal.SIGTERM)
        try:
            code = p.popen.wait(5)
        except subprocess.TimeoutExpired:
            self.fail("piapi still running 5 s after SIGTERM (idle)")
        self.assertLess(time.monotonic() - t, 3.0)
        self.assertEqual(code, 0, p.stderr_text()[-1000:])
        self.assertFalse(sock.exists(), "socket left behind")

    def test_live_socket_not_taken_over(self):
        sock = self.tmp / "piapi.sock"
        first = self.start(sock, "first")
        self.assertTrue(harness.wait_until(sock.exists, 5), first.stderr_text())
        ino = sock.stat().st_ino
        second = self.start(sock, "second")
        try:
            second.popen.wait(5)
        except subprocess.TimeoutExpired:
            self.fail("a second piapi started on a live socket")
        self.assertNotEqual(second.popen.returncode, 0)
        self.assertTrue(first.alive())
        self.assertEqual(sock.stat().st_ino, ino, "socket file replaced")


class TestFrontEndLifecycle(unittest.TestCase):
    """Needs its own stack per test: these tests stop or reconfigure piapi."""

    def stack(self, form="nginx"):
        s = harness.Stack(form, gateway_config, piapi_args=["--grace", "5"],
                          name=f"life-{form}")
        self.addCleanup(s.stop)
        return s.start()

    def test_sigterm_drains_inflight_stream(self):
        s = self.stack()
        result = {}
        req = build_request("GET", "/piapi/cx/v1/sse?n=6&interval=0.2",
                            [bearer(ALICE), ("Connection", "close")])
        th = threading.Thread(target=lambda: result.setdefault("ex", s.raw(req, timeout=6)))
        th.start()
        time.sleep(0.4)
        s.piapi.popen.send_signal(signal.SIGTERM)
        th.join(8)
        ex = result.get("ex")
        self.assertIsNotNone(ex)
        self.assertEqual(ex.status, 200, ex.raw[:300])
        self.assertIsNotNone(ex.arrival_of(b"data: [DONE]"),
                             f"stream cut by SIGTERM: {ex.body()[-200:]!r}")
        try:
            code = s.piapi.popen.wait(3)
        except subprocess.TimeoutExpired:
            self.fail("piapi did not exit after draining")
        self.assertEqual(code, 0)
        # new requests are refused once it is gone (nginx: 502)
        self.assertEqual(s.request("GET", "/healthz").status, 502)

    def test_lighttpd_binpath_stop_leaves_no_piapi(self):
        s = self.stack("lighttpd-binpath")
        children = [pid for pid in harness.pids_in_group(s.front.pid) if pid != s.front.pid]
        self.assertTrue(children, "lighttpd spawned no piapi")
        s.front.stop(timeout=5)
        self.assertEqual(s.front.group_leftovers, [],
                         "piapi survived lighttpd's shutdown (killed by the harness)")

    def test_config_hot_reload(self):
        s = self.stack()
        self.assertEqual(s.request("GET", "/piapi/cx/v1/models", [bearer(EVE)]).status, 401)
        cfg = gateway_config(s)
        cfg["users"].append({"name": "eve", "apiKey": EVE, "providerName": "openai",
                             "providerKeyName": "main"})
        reload_config(s.config_path, cfg)
        ok = harness.wait_until(
            lambda: s.request("GET", "/piapi/cx/v1/models", [bearer(EVE)]).status == 200, 3.0, 0.1)
        self.assertTrue(ok, "new user not live 3 s after the config was replaced")

        # an invalid config is rejected and the live one kept
        bad = dict(cfg, users=cfg["users"] + [{"name": "mallory", "apiKey": EVE,
                                               "providerName": "nope", "providerKeyName": "x"}])
        reload_config(s.config_path, bad)

        def failures():
            m = re.search(r'piapi_config_reloads_total\{result="failure"\} (\d+)',
                          s.request("GET", "/metrics").body.decode())
            return m and int(m.group(1)) >= 1
        self.assertTrue(harness.wait_until(failures, 3.0, 0.1), "no failed reload counted")
        self.assertEqual(s.request("GET", "/piapi/cx/v1/models", [bearer(EVE)]).status, 200)
        self.assertEqual(s.request("GET", "/piapi/cx/v1/models", [bearer(ALICE)]).status, 200)


if __name__ == "__main__":
    unittest.main(verbosity=2)
