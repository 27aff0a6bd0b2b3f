"""Shared cooldowns (settings.redis) against a hostile or broken Redis:
piapi:cooling of the wrong type, fields with values no piapi writes (an
end far in the future as from a clock far ahead, negative, a failure
count at the top of its range, names of no candidate), a Redis that
refuses writes (maxmemory reached) while it still answers reads, a
client that leaves. piapi keeps serving, keeps its own cooldowns when it
cannot share them, and adopts nothing it would not set itself.

Two instances (each behind its own nginx) on one redis-server; one
recording mock plays every candidate, its query saying how it fails."""
import shutil
import socket
import subprocess
import threading
import time
import unittest

import harness
from test_observability import Metrics

SCENARIOS = {
    "wt": [("wt-a", "mock_fail=529"), ("wt-b", None)],
    "wl": [("wl-a", "mock_fail=529"), ("wl-b", None)],
    "oom": [("oom-a", "mock_fail=529"), ("oom-b", None)],
    "ff": [("ff-a", None), ("ff-b", None)],
    "neg": [("neg-a", None), ("neg-b", None)],
    "hf": [("hf-a", "mock_fail=529"), ("hf-b", None)],
    "gb": [("gb-a", "mock_fail=529"), ("gb-b", None)],
    "ab": [("ab-a", "mock_delay=1.5"), ("ab-b", None)],
    "mx": [("mx-a", "mock_fail=529"), ("mx-b", None)],
    "gv": [("gv-a", "mock_fail=529"), ("gv-b", None)],
    "gw": [("gw-a", "mock_fail=529"), ("gw-b", None)],
    "rx": [("rx-a", "mock_fail=429&mock_retry_after=600"), ("rx-b", None)],
}
# More candidates than one read adopts at once (64): a provider outage
# that cools them all.
FILL = [f"fill-{i}" for i in range(70)]


def pkey(prov):
    return f"sk-{prov}-hostile-7c1e"


def member_key(user):
    return f"piapi-user-{user}-Rh0st1le"


def config_for(port):
    def config(stack):
        mock = f"http://127.0.0.1:{stack.mock.port}"
        providers, users, routes = [], [], {}
        for user, cands in SCENARIOS.items():
            for prov, query in cands:
                providers.append({"name": prov, "apiKeys": {"k": pkey(prov)},
                                  "services": [{"type": "cc",
                                                "baseUrl": f"{mock}/{prov}" +
                                                (f"?{query}" if query else ""),
                                                "auth": {"mode": "header",
                                                         "name": "x-api-key"}}]})
            routes[f"r-{user}"] = {"strategy": "failover",
                                   "candidates": [{"providerName": p, "providerKeyName": "k"}
                                                  for p, _ in cands]}
            users.append({"name": user, "apiKey": member_key(user),
                          "providerName": cands[-1][0], "providerKeyName": "k",
                          "services": {"cc": {"route": f"r-{user}"}}})
        for i in range(0, len(FILL), 14):
            for prov in FILL[i:i + 14]:
                providers.append({"name": prov, "apiKeys": {"k": pkey(prov)},
                                  "services": [{"type": "cc", "baseUrl": f"{mock}/{prov}"}]})
            routes[f"r-fill-{i}"] = {"strategy": "failover",
                                     "candidates": [{"providerName": p, "providerKeyName": "k"}
                                                    for p in FILL[i:i + 14]]}
            users.append({"name": f"fill{i}", "apiKey": member_key(f"fill{i}"),
                          "providerName": FILL[i], "providerKeyName": "k",
                          "services": {"cc": {"route": f"r-fill-{i}"}}})
        return {"providers": providers, "routes": routes, "users": users,
                "settings": {"redis": f"redis://127.0.0.1:{port}/0"}}
    return config


@unittest.skipUnless(shutil.which("redis-server") and shutil.which("redis-cli"),
                     "redis-server not installed")
class TestSharedCooldownsHostile(harness.RedisPair):
    NAME = "routes-redis-hostile"

    @classmethod
    def config(cls, port):
        return config_for(port)

    def tearDown(self):
        self.cli("CONFIG", "SET", "maxmemory", "0")
        self.cli("DEL", "piapi:cooling")

    # -- helpers --

    def call(self, stack, user):
        return stack.request("POST", "/piapi/cc/echo",
                             [("x-api-key", member_key(user)),
                              ("Content-Type", "application/json")],
                             body=b'{"model":"m","x":1}', timeout=15)

    def reqs(self, stack, prov):
        return [r for r in stack.mock.requests() if r["path"].startswith(f"/{prov}/")]

    def metrics(self, stack):
        return Metrics(stack.request("GET", "/metrics").body.decode())

    def errors(self, stack):
        return self.metrics(stack).get("piapi_redis_errors_total")

    @staticmethod
    def wait_reads():
        time.sleep(1.2)   # two reads of piapi:cooling at least (one each 0.5 s)

    def assert_up(self, stack):
        self.assertEqual(stack.request("GET", "/healthz").body, b"ok\n")

    # -- attacks --

    def test_wrong_type_keeps_own_cooldowns(self):
        """piapi:cooling a string, then a list: reads and writes fail (and
        are counted); the instance keeps its own cooldown."""
        for kind, user in (("string", "wt"), ("list", "wl")):
            with self.subTest(kind=kind):
                self.cli("DEL", "piapi:cooling")
                if kind == "string":
                    self.cli("SET", "piapi:cooling", "garbage")
                else:
                    self.cli("RPUSH", "piapi:cooling", "x", "y")
                before = self.errors(self.a)
                r = self.call(self.a, user)
                self.assertEqual(r.status, 200)
                self.assertEqual(len(self.reqs(self.a, f"{user}-a")), 1)
                self.wait_reads()
                r = self.call(self.a, user)
                self.assertEqual(r.status, 200)
                self.assertEqual(len(self.reqs(self.a, f"{user}-a")), 1)  # still cooling
                self.assertGreater(self.errors(self.a), before)
                self.assert_up(self.a)

    def test_refused_writes_keep_own_cooldowns(self):
        """A Redis at maxmemory refuses the failure's write but still
        answers reads: a read that lacks the failure says nothing about a
        success elsewhere, and the cooldown must stay."""
        self.cli("CONFIG", "SET", "maxmemory", "1")
        before = self.errors(self.a)
        r = self.call(self.a, "oom")
        self.assertEqual(r.status, 200)
        self.assertEqual(len(self.reqs(self.a, "oom-a")), 1)
        self.wait_reads()
        r = self.call(self.a, "oom")
        self.assertEqual(r.status, 200)
        self.assertEqual(len(self.reqs(self.a, "oom-a")), 1, "cooldown forgotten")
        self.assertEqual(self.metrics(self.a).get("piapi_candidate_cooling",
                                                  provider="oom-a", key="k"), 1)
        self.assertGreater(self.errors(self.a), before)

    def test_far_future_end_not_adopted(self):
        """An end no piapi writes (past its own 10-minute cap: garbage, or
        an instance whose clock is far ahead) keeps nobody off a healthy
        candidate for longer than piapi itself would."""
        far = int(time.time() * 1000) + 3600 * 1000   # a clock an hour ahead
        self.cli("HSET", "piapi:cooling", "ff-a\tk", f"{far} 1",
                 "neg-a\tk", "-1 1")
        self.wait_reads()
        for user in ("ff", "neg"):
            with self.subTest(user=user):
                r = self.call(self.b, user)
                self.assertEqual(r.status, 200)
                self.assertEqual(len(self.reqs(self.b, f"{user}-a")), 1)
                self.assertEqual(self.reqs(self.b, f"{user}-b"), [])
        self.assert_up(self.b)

    def test_top_failure_count_still_cools(self):
        """A failure count at the top of its range, adopted from Redis, must
        not wrap to 0 at the next failure (the candidate would not cool)."""
        soon = int(time.time() * 1000) + 300
        self.cli("HSET", "piapi:cooling", "hf-a\tk", f"{soon} 4294967295")
        self.wait_reads()   # adopted, and its end passed
        r = self.call(self.a, "hf")
        self.assertEqual(r.status, 200)
        self.assertEqual(len(self.reqs(self.a, "hf-a")), 1)
        r = self.call(self.a, "hf")   # at once: before a read adopts the count again
        self.assertEqual(r.status, 200)
        self.assertEqual(len(self.reqs(self.a, "hf-a")), 1, "not cooling after a failure")
        self.wait_reads()
        r = self.call(self.a, "hf")
        self.assertEqual(r.status, 200)
        self.assertEqual(len(self.reqs(self.a, "hf-a")), 1, "not cooling after a failure")

    def test_garbage_fields_ignored(self):
        """Thousands of fields of no candidate, names with extra tabs,
        huge or non-numeric values: piapi keeps serving, adopts none of
        them, and its own failure's cooldown holds."""
        args = []
        for i in range(3000):
            args += [f"nope-{i}\tk", f"{int(time.time() * 1000) + 60000} 3"]
        args += ["gb-b\tk\textra", "99999999999999999999999 1", "gb-b", "1 1",
                 "\t", "x", "gb-b\tk2", f"{int(time.time() * 1000) + 60000} 1",
                 "wt-b\tk", "abc def", "ff-b\tk", "1e30 5"]
        self.cli("HSET", "piapi:cooling", *args)
        self.wait_reads()
        r = self.call(self.a, "gb")
        self.assertEqual(r.status, 200)
        self.assertEqual(len(self.reqs(self.a, "gb-a")), 1)
        self.assertEqual(len(self.reqs(self.a, "gb-b")), 1)
        self.wait_reads()
        r = self.call(self.a, "gb")
        self.assertEqual(r.status, 200)
        self.assertEqual(len(self.reqs(self.a, "gb-a")), 1)   # own cooldown holds
        m = self.metrics(self.a)
        for prov in ("gb-b", "wt-b", "ff-b"):
            self.assertEqual(m.get("piapi_candidate_cooling", provider=prov, key="k"), 0, prov)
        self.assertNotIn("nope-1", str(m.label_values("provider")))
        # the own failure went in next to the garbage
        self.assertIn("gb-a\tk", self.cli("HKEYS", "piapi:cooling"))
        self.assert_up(self.a)

    def test_many_cooling_keep_own_cooldown(self):
        """More failing candidates in piapi:cooling than one read adopts:
        the ones left out are not thereby healed elsewhere."""
        until = int(time.time() * 1000) + 60000
        args = []
        for prov in FILL:
            args += [f"{prov}\tk", f"{until} 1"]
        self.cli("HSET", "piapi:cooling", *args)
        r = self.call(self.a, "mx")
        self.assertEqual(r.status, 200)
        self.assertEqual(len(self.reqs(self.a, "mx-a")), 1)
        assert harness.wait_until(lambda: "mx-a" in self.cli("HKEYS", "piapi:cooling"), 2.0)
        self.wait_reads()
        r = self.call(self.a, "mx")
        self.assertEqual(r.status, 200)
        self.assertEqual(len(self.reqs(self.a, "mx-a")), 1, "cooldown forgotten")

    def test_garbage_value_of_own_failure_keeps_it(self):
        """The field of this instance's own failure overwritten with
        garbage (too long, not two numbers): no success elsewhere said so,
        the cooldown holds."""
        for user, value in (("gv", "7" * 100 + " 1"), ("gw", "abc def")):
            with self.subTest(value=value):
                r = self.call(self.a, user)
                self.assertEqual(r.status, 200)
                self.assertTrue(harness.wait_until(
                    lambda: f"{user}-a\tk" in self.cli("HKEYS", "piapi:cooling"), 2.0))
                self.cli("HSET", "piapi:cooling", f"{user}-a\tk", value)
                self.wait_reads()
                r = self.call(self.a, user)
                self.assertEqual(r.status, 200)
                self.assertEqual(len(self.reqs(self.a, f"{user}-a")), 1, "cooldown forgotten")

    def test_client_leaving_is_not_shared(self):
        """A client that leaves mid-attempt is no failure: nothing goes to
        Redis, and the other instance uses the candidate."""
        s = socket.create_connection(("127.0.0.1", self.a.port), timeout=5)
        body = b'{"model":"m","x":1}'
        s.sendall(b"POST /piapi/cc/echo HTTP/1.1\r\nHost: x\r\n" +
                  f"x-api-key: {member_key('ab')}\r\n".encode() +
                  b"Content-Type: application/json\r\n" +
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert harness.wait_until(lambda: self.reqs(self.a, "ab-a"), 5.0)
        s.close()
        time.sleep(2.0)   # ab-a's answer time passed
        self.assertNotIn("ab-a", self.cli("HKEYS", "piapi:cooling"))
        self.wait_reads()
        r = self.call(self.b, "ab")
        self.assertEqual(r.status, 200)
        self.assertEqual(len(self.reqs(self.b, "ab-a")), 1)
        self.assertEqual(self.reqs(self.b, "ab-b"), [])

    def test_z_redis_restarted_empty(self):
        """Redis restarted with nothing in it: an instance that skipped a
        candidate only because Redis said so (B) is not stuck on it."""
        r = self.call(self.a, "rx")
        self.assertEqual(r.status, 200)
        self.wait_reads()
        self.assertEqual(self.call(self.b, "rx").status, 200)
        self.assertEqual(self.reqs(self.b, "rx-a"), [])   # B adopted A's 600 s
        self.redis.stop()
        type(self).redis = harness.start_redis(self.port)
        for s in (self.a, self.b):
            self.assertTrue(harness.wait_until(
                lambda: s.request("GET", "/healthz").body == b"ok\n", 8.0, 0.1))
        self.wait_reads()
        self.assertEqual(self.call(self.b, "rx").status, 200)
        self.assertEqual(len(self.reqs(self.b, "rx-a")), 1)   # not stuck on 600 s


def moved_config(port):
    def config(stack):
        mock = f"http://127.0.0.1:{stack.mock.port}"
        cands = [("mv-a", "mock_delay=2&mock_fail=529"), ("mv-b", None)]
        return {
            "providers": [{"name": p, "apiKeys": {"k": pkey(p)},
                           "services": [{"type": "cc",
                                         "baseUrl": f"{mock}/{p}" + (f"?{q}" if q else ""),
                                         "auth": {"mode": "header", "name": "x-api-key"}}]}
                          for p, q in cands],
            "routes": {"r-mv": {"strategy": "failover",
                                "candidates": [{"providerName": p, "providerKeyName": "k"}
                                               for p, _ in cands]}},
            "users": [{"name": "mv", "apiKey": member_key("mv"), "providerName": "mv-b",
                       "providerKeyName": "k", "services": {"cc": {"route": "r-mv"}}}],
            "settings": {"redis": f"redis://127.0.0.1:{port}/0"},
        }
    return config


@unittest.skipUnless(shutil.which("redis-server") and shutil.which("redis-cli"),
                     "redis-server not installed")
class TestSharedCooldownsRedisMoved(unittest.TestCase):
    """A reload names another Redis while a request that began before it
    is still in its attempt: that attempt's failure goes to the live
    Redis, and the request's old one is not connected to again (which
    would drop the live connection until the next read)."""

    @classmethod
    def setUpClass(cls):
        cls.old_port, cls.new_port = harness.free_port(), harness.free_port()
        cls.old = harness.start_redis(cls.old_port)
        cls.new = harness.start_redis(cls.new_port)
        cls.stack = harness.Stack("nginx", moved_config(cls.old_port),
                                  name="routes-redis-moved").start()

    @classmethod
    def tearDownClass(cls):
        cls.stack.stop()
        cls.old.stop()
        cls.new.stop()

    def cli(self, port, *args):
        return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True,
                              timeout=5).stdout.decode()

    def connections(self, port):
        info = self.cli(port, "INFO", "stats")
        return int(info.split("total_connections_received:")[1].split()[0])

    def test_failure_after_reload_goes_to_the_live_redis(self):
        out = []
        t = threading.Thread(target=lambda: out.append(self.stack.request(
            "POST", "/piapi/cc/echo", [("x-api-key", member_key("mv")),
                                       ("Content-Type", "application/json")],
            body=b'{"model":"m","x":1}', timeout=15)), daemon=True)
        t.start()
        assert harness.wait_until(
            lambda: any(r["path"].startswith("/mv-a/") for r in self.stack.mock.requests()), 5.0)
        before = len([l for l in self.stack.piapi_log() if l.get("msg") == "config reloaded"])
        harness.write_config(self.stack.config_path, moved_config(self.new_port)(self.stack))
        self.assertTrue(harness.wait_until(
            lambda: len([l for l in self.stack.piapi_log()
                         if l.get("msg") == "config reloaded"]) > before, 5))
        self.assertTrue(harness.wait_until(lambda: self.connections(self.new_port) >= 1, 3.0))
        old_conns = self.connections(self.old_port)
        t.join(15)
        self.assertEqual(out[0].status, 200)
        self.assertTrue(harness.wait_until(
            lambda: "mv-a\tk" in self.cli(self.new_port, "HKEYS", "piapi:cooling"),
            2.0), self.cli(self.new_port, "HGETALL", "piapi:cooling"))
        time.sleep(0.6)
        # redis-cli's own INFO is the one connection more
        self.assertEqual(self.connections(self.old_port), old_conns + 1)


if __name__ == "__main__":
    unittest.main()
