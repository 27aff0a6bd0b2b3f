"""Limits shared through Redis (settings.redis): a real redis-server on a
loopback port, started here, and two piapi instances (each behind its own
nginx) using it. Together they admit exactly requestsPerMinute and
concurrentRequests; an instance SIGKILLed with two leases held gives them
back within the lease expiry; Redis stopped mid-test: requests keep
flowing on local state (fail open), piapi_redis_errors_total counts it and
/healthz says so while staying 200; Redis back: shared state resumes."""
import json
import shutil
import signal
import threading
import time
import unittest

import harness
from test_observability import Metrics
from test_limits import auth, chat, slow_stream

KEY = "sk-limits-redis-9f2e4c1a"
NAMES = ("shared", "pair", "again", "budget", "burst", "burstc")
KEYS = {n: f"piapi-user-{n}-lim4x9Tq2" for n in NAMES}


def redis_config(port):
    def config(stack):
        mock = f"http://127.0.0.1:{stack.mock.port}"

        def user(name, provider, **limits):
            return {"name": name, "apiKey": KEYS[name], "providerName": provider,
                    "providerKeyName": "main", "limits": limits}
        return {
            "providers": [
                {"name": "openai", "apiKeys": {"main": KEY},
                 "services": [{"type": "cx", "baseUrl": mock + "/openai"}]},
                {"name": "anthropic", "apiKeys": {"main": KEY},
                 "services": [{"type": "cc", "baseUrl": mock + "/anthropic",
                               "auth": {"mode": "header", "name": "x-api-key"}}]},
            ],
            "users": [user("shared", "openai", requestsPerMinute=4),
                      user("pair", "anthropic", concurrentRequests=2, queueMs=0),
                      user("again", "openai", requestsPerMinute=2),
                      user("budget", "openai", dailyBudgetUsd="2", tokensPerDay=10000000),
                      user("burst", "openai", requestsPerMinute=10),
                      user("burstc", "anthropic", concurrentRequests=3, queueMs=0)],
            "pricing": [{"model": "gpt-5*", "input": "1.25", "output": "10.00"}],
            "settings": {"redis": f"redis://127.0.0.1:{port}/0"},
        }
    return config


@unittest.skipUnless(shutil.which("redis-server"), "redis-server not installed")
class TestSharedLimits(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.port = harness.free_port()
        cls.tmp = None
        cls.redis = None
        cls.start_redis()
        cfg = redis_config(cls.port)
        cls.a = harness.Stack("nginx", cfg, name="limits-redis-a").start()
        cls.b = harness.Stack("nginx", cfg, name="limits-redis-b").start()
        for s in (cls.a, cls.b):
            assert harness.wait_until(lambda: cls.health(s) == "ok\n", 5.0, 0.05), cls.health(s)

    @classmethod
    def start_redis(cls):
        cls.redis = harness.start_redis(cls.port)

    @classmethod
    def tearDownClass(cls):
        for s in (cls.a, cls.b):
            s.stop()
        if cls.redis:
            cls.redis.stop()

    @staticmethod
    def health(stack):
        r = stack.request("GET", "/healthz")
        return r.body.decode() if r.status == 200 else f"status {r.status}"

    @staticmethod
    def errors(stack):
        m = Metrics(stack.request("GET", "/metrics").body.decode())
        return m.get("piapi_redis_errors_total")

    def post(self, stack, name, marker):
        return stack.request("POST", "/piapi/cx/chat/completions", auth_of(name),
                             body=chat(marker), timeout=20)

    def test_1_two_instances_admit_exactly_n_per_minute(self):
        got = [self.post(s, "shared", f"sh-{i}").status
               for i, s in enumerate([self.a, self.b] * 4)]
        self.assertEqual(got.count(200), 4, got)
        self.assertEqual(got.count(429), 4, got)
        self.assertEqual(got[:4], [200] * 4)
        self.assertEqual(self.errors(self.a) + self.errors(self.b), 0)

    def test_1b_budget_shared(self):
        """Each instance alone is under 2 USD (1.25 each), together over."""
        million = {"prompt_tokens": 1000000, "completion_tokens": 0, "total_tokens": 1000000}
        for s in (self.a, self.b):
            r = s.request("POST", "/piapi/cx/chat/completions", auth_of("budget"),
                          body=chat("budget-" + s.tmp.name, million), timeout=20)
            self.assertEqual(r.status, 200, r.body)
        time.sleep(0.2)   # B's total reaches Redis as its request ends
        r = self.a.request("POST", "/piapi/cx/chat/completions", auth_of("budget"),
                           body=chat("budget-over", million), timeout=20)
        self.assertEqual(r.status, 429, r.body)
        self.assertIn("dailyBudgetUsd", r.json()["error"]["message"])
        self.assertGreaterEqual(int(r.header("Retry-After")), 1)
        local = self.a.request("GET", "/usage", auth_of("budget")).json()
        self.assertAlmostEqual(local["today"]["cost_usd"], 1.25)   # A's own tally

    def burst(self, jobs):
        """Runs every (stack, member, body) of jobs at once; their statuses."""
        out, gate = [], threading.Barrier(len(jobs))

        def run(stack, name, body):
            gate.wait(5)
            path = "/piapi/cc/v1/messages" if name == "burstc" else "/piapi/cx/chat/completions"
            out.append(stack.request("POST", path, auth_of(name), body=body, timeout=30).status)
        threads = [threading.Thread(target=run, args=job, daemon=True) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return out

    def test_1c_bursts_are_admitted_exactly(self):
        """A member's requests arriving together are admitted by one
        script call per loop round: still exactly the limit, across two
        instances bursting at once."""
        jobs = [(s, "burst", chat(f"burst-{i}")) for i, s in enumerate([self.a] * 16 + [self.b] * 8)]
        got = self.burst(jobs)
        self.assertEqual(len(got), 24, got)
        self.assertEqual(got.count(200), 10, got)
        self.assertEqual(got.count(429), 14, got)
        reached = [r for s in (self.a, self.b) for r in s.mock.requests()
                   if b"burst-" in r["body"]]
        self.assertEqual(len(reached), 10)
        # concurrency: three slots, no queue: three of eight streams run
        jobs = [(self.a, "burstc", slow_stream(f"burstc-{i}", 1.0)) for i in range(8)]
        got = self.burst(jobs)
        self.assertEqual(sorted(got), [200] * 3 + [429] * 5, got)
        self.assertEqual(self.errors(self.a) + self.errors(self.b), 0)

    def streams(self, stack, n, seconds, out):
        threads = []
        for i in range(n):
            def run(i=i):
                try:
                    r = stack.request("POST", "/piapi/cc/v1/messages", auth_of("pair"),
                                      body=slow_stream(f"pair-{i}", seconds), timeout=30)
                    out.append(r.status)
                except Exception as e:  # noqa: BLE001 - a killed instance cuts it
                    out.append(repr(e))
            t = threading.Thread(target=run, daemon=True)
            t.start()
            threads.append(t)
        return threads

    def in_flight(self, stack, n):
        return harness.wait_until(
            lambda: Metrics(stack.request("GET", "/metrics").body.decode())
            .get("piapi_user_in_flight", user="pair") == n, 5.0, 0.02)

    def pair_on(self, stack):
        return stack.request("POST", "/piapi/cc/v1/messages", auth_of("pair"),
                             body=slow_stream("pair-probe", 0.05), timeout=20)

    def test_2_concurrency_across_instances_and_a_crash(self):
        out = []
        self.streams(self.a, 2, 1.0, out)
        self.assertTrue(self.in_flight(self.a, 2))
        r = self.pair_on(self.b)   # A holds both slots
        self.assertEqual(r.status, 429, r.body)
        self.assertIn("concurrentRequests", r.json()["error"]["message"])
        self.assertTrue(harness.wait_until(lambda: len(out) == 2, 10.0, 0.05))
        self.assertEqual(out, [200, 200])
        self.assertEqual(self.pair_on(self.b).status, 200)   # released at their end

        # A crashes holding two leases: B gets them back within the expiry (5 s)
        out = []
        self.streams(self.a, 2, 30.0, out)
        self.assertTrue(self.in_flight(self.a, 2))
        self.assertEqual(self.pair_on(self.b).status, 429)
        t0 = time.monotonic()
        self.a.piapi.stop(timeout=5.0, sig=signal.SIGKILL)
        self.assertTrue(harness.wait_until(lambda: self.pair_on(self.b).status == 200,
                                           8.0, 0.25))
        freed = time.monotonic() - t0
        self.assertLess(freed, 6.5)
        self.a.restart_piapi(sig=signal.SIGKILL)

    def test_3_redis_down_fails_open_then_resumes(self):
        before = self.errors(self.a)
        self.redis.stop(timeout=5.0, sig=signal.SIGKILL)
        got = [self.post(self.a, "shared", f"down-{i}").status for i in range(3)]
        # local state: A's own window (nothing local yet this minute) admits
        self.assertEqual(got, [200, 200, 200])
        self.assertGreater(self.errors(self.a), before)
        body = self.health(self.a)
        self.assertTrue(body.startswith("ok\n"), body)
        self.assertIn("redis: unreachable", body)

        self.start_redis()
        for s in (self.a, self.b):
            self.assertTrue(harness.wait_until(lambda: self.health(s) == "ok\n", 8.0, 0.1),
                            self.health(s))
        got = [self.post(s, "again", f"again-{i}").status
               for i, s in enumerate([self.a, self.b, self.a])]
        self.assertEqual(got, [200, 200, 429])


def auth_of(name):
    return [("Authorization", "Bearer " + KEYS[name]), ("Content-Type", "application/json")]


if __name__ == "__main__":
    unittest.main()
