"""Keys safe at rest, behind real nginx: a member given only as
`apiKeyHash` (the lines `piapi keygen` prints) is served, and provider keys
read from the environment (`env:`), a file (`file:`) or a systemd credential
(`credential:`) reach the upstream while config.yaml holds none of them. A
rotated key file is picked up by the next reload; one that disappears makes
the reload fail while the old keys keep serving. Neither the member's key
nor a provider key shows in piapi's log or in `--check-config`."""
import hashlib
import os
import re
import signal
import subprocess
import unittest

import harness
from harness import header_values

ENV_KEY = "sk-env-4b1f0c9e7d2a"
FILE_KEY = "sk-file-8e3a1d5c0b7f"
FILE_KEY2 = "sk-file-rotated-2c9d"
CRED_KEY = "sk-cred-6a0e2f4b9c1d"
KEY_RE = re.compile(r"^piapi-[A-Za-z0-9_-]{43}$")


def keygen(*args):
    out = subprocess.run([str(harness.piapi_bin()), "keygen", *args],
                         capture_output=True, text=True, timeout=10)
    return out


def parse_keygen(text):
    lines = text.splitlines()
    key = lines[0]
    digest = re.search(r'apiKeyHash: "sha256:([0-9a-f]{64})"', text).group(1)
    return key, digest


class TestKeygen(unittest.TestCase):
    def test_prints_a_new_256_bit_key_and_its_hash(self):
        a, b = keygen("--name", "Dora"), keygen()
        self.assertEqual((a.returncode, b.returncode), (0, 0), a.stderr + b.stderr)
        key, digest = parse_keygen(a.stdout)
        self.assertRegex(key, KEY_RE)
        self.assertEqual(hashlib.sha256(key.encode()).hexdigest(), digest)
        self.assertIn('  - name: "Dora"\n', a.stdout)
        self.assertNotEqual(parse_keygen(b.stdout)[0], key)
        # the key is printed once: the YAML lines do not contain it
        self.assertEqual(a.stdout.count(key), 1)

    def test_rejects_bad_arguments(self):
        for args in (["--name"], ["--bogus"], ["--name", "a\nb"], ["--name", ""]):
            r = keygen(*args)
            self.assertEqual(r.returncode, 2, args)
            self.assertIn("usage: piapi keygen", r.stderr)
            self.assertEqual(r.stdout, "")


class TestKeysAtRest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        gen = keygen("--name", "Dora")
        cls.member_key, cls.member_hash = parse_keygen(gen.stdout)
        cls.stack = harness.Stack("nginx", cls.config, name="keys",
                                  piapi_env=cls.env())
        cls.addClassCleanup(cls.stack.stop)
        cls.key_file = cls.stack.tmp / "secrets" / "provider-file"
        cls.cred_dir = cls.stack.tmp / "credentials"
        cls.key_file.parent.mkdir()
        cls.cred_dir.mkdir()
        cls.key_file.write_text(FILE_KEY + "\n")
        (cls.cred_dir / "beta").write_text(CRED_KEY)
        cls.stack.start()

    @classmethod
    def env(cls):
        return {"PIAPI_TEST_ENV_KEY": ENV_KEY}

    @classmethod
    def config(cls, stack):
        # The credentials directory is known only once the stack's temp dir
        # exists; systemd sets the variable the same way for the service.
        stack.piapi_env["CREDENTIALS_DIRECTORY"] = str(stack.tmp / "credentials")
        base = stack.mock.base
        return {
            "providers": [{
                "name": "mock",
                "apiKeys": {"env": "env:PIAPI_TEST_ENV_KEY",
                            "file": f"file:{stack.tmp}/secrets/provider-file",
                            "cred": "credential:beta"},
                "services": [{"type": "cx", "baseUrl": f"{base}/v1"}],
            }],
            "users": [
                {"name": "dora", "apiKeyHash": f"sha256:{cls.member_hash}",
                 "providerName": "mock", "providerKeyName": "file"},
                {"name": "erin", "apiKey": "piapi-user-erin-k3ys", "providerName": "mock",
                 "providerKeyName": "env"},
                {"name": "finn", "apiKey": "piapi-user-finn-k3ys", "providerName": "mock",
                 "providerKeyName": "cred"},
            ],
        }

    def upstream_auth(self, member_key):
        self.stack.mock.reset()
        r = self.stack.request("POST", "/piapi/cx/chat/completions",
                               headers=[("Authorization", "Bearer " + member_key),
                                        ("Content-Type", "application/json")],
                               body=b'{"model":"m"}')
        self.assertEqual(r.status, 200, r.body)
        recs = self.stack.mock.requests()
        self.assertEqual(len(recs), 1)
        self.assertNotIn(member_key, recs[0]["path"] + repr(recs[0]["headers"]))
        return header_values(recs[0]["headers"], "Authorization")

    def test_1_hashed_member_and_external_provider_keys(self):
        self.assertEqual(self.upstream_auth(self.member_key), ["Bearer " + FILE_KEY])
        self.assertEqual(self.upstream_auth("piapi-user-erin-k3ys"), ["Bearer " + ENV_KEY])
        self.assertEqual(self.upstream_auth("piapi-user-finn-k3ys"), ["Bearer " + CRED_KEY])
        # the digest itself is no key
        r = self.stack.request("GET", "/piapi/cx/models",
                               headers=[("Authorization", "Bearer sha256:" + self.member_hash)])
        self.assertEqual(r.status, 401)

    def test_2_rotated_file_is_read_by_the_next_reload(self):
        self.key_file.write_text(FILE_KEY2 + "\n")
        self.reload_and_wait("success")
        self.assertEqual(self.upstream_auth(self.member_key), ["Bearer " + FILE_KEY2])

    def test_3_missing_file_fails_the_reload_and_old_keys_serve(self):
        self.key_file.unlink()
        try:
            self.reload_and_wait("failure")
            line = self.stack.wait_log(lambda l: l.get("msg") == "config reload failed")
            self.assertIn("providers[0].apiKeys.file: 'file:", line.get("error", ""))
            self.assertIn("No such file or directory", line.get("error", ""))
            self.assertEqual(self.upstream_auth(self.member_key), ["Bearer " + FILE_KEY2])
        finally:
            self.key_file.write_text(FILE_KEY2 + "\n")

    def test_4_no_key_in_log_or_check_config(self):
        env = {**os.environ, "PIAPI_TEST_ENV_KEY": ENV_KEY,
               "CREDENTIALS_DIRECTORY": str(self.cred_dir)}
        out = subprocess.run([str(harness.piapi_bin()), "--check-config", "--config",
                              str(self.stack.config_path)], capture_output=True,
                             text=True, env=env, timeout=10)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("configuration OK (1 providers, 1 services, 3 users", out.stdout)
        text = self.stack.piapi_log_text() + out.stdout + out.stderr
        self.assertTrue(text.strip())
        for secret in (ENV_KEY, FILE_KEY, FILE_KEY2, CRED_KEY, self.member_key):
            self.assertNotIn(secret, text)
        self.assertNotIn(self.member_key, self.stack.config_path.read_text())

    def reload_and_wait(self, result):
        before = self.reloads(result)
        self.stack.piapi.popen.send_signal(signal.SIGHUP)
        ok = harness.wait_until(lambda: self.reloads(result) > before, 5.0)
        self.assertTrue(ok, f"no config reload {result} counted")

    def reloads(self, result):
        r = self.stack.request("GET", "/metrics")
        m = re.search(r'^piapi_config_reloads_total\{result="%s"\} (\d+)' % result,
                      r.body.decode(), re.M)
        return int(m.group(1)) if m else 0


if __name__ == "__main__":
    unittest.main()
