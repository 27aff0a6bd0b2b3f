"""Cooldowns shared through Redis (settings.redis): two piapi instances,
each behind its own nginx with its own recording mock, on one real
redis-server started here. A provider key that answers instance A with
529 is skipped by instance B too (no request reaches it through B) within
a read of the shared state; a success through B ends the cooldown for A
(A tries the key again). The candidates are the same names on both; only
A's first candidate misbehaves, so B's requests show whose state decided."""
import shutil
import subprocess
import time
import unittest

import harness
from test_observability import Metrics

KEYS = {"ha": "piapi-user-ha-Rr7x2", "solo": "piapi-user-solo-Rr7x2"}


def routes_config(port, a_fails):
    def config(stack):
        mock = f"http://127.0.0.1:{stack.mock.port}"

        def provider(name, query=""):
            return {"name": name, "apiKeys": {"k": f"sk-{name}-secret-77c1"},
                    "services": [{"type": "cc", "baseUrl": f"{mock}/{name}{query}",
                                  "auth": {"mode": "header", "name": "x-api-key"}}]}
        return {
            "providers": [provider("sh-a", "?mock_fail=529" if a_fails else ""),
                          provider("sh-b")],
            "routes": {"ha": {"candidates": [{"providerName": "sh-a", "providerKeyName": "k"},
                                             {"providerName": "sh-b", "providerKeyName": "k"}]}},
            "users": [{"name": "ha", "apiKey": KEYS["ha"], "providerName": "sh-b",
                       "providerKeyName": "k", "services": {"cc": {"route": "ha"}}},
                      {"name": "solo", "apiKey": KEYS["solo"], "providerName": "sh-a",
                       "providerKeyName": "k"}],
            "settings": {"redis": f"redis://127.0.0.1:{port}/0"},
        }
    return config


@unittest.skipUnless(shutil.which("redis-server"), "redis-server not installed")
class TestSharedCooldowns(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.port = harness.free_port()
        cls.redis = harness.start_redis(cls.port)
        cls.a = harness.Stack("nginx", routes_config(cls.port, True), name="routes-redis-a").start()
        cls.b = harness.Stack("nginx", routes_config(cls.port, False), name="routes-redis-b").start()

    @classmethod
    def tearDownClass(cls):
        for s in (cls.a, cls.b):
            s.stop()
        cls.redis.stop()

    def call(self, stack, user):
        return stack.request("POST", "/piapi/cc/v1/messages",
                             [("x-api-key", KEYS[user]), ("Content-Type", "application/json")],
                             body=b'{"model":"m","x":1}', timeout=15)

    @staticmethod
    def reached(stack, prov):
        return sum(1 for r in stack.mock.requests() if r["path"].startswith(f"/{prov}/"))

    @staticmethod
    def cooling(stack, prov):
        m = Metrics(stack.request("GET", "/metrics").body.decode())
        return m.get("piapi_candidate_cooling", provider=prov, key="k")

    def shared_fields(self):
        out = subprocess.run(["redis-cli", "-p", str(self.port), "HGETALL", "piapi:cooling"],
                             capture_output=True, text=True, timeout=5).stdout
        return out.split("\n")[0::2]

    def test_cooldown_and_its_end_are_shared(self):
        # A: sh-a answers 529, the request fails over to sh-b
        r = self.call(self.a, "ha")
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(self.reached(self.a, "sh-a"), 1)
        self.assertEqual(self.reached(self.a, "sh-b"), 1)
        self.assertIn("sh-a\tk", self.shared_fields())
        # B learns it from Redis within a read or two, and keeps off sh-a
        self.assertTrue(harness.wait_until(lambda: self.cooling(self.b, "sh-a") == 1, 3.0, 0.05))
        for _ in range(3):
            r = self.call(self.b, "ha")
            self.assertEqual(r.status, 200, r.body)
        self.assertEqual(self.reached(self.b, "sh-a"), 0)
        self.assertEqual(self.reached(self.b, "sh-b"), 3)
        # a success through B (its only candidate, tried though cooling)
        # ends the cooldown everywhere
        r = self.call(self.b, "solo")
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(self.reached(self.b, "sh-a"), 1)
        self.assertEqual(self.cooling(self.b, "sh-a"), 0)
        self.assertTrue(harness.wait_until(lambda: "sh-a\tk" not in self.shared_fields(),
                                           2.0, 0.05))
        self.assertTrue(harness.wait_until(lambda: self.cooling(self.a, "sh-a") == 0, 3.0, 0.05))
        # so A tries sh-a first again (and fails over again)
        r = self.call(self.a, "ha")
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(self.reached(self.a, "sh-a"), 2)

    def test_redis_gone_keeps_each_instance_serving(self):
        """Redis stopped: failover still works on each instance's own
        state; back: the state is shared again."""
        self.redis.stop()
        try:
            r = self.call(self.a, "ha")
            self.assertEqual(r.status, 200, r.body)
            r = self.call(self.b, "ha")
            self.assertEqual(r.status, 200, r.body)
        finally:
            self.__class__.redis = harness.start_redis(self.port)
        before = self.reached(self.b, "sh-a")
        # A's next failure of sh-a (once its own cooldown is over, or now
        # if it was never cooling there) reaches B through the new Redis
        self.assertTrue(harness.wait_until(
            lambda: harness.redis_ping(self.port), 5.0, 0.05))
        deadline = time.monotonic() + 15
        while "sh-a\tk" not in self.shared_fields() and time.monotonic() < deadline:
            self.call(self.a, "solo")   # sh-a alone: tried, 529, written
            time.sleep(0.3)
        self.assertIn("sh-a\tk", self.shared_fields())
        self.assertTrue(harness.wait_until(lambda: self.cooling(self.b, "sh-a") == 1, 3.0, 0.05))
        r = self.call(self.b, "ha")
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(self.reached(self.b, "sh-a"), before)


if __name__ == "__main__":
    unittest.main()
