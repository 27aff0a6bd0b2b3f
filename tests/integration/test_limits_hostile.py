"""Per-member limits against a hostile member and a broken Redis.

The model allow-list must fail closed: a model it cannot read (too long,
not a string, an escape cJSON refuses, a \\u0000) and JSON it cannot read
that an upstream's parser may still take (a byte order mark, UTF-16, a
value followed by more) are refused with 403 and nothing goes upstream;
non-JSON bodies (a multipart upload) still pass. A reload that raises
concurrentRequests gives the new slots to the queue. Redis that never
answers, sleeps (DEBUG SLEEP), lost its scripts (SCRIPT FLUSH) or has no
such database: requests keep flowing on local state without each waiting
out the 50 ms deadline, /healthz says Redis is unreachable, the errors are
counted, and a lease's release is not lost to a NOSCRIPT.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import unittest

import harness

ALICE = "piapi-user-alice-Lh7qX2mZ9wTe"
KEY = "sk-openai-main-Lh7qX2mZ9wTe0123456789"
HA = [("Authorization", "Bearer " + ALICE), ("Content-Type", "application/json")]


def config(limits=None, models=None, settings=None, name="alice"):
    def build(stack):
        user = {"name": name, "apiKey": ALICE, "providerName": "openai",
                "providerKeyName": "main"}
        if models:
            user["models"] = models
        cfg = {
            "providers": [{"name": "openai", "apiKeys": {"main": KEY},
                           "services": [{"type": "cx",
                                         "baseUrl": f"http://127.0.0.1:{stack.mock.port}/v1"}]}],
            "users": [user],
        }
        if limits:
            cfg["limits"] = limits
        if settings:
            cfg["settings"] = settings
        return cfg
    return build


def metric(stack, name):
    text = stack.request("GET", "/metrics").body.decode()
    m = re.search(r"^" + re.escape(name) + r" (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def health(stack):
    return stack.request("GET", "/healthz").body.decode()


class ModelAllowList(unittest.TestCase):
    """Only gpt-5* allowed."""

    @classmethod
    def setUpClass(cls):
        cls.stack = harness.Stack("nginx", config(models=["gpt-5*"]), name="limits-hostile-models")
        cls.addClassCleanup(cls.stack.stop)
        cls.stack.start()

    def send(self, body, headers=HA):
        self.stack.mock.reset()
        r = self.stack.request("POST", "/piapi/cx/chat/completions", headers, body)
        return r, self.stack.mock.requests()

    def refused(self, body):
        r, upstream = self.send(body)
        self.assertEqual(r.status, 403, r.body)
        self.assertEqual(r.json()["type"], "error")
        self.assertEqual(r.json()["error"]["type"], "permission_error")
        self.assertEqual(upstream, [], body[:80])
        self.assertIsNone(r.header("Retry-After"))

    def test_unreadable_model_is_refused(self):
        cases = {
            "longer than 127 bytes": b'{"model":"gpt-4o' + b" " * 200 + b'"}',
            "long with an escape": b'{"model":"gpt-4o\\u0020' + b"x" * 200 + b'"}',
            "lone surrogate": b'{"model":"gpt-4o\\ud800"}',
            "not a string": b'{"model":["gpt-4o"]}',
            "an object": b'{"model":{"id":"gpt-4o"}}',
            "NUL inside": b'{"model":"gpt-5\\u0000-but-not"}',
        }
        for what, body in cases.items():
            with self.subTest(what):
                self.refused(body)

    def test_json_in_disguise_is_refused(self):
        cases = {
            "UTF-8 byte order mark": b'\xef\xbb\xbf{"model":"gpt-4o"}',
            "UTF-16": '{"model":"gpt-4o"}'.encode("utf-16-le"),
            "UTF-16 with BOM": '{"model":"gpt-4o"}'.encode("utf-16"),
            "a value followed by more": b'{"model":"gpt-4o"}{"model":"gpt-5"}',
            "trailing garbage": b'{"model":"gpt-4o"} x',
            "malformed": b'{"model":"gpt-4o",}',
        }
        for what, body in cases.items():
            with self.subTest(what):
                self.refused(body)

    def test_what_held_still_holds(self):
        for body in (b'{"model":"gpt-5","model":"gpt-4o"}', b'{"mod\\u0065l":"gpt-4o"}',
                     b'{"model":"\\u0067pt-4o"}'):
            self.refused(body)
        r, upstream = self.send(b'{"model":"gpt-5-mini"}')
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(len(upstream), 1)
        r, upstream = self.send(b'{"model":"gpt-5\\u002dmini", "messages": []}\n')
        self.assertEqual(r.status, 200, r.body)
        # not JSON at all (a multipart upload): nothing to check, it passes
        multipart = (b"--b0\r\nContent-Disposition: form-data; name=\"file\"; "
                     b"filename=\"a.wav\"\r\n\r\nRIFF....\r\n--b0--\r\n")
        self.stack.mock.reset()
        r = self.stack.request("POST", "/piapi/cx/audio/echo",
                               [("Authorization", "Bearer " + ALICE),
                                ("Content-Type", "multipart/form-data; boundary=b0")], multipart)
        upstream = self.stack.mock.requests()
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(len(upstream), 1)
        self.stack.mock.reset()
        r = self.stack.request("GET", "/piapi/cx/models", HA)
        self.assertEqual(r.status, 200, r.body)


class ReloadRaisesConcurrency(unittest.TestCase):

    def test_raised_limit_serves_the_queue(self):
        stack = harness.Stack("nginx", config(limits={"concurrentRequests": 1, "queueMs": 4000}),
                              name="limits-hostile-reload")
        self.addCleanup(stack.stop)
        stack.start()
        s = socket.create_connection(("127.0.0.1", stack.port))
        self.addCleanup(s.close)
        s.sendall(harness.build_request("GET", "/piapi/cx/sse?n=40&interval=0.1", HA))
        self.assertTrue(s.recv(100))
        got = {}

        def queued(i):
            t0 = time.monotonic()
            r = stack.request("GET", "/piapi/cx/echo", HA, timeout=10)
            got[i] = (r.status, time.monotonic() - t0)
        first = threading.Thread(target=queued, args=(1,))
        first.start()
        time.sleep(0.3)   # queued behind the stream
        harness.write_config(stack.config_path,
                             config(limits={"concurrentRequests": 3, "queueMs": 4000})(stack))
        os.kill(stack.piapi.popen.pid, signal.SIGHUP)
        self.assertTrue(stack.wait_log(lambda r: r.get("msg") == "config reloaded", 3.0))
        queued(2)
        first.join(10)
        self.assertEqual(got[2][0], 200, got)
        self.assertLess(got[2][1], 2.0, got)
        self.assertEqual(got[1][0], 200, got)
        self.assertLess(got[1][1], 2.5, got)


def redis_major():
    try:
        out = subprocess.run(["redis-server", "--version"], capture_output=True,
                             text=True, timeout=5).stdout
        return int(re.search(r"v=(\d+)", out).group(1))
    except (OSError, AttributeError, ValueError):
        return 0


@unittest.skipUnless(shutil.which("redis-server") and shutil.which("redis-cli"),
                     "redis-server not installed")
class BrokenRedis(unittest.TestCase):
    LIMITS = {"concurrentRequests": 1, "queueMs": 0, "requestsPerMinute": 1000}

    def start_redis(self, *extra):
        port = harness.free_port()
        if redis_major() >= 7:
            extra = ("--enable-debug-command", "yes") + extra
        proc = harness.start_redis(port, *extra)
        self.addCleanup(proc.stop)
        return port

    def stack(self, url, name, limits=None, member="alice"):
        st = harness.Stack("nginx", config(limits=limits or self.LIMITS, settings={"redis": url},
                                           name=member), name=name)
        self.addCleanup(st.stop)
        return st.start()

    def post(self, st):
        return st.request("POST", "/piapi/cx/echo", HA, b'{"model":"gpt-5"}').status

    def test_silent_redis_is_unreachable_not_slow(self):
        """A listener that accepts and never answers: not up, so requests
        decide locally at once (before: every request waited out 50 ms and
        counted one error, hiredis kept every call, /healthz said ok)."""
        sock, port = harness.listen_local()
        held = []

        def accept():
            while True:
                try:
                    held.append(sock.accept()[0])
                except OSError:
                    return
        threading.Thread(target=accept, daemon=True).start()
        self.addCleanup(sock.close)
        st = self.stack(f"redis://127.0.0.1:{port}/0", "limits-hostile-silent")
        self.assertTrue(harness.wait_until(lambda: held, 3.0, 0.05))
        got = [self.post(st) for _ in range(20)]
        self.assertEqual(got, [200] * 20)
        self.assertIn("redis: unreachable", health(st))
        self.assertLess(metric(st, "piapi_redis_errors_total"), 10)

    def test_script_flush_loses_no_release(self):
        """SCRIPT FLUSH: the release (fire and forget) got NOSCRIPT and the
        lease stayed, so with concurrentRequests 1 the next request waited
        for it to expire (5 s), past its queueMs. (The release sent again
        may reach Redis just after the next admission: queueMs covers it.)"""
        port = self.start_redis()
        st = self.stack(f"redis://127.0.0.1:{port}/2", "limits-hostile-flush",
                        {"concurrentRequests": 1, "queueMs": 1000,
                         "requestsPerMinute": 1000})
        self.assertTrue(harness.wait_until(lambda: health(st) == "ok\n", 5.0, 0.05))
        self.assertEqual(self.post(st), 200)
        self.assertIn("piapi:rpm:alice", harness.redis_cli(port, "KEYS", "*", db=2))
        for round_ in range(3):
            harness.redis_cli(port, "SCRIPT", "FLUSH")
            got = [self.post(st) for _ in range(4)]
            self.assertEqual(got, [200] * 4, round_)
        self.assertTrue(harness.wait_until(
            lambda: harness.redis_cli(port, "ZCARD", "piapi:lease:alice", db=2).strip() == "0", 2.0, 0.05))
        self.assertEqual(metric(st, "piapi_redis_errors_total"), 0)
        keys = harness.redis_cli(port, "KEYS", "*", db=2) + harness.redis_cli(port, "KEYS", "*")
        self.assertNotIn(ALICE, keys)

    @unittest.skipUnless(redis_major() >= 7 or redis_major() in (5, 6), "redis-server version")
    def test_sleeping_redis(self):
        """DEBUG SLEEP: one request waits its 50 ms, the connection goes and
        the others decide locally at once; Redis awake: shared again, and
        the lease its late script took is given back (concurrentRequests 1,
        queueMs 0: it would refuse the next request until it expired)."""
        port = self.start_redis()
        st = self.stack(f"redis://127.0.0.1:{port}/0", "limits-hostile-sleep")
        self.assertTrue(harness.wait_until(lambda: health(st) == "ok\n", 5.0, 0.05))
        before = metric(st, "piapi_redis_errors_total")
        sleeper = threading.Thread(target=harness.redis_cli, args=(port, "DEBUG", "SLEEP", "2"))
        sleeper.start()
        time.sleep(0.2)
        got = [self.post(st) for _ in range(8)]
        self.assertEqual(got, [200] * 8)
        self.assertIn("redis: unreachable", health(st))
        self.assertLessEqual(metric(st, "piapi_redis_errors_total") - before, 3)
        sleeper.join()
        self.assertTrue(harness.wait_until(lambda: health(st) == "ok\n", 8.0, 0.1), health(st))
        self.assertEqual(self.post(st), 200)
        self.assertIn("piapi:rpm:alice", harness.redis_cli(port, "KEYS", "*"))

    def test_missing_database(self):
        """SELECT 9 on a Redis with 4 databases fails: before, the error was
        ignored and the scripts ran in database 0."""
        port = self.start_redis("--databases", "4")
        st = self.stack(f"redis://127.0.0.1:{port}/9", "limits-hostile-db")
        time.sleep(0.5)
        got = [self.post(st) for _ in range(3)]
        self.assertEqual(got, [200] * 3)
        self.assertEqual(harness.redis_cli(port, "KEYS", "*").strip(), "")
        self.assertIn("redis: unreachable", health(st))
        self.assertGreater(metric(st, "piapi_redis_errors_total"), 0)


    def test_pool_thread_bodies_do_not_double_the_window(self):
        """A body over 64 KiB is read by a pool thread, which decides on
        this instance's own window: before, that window did not count what
        Redis admitted (and Redis did not count it), so one instance let
        2 x requestsPerMinute through by mixing big and small bodies."""
        port = self.start_redis()
        big = b'{"model":"gpt-5","pad":"' + b"a" * 100000 + b'"}'
        small = b'{"model":"gpt-5"}'
        for db, order in ((0, (big,) * 3 + (small,) * 5 + (big,) * 2),
                          (1, (small,) * 3 + (big,) * 5 + (small,) * 2)):
            with self.subTest(first="big" if order[0] is big else "small"):
                st = self.stack(f"redis://127.0.0.1:{port}/{db}", f"limits-hostile-mix{db}",
                                {"requestsPerMinute": 5})
                self.assertTrue(harness.wait_until(lambda: health(st) == "ok\n", 5.0, 0.05))
                got = [st.request("POST", "/piapi/cx/echo", HA, b).status for b in order]
                self.assertEqual(got.count(200), 5, got)
                self.assertEqual(got[:5], [200] * 5, got)
                self.assertEqual(len(st.mock.requests()), 5)
                r = st.request("POST", "/piapi/cx/echo", HA, small)
                self.assertEqual(r.status, 429)
                self.assertEqual(r.json()["error"]["type"], "rate_limit_error")
                self.assertGreaterEqual(int(r.header("Retry-After")), 1)


    def test_long_member_name_spends_on_its_own_keys(self):
        """A member name over 127 bytes was cut short in the counters a
        request's tokens and cost go to, so the admission (whole name)
        never saw them: tokensPerDay and the budgets did not hold across
        instances."""
        port = self.start_redis()
        member = "m" * 140
        st = self.stack(f"redis://127.0.0.1:{port}/0", "limits-hostile-longname",
                        {"tokensPerDay": 100}, member=member)
        self.assertTrue(harness.wait_until(lambda: health(st) == "ok\n", 5.0, 0.05))
        r = st.request("POST", "/piapi/cx/chat/completions", HA,
                       b'{"model":"gpt-5","messages":[{"role":"user","content":"hi"}]}')
        self.assertEqual(r.status, 200, r.body)
        day = time.strftime("%Y%m%d", time.gmtime())
        key = f"piapi:spend:{member}:{day[:6]}"
        self.assertTrue(harness.wait_until(
            lambda: harness.redis_cli(port, "HGET", key, "tokens:" + day[6:]).strip() not in ("", "0"), 2.0, 0.05),
            harness.redis_cli(port, "KEYS", "*"))


if __name__ == "__main__":
    unittest.main()
