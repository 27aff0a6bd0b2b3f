"""Shared admissions batched per loop round (one script call per member
and round, at most 32 requests a call), attacked: bursts of one member
larger than a batch mixed with other members' requests on two instances
(still exactly requestsPerMinute / concurrentRequests, Retry-After of the
refused right), and a Redis paused (SIGSTOP) while a batch is out: every
request of it is answered on local state, and the leases the late script
took go back once Redis is back (not left to expire)."""
import os
import shutil
import signal
import socket
import threading
import time
import unittest

import harness
from test_limits import chat, slow_stream
from test_observability import Metrics

KEY = "sk-limits-redis-batch-8c3e"
NAMES = ("big", "other", "bigc", "stop", "cq", "rl", "werr", "hold")
KEYS = {n: f"piapi-user-{n}-b4tchQ9" for n in NAMES}


def auth_of(name):
    return [("Authorization", "Bearer " + KEYS[name]), ("Content-Type", "application/json")]


def config_for(port, knobs):
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
            "users": [user("big", "openai", requestsPerMinute=37),
                      user("other", "openai", requestsPerMinute=5),
                      user("bigc", "anthropic", concurrentRequests=33, queueMs=0),
                      user("stop", "anthropic", concurrentRequests=100, queueMs=0),
                      user("cq", "anthropic", concurrentRequests=3, queueMs=15000),
                      user("werr", "anthropic", concurrentRequests=4, queueMs=0),
                      user("hold", "anthropic", concurrentRequests=2, queueMs=6000),
                      user("rl", "openai", requestsPerMinute=20, queueMs=knobs["rl_queue_ms"])],
            "pricing": [{"model": "gpt-5*", "input": "1.25", "output": "10.00"}],
            "settings": {"redis": f"redis://127.0.0.1:{port}/0"},
        }
    return config


@unittest.skipUnless(shutil.which("redis-server") and shutil.which("redis-cli"),
                     "redis-server not installed")
class TestBatchedAdmissions(harness.RedisPair):
    NAME = "limits-redis-batch"

    @classmethod
    def config(cls, port):
        cls.knobs = {"rl_queue_ms": 1000}   # a reload changes it: a new snapshot
        return config_for(port, cls.knobs)

    @staticmethod
    def burst(jobs):
        """Every (stack, member, body) of jobs at once: (member, status,
        Retry-After) each."""
        out, lock, gate = [], threading.Lock(), threading.Barrier(len(jobs))

        def run(stack, name, body):
            gate.wait(10)
            path = "/piapi/cx/chat/completions" if b'"gpt' in body else "/piapi/cc/v1/messages"
            try:
                r = stack.request("POST", path, auth_of(name), body=body, timeout=30)
                got = (name, r.status, r.header("Retry-After"))
            except Exception as e:  # noqa: BLE001 - reported as the status
                got = (name, repr(e), None)
            with lock:
                out.append(got)
        threads = [threading.Thread(target=run, args=job, daemon=True) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
        return out

    def test_1_bursts_larger_than_a_batch_with_other_members(self):
        jobs = ([(self.a, "big", chat(f"big-a-{i}")) for i in range(40)] +
                [(self.b, "big", chat(f"big-b-{i}")) for i in range(10)] +
                [(s, "other", chat(f"other-{i}")) for i, s in enumerate([self.a, self.b] * 5)])
        got = self.burst(jobs)
        self.assertEqual(len(got), 60, got)
        big = [g for g in got if g[0] == "big"]
        other = [g for g in got if g[0] == "other"]
        self.assertEqual(sorted(s for _, s, _ in big), [200] * 37 + [429] * 13, got)
        self.assertEqual(sorted(s for _, s, _ in other), [200] * 5 + [429] * 5, got)
        # refused at a full window: a place frees in about a minute
        for _, status, retry in big + other:
            if status == 429:
                self.assertTrue(retry and 55 <= int(retry) <= 60, retry)
        reached = [r for s in (self.a, self.b) for r in s.mock.requests()
                   if b"big-" in r["body"]]
        self.assertEqual(len(reached), 37)

    def test_2_concurrency_burst_larger_than_a_batch(self):
        jobs = ([(self.a, "bigc", slow_stream(f"bigc-a-{i}", 1.5)) for i in range(40)] +
                [(self.b, "bigc", slow_stream(f"bigc-b-{i}", 1.5)) for i in range(6)])
        got = self.burst(jobs)
        self.assertEqual(sorted(s for _, s, _ in got), [200] * 33 + [429] * 13, got)
        self.assertTrue(harness.wait_until(
            lambda: self.cli("ZCARD", "piapi:lease:bigc") == "0", 3.0))

    def test_3_paused_redis_with_batches_out(self):
        """Redis paused while a burst's batches are out: all answered (on
        local state); once Redis runs again the late scripts' leases are
        returned by the next admission, well before they would expire."""
        pid = self.redis.popen.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            out = self.burst([(s, "stop", slow_stream(f"stop-{i}", 0.2))
                              for i, s in enumerate([self.a, self.b] * 30)])
        finally:
            os.kill(pid, signal.SIGCONT)
        self.assertEqual([s for _, s, _ in out], [200] * 60, out)
        for s in (self.a, self.b):
            self.assertTrue(harness.wait_until(
                lambda: s.request("GET", "/healthz").body == b"ok\n", 8.0, 0.1))
        # the late scripts ran once Redis did: their leases are there
        self.assertGreater(int(self.cli("ZCARD", "piapi:lease:stop")), 0)
        # an admission on each instance sends its orphans' returns first
        for s in (self.a, self.b):
            r = s.request("POST", "/piapi/cc/v1/messages", auth_of("stop"),
                          body=slow_stream("stop-after", 0.05), timeout=20)
            self.assertEqual(r.status, 200)
        self.assertTrue(harness.wait_until(
            lambda: self.cli("ZCARD", "piapi:lease:stop") == "0", 2.0),
            self.cli("ZRANGE", "piapi:lease:stop", "0", "-1"))

    def test_4_queued_for_slots_across_instances(self):
        """Requests waiting for a slot retry together (a batch each 50 ms):
        never more than concurrentRequests run across the two instances,
        every one gets its turn, and no lease is left behind."""
        jobs = [(s, "cq", slow_stream(f"cq-{i}", 0.4))
                for i, s in enumerate([self.a, self.b] * 6)]
        got = self.burst(jobs)
        self.assertEqual([s for _, s, _ in got], [200] * 12, got)
        starts = sorted(r["t"] for s in (self.a, self.b) for r in s.mock.requests()
                        if b"cq-" in r["body"])
        self.assertEqual(len(starts), 12)
        # a fourth stream starts only once one of three before it ended
        for i in range(len(starts) - 3):
            self.assertGreater(starts[i + 3] - starts[i], 0.3, starts)
        self.assertTrue(harness.wait_until(
            lambda: self.cli("ZCARD", "piapi:lease:cq") == "0", 3.0))

    def test_5_reload_mid_burst(self):
        """A reload during a burst: one member's requests of a round under
        two config snapshots (two script calls), still exactly
        requestsPerMinute."""
        def reload():
            time.sleep(0.01)
            self.knobs["rl_queue_ms"] = 2000
            for s in (self.a, self.b):
                harness.write_config(s.config_path, s.config_src(s))
                os.kill(s.piapi.pid, signal.SIGHUP)
        t = threading.Thread(target=reload, daemon=True)
        t.start()
        jobs = [(s, "rl", chat(f"rl-{i}")) for i, s in enumerate([self.a, self.b] * 20)]
        got = self.burst(jobs)
        t.join(5)
        self.assertEqual(sorted(s for _, s, _ in got), [200] * 20 + [429] * 20, got)
        for s in (self.a, self.b):   # the reload did happen
            self.assertTrue(harness.wait_until(lambda: Metrics(
                s.request("GET", "/metrics").body.decode()).get(
                "piapi_config_reloads_total", result="success") >= 1, 5.0))

    def test_6_redis_erring_for_a_batch(self):
        """The member's lease key of another type: Redis errs for the
        whole batch, each of its requests falls back to this instance's
        limits (still concurrentRequests on it); the key fixed, shared
        admissions resume and leave no lease behind."""
        key = "piapi:lease:werr"
        self.cli("SET", key, "garbage")
        try:
            got = self.burst([(self.a, "werr", slow_stream(f"werr-{i}", 0.5))
                              for i in range(10)])
            self.assertEqual(sorted(s for _, s, _ in got), [200] * 4 + [429] * 6, got)
            self.assertEqual(self.cli("GET", key), "garbage")
        finally:
            self.cli("DEL", key)
        got = self.burst([(s, "werr", slow_stream(f"werr-ok-{i}", 0.3))
                          for i, s in enumerate([self.a, self.b] * 4)])
        self.assertEqual(sorted(s for _, s, _ in got), [200] * 4 + [429] * 4, got)
        self.assertTrue(harness.wait_until(lambda: self.cli("ZCARD", key) == "0", 3.0))

    def raw_post(self, stack, name, body):
        """A request whose client can leave (close) at any time."""
        c = socket.create_connection(("127.0.0.1", stack.port), timeout=10)
        c.sendall(b"POST /piapi/cc/v1/messages HTTP/1.1\r\nHost: x\r\n" +
                  f"Authorization: Bearer {KEYS[name]}\r\n".encode() +
                  b"Content-Type: application/json\r\nConnection: close\r\n" +
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        return c

    def test_7_waiters_leaving_and_redis_paused_mid_retry(self):
        """B's requests wait for slots A holds, retrying together (one
        batch a round); half of their clients leave, then Redis pauses
        with a retry batch out: the rest are answered (local state), none
        hangs, and once Redis is back no lease is left behind."""
        holders = self.burst([(self.a, "hold", slow_stream(f"hold-{i}", 0.0))
                              for i in range(2)])  # warm: both instances' routes
        self.assertEqual([s for _, s, _ in holders], [200, 200])
        held = []
        ts = [threading.Thread(target=lambda i=i: held.append(self.a.request(
            "POST", "/piapi/cc/v1/messages", auth_of("hold"),
            body=slow_stream(f"hold-long-{i}", 1.2), timeout=20).status), daemon=True)
            for i in range(2)]
        for t in ts:
            t.start()
        self.assertTrue(harness.wait_until(lambda: Metrics(
            self.a.request("GET", "/metrics").body.decode()).get(
            "piapi_user_in_flight", user="hold") == 2, 5.0))
        waiters = [self.raw_post(self.b, "hold", slow_stream(f"hold-w-{i}", 0.1))
                   for i in range(6)]
        time.sleep(0.3)   # all six retry every 50 ms
        for c in waiters[:3]:
            c.close()
        time.sleep(0.1)
        pid = self.redis.popen.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            statuses = []
            for c in waiters[3:]:
                c.settimeout(15)
                head = harness.read_head(c)
                statuses.append(int(head.split(b" ")[1]) if head else None)
                c.close()
        finally:
            os.kill(pid, signal.SIGCONT)
        for t in ts:
            t.join(20)
        self.assertEqual(held, [200, 200])
        self.assertEqual(len(statuses), 3)
        self.assertTrue(all(s in (200, 429) for s in statuses), statuses)
        for s in (self.a, self.b):
            self.assertTrue(harness.wait_until(
                lambda: s.request("GET", "/healthz").body == b"ok\n", 8.0, 0.1))
        time.sleep(0.3)   # the answered ones' streams end
        for s in (self.a, self.b):
            r = s.request("POST", "/piapi/cc/v1/messages", auth_of("hold"),
                          body=slow_stream("hold-after", 0.05), timeout=20)
            self.assertEqual(r.status, 200, r.body)
        self.assertTrue(harness.wait_until(
            lambda: self.cli("ZCARD", "piapi:lease:hold") == "0", 2.0),
            self.cli("ZRANGE", "piapi:lease:hold", "0", "-1", "WITHSCORES"))
        for s in (self.a, self.b):
            self.assertEqual(Metrics(s.request("GET", "/metrics").body.decode()).get(
                "piapi_user_in_flight", user="hold"), 0)


if __name__ == "__main__":
    unittest.main()
