"""Limits shared through Redis, attacked: a client that leaves while
queued for a concurrency slot (the hang-up watch is armed only once a
request waits), many concurrent requests over two instances whose spend
must add up exactly in piapi:spend:<member>:<YYYYMM>, and a Redis paused
(SIGSTOP) mid-traffic. Two piapi instances (each behind its own nginx)
on one redis-server."""
import datetime
import os
import shutil
import signal
import socket
import threading
import time
import unittest

import harness
from test_observability import Metrics
from test_limits import chat, slow_stream

KEY = "sk-limits-redis-hostile-5b7d"
NAMES = ("queue", "spend", "pause", "wrong")
KEYS = {n: f"piapi-user-{n}-h0stRq7" for n in NAMES}


def auth_of(name):
    return [("Authorization", "Bearer " + KEYS[name]), ("Content-Type", "application/json")]


def config_for(port):
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
            "users": [user("queue", "anthropic", concurrentRequests=1, queueMs=8000),
                      user("spend", "openai", tokensPerDay=1000000000,
                           dailyBudgetUsd="100000"),
                      user("pause", "openai", requestsPerMinute=1000),
                      user("wrong", "openai", tokensPerDay=1000000000)],
            "pricing": [{"model": "gpt-5*", "input": "1.25", "output": "10.00"}],
            "settings": {"redis": f"redis://127.0.0.1:{port}/0"},
        }
    return config


@unittest.skipUnless(shutil.which("redis-server") and shutil.which("redis-cli"),
                     "redis-server not installed")
class TestSharedLimitsHostile(harness.RedisPair):
    NAME = "limits-redis-hostile"

    @classmethod
    def config(cls, port):
        return config_for(port)

    def in_flight(self, stack, user):
        return Metrics(stack.request("GET", "/metrics").body.decode()).get(
            "piapi_user_in_flight", user=user)

    def test_queued_client_leaving_gives_the_slot_back(self):
        out = []
        t = threading.Thread(target=lambda: out.append(self.a.request(
            "POST", "/piapi/cc/v1/messages", auth_of("queue"),
            body=slow_stream("q-hold", 2.0), timeout=20).status), daemon=True)
        t.start()
        assert harness.wait_until(lambda: self.in_flight(self.a, "queue") == 1, 5.0)
        # B: a client queues for the slot A holds, then leaves
        body = slow_stream("q-leaver", 0.1)
        s = socket.create_connection(("127.0.0.1", self.b.port), timeout=5)
        s.sendall(b"POST /piapi/cc/v1/messages HTTP/1.1\r\nHost: x\r\n" +
                  f"Authorization: Bearer {KEYS['queue']}\r\n".encode() +
                  b"Content-Type: application/json\r\n" +
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.6)
        s.close()
        t.join(20)
        self.assertEqual(out, [200])
        # the slot is free for the next, on either instance, at once
        for stack in (self.b, self.a):
            t0 = time.monotonic()
            r = stack.request("POST", "/piapi/cc/v1/messages", auth_of("queue"),
                              body=slow_stream("q-next", 0.05), timeout=20)
            self.assertEqual(r.status, 200, r.body)
            self.assertLess(time.monotonic() - t0, 1.5)
        self.assertFalse([q for q in self.b.mock.requests() if b"q-leaver" in q["body"]])
        self.assertTrue(harness.wait_until(
            lambda: self.cli("ZCARD", "piapi:lease:queue") == "0", 3.0))
        for stack in (self.a, self.b):
            self.assertEqual(self.in_flight(stack, "queue"), 0)

    def test_spend_adds_up_exactly_across_instances(self):
        usage = {"prompt_tokens": 1234, "completion_tokens": 567, "total_tokens": 1801}
        statuses = []
        lock = threading.Lock()

        def run(stack, i):
            r = stack.request("POST", "/piapi/cx/chat/completions", auth_of("spend"),
                              body=chat(f"sp-{i}", usage), timeout=30)
            with lock:
                statuses.append(r.status)
        threads = [threading.Thread(target=run, args=(s, i), daemon=True)
                   for i in range(24) for s in (self.a, self.b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertEqual(statuses, [200] * 48)
        now = datetime.datetime.now(datetime.timezone.utc)
        key = f"piapi:spend:spend:{now:%Y%m}"
        self.assertTrue(harness.wait_until(
            lambda: self.cli("HGET", key, f"tokens:{now:%d}") == str(48 * 1801), 3.0),
            repr(self.cli("HGETALL", key)))
        local = sum(s.request("GET", "/usage", auth_of("spend")).json()["today"]["cost_usd"]
                    for s in (self.a, self.b))
        self.assertLessEqual(abs(int(self.cli("HGET", key, f"usd_nano:{now:%d}")) - local * 1e9),
                             48, local)
        self.assertEqual(self.cli("HGET", key, "usd_nano"),
                         self.cli("HGET", key, f"usd_nano:{now:%d}"))
        self.assertGreater(int(self.cli("TTL", key)), 86400)

    def test_spend_key_of_another_type(self):
        """piapi:spend of the member a string: its admissions fall back to
        local state (counted), none is refused or hangs."""
        now = datetime.datetime.now(datetime.timezone.utc)
        key = f"piapi:spend:wrong:{now:%Y%m}"
        self.cli("SET", key, "garbage")
        errors = lambda s: Metrics(s.request("GET", "/metrics").body.decode()).get(
            "piapi_redis_errors_total")
        before = errors(self.a)
        try:
            for i in range(3):
                r = self.a.request("POST", "/piapi/cx/chat/completions", auth_of("wrong"),
                                   body=chat(f"wt-{i}"), timeout=15)
                self.assertEqual(r.status, 200)
            self.assertGreater(errors(self.a), before)
            self.assertEqual(self.cli("GET", key), "garbage")
        finally:
            self.cli("DEL", key)

    def test_paused_redis_mid_traffic(self):
        """Redis SIGSTOPped (every call past 50 ms) while requests flow:
        they are answered on local state, none hangs; Redis back, the
        instances use it again."""
        statuses = []
        lock = threading.Lock()

        def run(stack, i):
            r = stack.request("POST", "/piapi/cx/chat/completions", auth_of("pause"),
                              body=chat(f"ps-{i}"), timeout=15)
            with lock:
                statuses.append(r.status)
        pid = self.redis.popen.pid
        threads = [threading.Thread(target=run, args=(s, i), daemon=True)
                   for i in range(10) for s in (self.a, self.b)]
        try:
            for n, t in enumerate(threads):
                t.start()
                if n == 4:
                    os.kill(pid, signal.SIGSTOP)
                time.sleep(0.02)
            for t in threads:
                t.join(15)
        finally:
            os.kill(pid, signal.SIGCONT)
        self.assertEqual(statuses, [200] * 20)
        for s in (self.a, self.b):
            self.assertTrue(harness.wait_until(
                lambda: s.request("GET", "/healthz").body == b"ok\n", 8.0, 0.1))


if __name__ == "__main__":
    unittest.main()
