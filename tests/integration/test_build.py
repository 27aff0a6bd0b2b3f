"""The build's own contracts: `make install`/`uninstall` honour PREFIX and
DESTDIR, and the CLI's --version, --help and usage errors behave."""
import os
import resource
import signal
import subprocess
import tempfile
import time
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / os.environ.get("BUILD", "build")


def run(*args, **kw):
    return subprocess.run(list(args), cwd=REPO, capture_output=True, text=True,
                          timeout=120, **kw)


class TestInstall(unittest.TestCase):
    def test_install_and_uninstall_with_destdir_and_prefix(self):
        with tempfile.TemporaryDirectory() as dest:
            r = run("make", "--no-print-directory", "-s", f"BUILD={BUILD}", "install",
                    f"DESTDIR={dest}", "PREFIX=/opt/piapi")
            self.assertEqual(r.returncode, 0, r.stderr)
            binary = Path(dest, "opt/piapi/bin/piapi")
            self.assertTrue(binary.is_file() and os.access(binary, os.X_OK))
            self.assertTrue(Path(dest, "opt/piapi/share/doc/piapi/config.yaml.example").is_file())
            v = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
            self.assertEqual(v.returncode, 0)
            self.assertRegex(v.stdout, r"^piapi \d+\.\d+\.\d+")
            r = run("make", "--no-print-directory", "-s", f"BUILD={BUILD}", "uninstall",
                    f"DESTDIR={dest}", "PREFIX=/opt/piapi")
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertFalse(binary.exists())


class TestCommandLine(unittest.TestCase):
    piapi = str(BUILD / "piapi")

    def test_help_lists_every_option(self):
        r = subprocess.run([self.piapi, "--help"], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0)
        for opt in ("--config", "--socket", "--socket-mode", "--threads", "--queue-timeout",
                    "--grace", "--log-level", "--log-file", "--check-config", "--version"):
            self.assertIn(opt, r.stdout)

    def test_usage_errors_exit_2_with_a_message(self):
        for args in (["--bogus"], ["--threads", "0"], ["--threads", "12x"],
                     ["--socket-mode", "999"], ["--log-level", "loud"], ["extra-arg"]):
            r = subprocess.run([self.piapi, *args], capture_output=True, text=True)
            self.assertEqual(r.returncode, 2, args)
            self.assertTrue(r.stderr.strip(), args)

    def test_no_socket_and_no_inherited_socket_is_a_clear_error(self):
        with tempfile.TemporaryDirectory() as d:
            cfg = Path(d, "config.yaml")
            cfg.write_text((REPO / "config.yaml.example").read_text())
            cfg.chmod(0o600)
            r = subprocess.run([self.piapi, "--config", str(cfg)], stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=10)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("not a listening socket", r.stderr)

    def test_raises_a_low_open_file_limit_for_its_threads(self):
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard != resource.RLIM_INFINITY and hard < 2000:
            self.skipTest(f"hard open-file limit {hard} is too low to test raising")
        with tempfile.TemporaryDirectory() as d:
            cfg = Path(d, "config.yaml")
            cfg.write_text((REPO / "config.yaml.example").read_text())
            cfg.chmod(0o600)
            sock = Path(d, "p.sock")
            p = subprocess.Popen(
                [self.piapi, "--config", str(cfg), "--socket", str(sock), "--threads", "400"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
            try:
                for _ in range(100):
                    if sock.exists() or p.poll() is not None:
                        break
                    time.sleep(0.05)
                limits = Path(f"/proc/{p.pid}/limits").read_text()
                soft = int(next(l for l in limits.splitlines()
                                if l.startswith("Max open files")).split()[3])
                self.assertGreaterEqual(soft, 400 * 4, limits)
            finally:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=10)


if __name__ == "__main__":
    unittest.main(verbosity=2)
