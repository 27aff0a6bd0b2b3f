"""Per-member limits behind real nginx: requests per minute, tokens per
day, daily and monthly budgets (also across a restart), the model
allow-list, concurrency with its queue (a waiter admitted when a slot
frees, refused when queueMs runs out, gone when its client leaves); each
refusal a 429 (403 for the model) with the usual JSON error and
Retry-After, counted in the metrics and named in the log line, and never
sent upstream. The mock provider answers with the usage a test puts in the
body's "piapi_mock" member, so every token and dollar here is written out."""
import datetime
import json
import socket
import threading
import time
import unittest

import harness
from test_observability import Metrics

OAI_KEY = "sk-limits-oai-3a8d6f0c5e"
ANT_KEY = "sk-limits-ant-7c1f9e2b4d"
KEYS = {name: f"piapi-user-{name}-lim4x9Tq2" for name in
        ("rpm", "free", "tok", "day", "month", "models", "conc", "noq")}

# gpt-5*: 1.25 USD per million input tokens, 10 per million output
PRICING = [{"model": "gpt-5*", "input": "1.25", "output": "10.00"},
           {"model": "claude-sonnet-4*", "input": "3.00", "output": "15.00"}]
# one request of this usage costs exactly 1.25 USD
MILLION_IN = {"prompt_tokens": 1000000, "completion_tokens": 0, "total_tokens": 1000000}


def limits_config(stack):
    mock = f"http://127.0.0.1:{stack.mock.port}"

    def user(name, provider="openai", **extra):
        return dict({"name": name, "apiKey": KEYS[name], "providerName": provider,
                     "providerKeyName": "main"}, **extra)
    return {
        "providers": [
            {"name": "openai", "apiKeys": {"main": OAI_KEY},
             "services": [{"type": "cx", "baseUrl": mock + "/openai"}]},
            {"name": "anthropic", "apiKeys": {"main": ANT_KEY},
             "services": [{"type": "cc", "baseUrl": mock + "/anthropic",
                           "auth": {"mode": "header", "name": "x-api-key"}}]},
        ],
        # defaults: every member gets 3 a minute unless it says otherwise
        "limits": {"requestsPerMinute": 3},
        "users": [
            user("rpm"),
            user("free", limits={"requestsPerMinute": 0}),      # 0 = no limit
            user("tok", limits={"requestsPerMinute": 0, "tokensPerDay": 1000}),
            user("day", limits={"requestsPerMinute": 0, "dailyBudgetUsd": "2"}),
            user("month", limits={"requestsPerMinute": 0, "monthlyBudgetUsd": "1"}),
            user("models", limits={"requestsPerMinute": 0},
                 models=["claude-sonnet-4*", "gpt-5-mini"]),
            user("conc", "anthropic", limits={"requestsPerMinute": 0,
                                              "concurrentRequests": 2, "queueMs": 8000}),
            user("noq", "anthropic", limits={"requestsPerMinute": 0,
                                             "concurrentRequests": 2, "queueMs": 300}),
        ],
        "pricing": PRICING,
        "settings": {"usageDb": "usage.db"},
    }


def auth(name):
    return [("Authorization", "Bearer " + KEYS[name]), ("Content-Type", "application/json")]


def chat(marker, usage=None, model="gpt-5-mini"):
    doc = {"model": model, "messages": [{"role": "user", "content": marker}]}
    if usage:
        doc["piapi_mock"] = {"usage": usage}
    return json.dumps(doc).encode()


def slow_stream(marker, seconds):
    """An Anthropic stream lasting about `seconds` (four deltas)."""
    return json.dumps({"model": "claude-sonnet-4-5", "stream": True, "max_tokens": 16,
                       "messages": [{"role": "user", "content": marker}],
                       "piapi_mock": {"interval": seconds / 4}}).encode()


def to_utc_midnight():
    now = datetime.datetime.now(datetime.timezone.utc)
    nxt = (now + datetime.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (nxt - now).total_seconds()


def to_next_month():
    now = datetime.datetime.now(datetime.timezone.utc)
    first = now.replace(day=28) + datetime.timedelta(days=4)
    nxt = first.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (nxt - now).total_seconds()


class LimitsStack:
    @classmethod
    def setUpClass(cls):
        cls.stack = harness.Stack("nginx", limits_config, name="limits").start()

    @classmethod
    def tearDownClass(cls):
        cls.stack.stop()

    def post(self, name, path, payload, timeout=20):
        return self.stack.request("POST", path, auth(name), body=payload, timeout=timeout)

    def upstream_saw(self, marker):
        """How many recorded upstream requests carry marker in their body."""
        import base64
        return sum(1 for r in self.stack.mock.requests()
                   if marker.encode() in base64.b64decode(r.get("body_b64") or ""))

    def metrics(self):
        return Metrics(self.stack.request("GET", "/metrics").body.decode())

    def line_for(self, r):
        rec = self.stack.completed_line(r)
        self.assertIsNotNone(rec, f"no log line for {r.header('X-Request-ID')}")
        return rec

    def assert_refused(self, r, limit, word, status=429, retry=None, slack=5):
        """The usual JSON error naming the limit; Retry-After whole seconds
        >= 1 (about `retry` when given); the log line says which limit."""
        self.assertEqual(r.status, status, r.body[:300])
        doc = r.json()
        kind = "rate_limit_error" if status == 429 else "permission_error"
        self.assertEqual(doc["type"], "error")
        self.assertEqual(doc["error"]["type"], kind)
        self.assertIn(word, doc["error"]["message"])
        if status == 429:
            ra = r.header("Retry-After")
            self.assertIsNotNone(ra)
            self.assertRegex(ra, r"^[0-9]+$")
            self.assertGreaterEqual(int(ra), 1)
            self.assertIn(f"resets in {ra} s", doc["error"]["message"])
            if retry is not None:
                self.assertLessEqual(abs(int(ra) - retry), slack, (ra, retry))
        else:
            self.assertIsNone(r.header("Retry-After"))
        rec = self.line_for(r)
        self.assertEqual(rec.get("limit"), limit)
        self.assertEqual(rec.get("status"), status)
        self.assertNotIn("upstream_url", rec)
        return doc


class TestLimits(LimitsStack, unittest.TestCase):

    def test_requests_per_minute_default_refuses_the_fourth(self):
        for i in range(3):
            r = self.post("rpm", "/piapi/cx/chat/completions", chat(f"rpm-{i}"))
            self.assertEqual(r.status, 200, r.body[:200])
        t0 = time.time()
        r = self.post("rpm", "/piapi/cx/chat/completions", chat("rpm-over"))
        self.assert_refused(r, "requests_per_minute", "requestsPerMinute", retry=60, slack=3)
        self.assertLessEqual(int(r.header("Retry-After")), 60 - int(time.time() - t0) + 1)
        self.assertEqual(self.upstream_saw("rpm-over"), 0)
        self.assertEqual(self.metrics().get("piapi_limited_total", user="rpm",
                                            limit="requests_per_minute"), 1)
        # a member's 0 overrides the default: no limit
        for i in range(5):
            r = self.post("free", "/piapi/cx/chat/completions", chat(f"free-{i}"))
            self.assertEqual(r.status, 200)

    def test_tokens_per_day_admits_while_under_then_refuses(self):
        small = {"prompt_tokens": 400, "completion_tokens": 0, "total_tokens": 400}
        big = {"prompt_tokens": 500, "completion_tokens": 200, "total_tokens": 700}
        self.assertEqual(self.post("tok", "/piapi/cx/chat/completions",
                                   chat("tok-1", small)).status, 200)
        # 400 < 1000: admitted, and ends at 1100 (a request is never cut)
        self.assertEqual(self.post("tok", "/piapi/cx/chat/completions",
                                   chat("tok-2", big)).status, 200)
        r = self.post("tok", "/piapi/cx/chat/completions", chat("tok-3", small))
        self.assert_refused(r, "tokens_per_day", "tokensPerDay", retry=to_utc_midnight())
        self.assertEqual(self.upstream_saw("tok-3"), 0)
        got = self.stack.request("GET", "/usage", auth("tok")).json()
        self.assertEqual(got["limits"]["tokensPerDay"], {"limit": 1000, "remaining": 0})

    def test_model_allow_list(self):
        r = self.post("models", "/piapi/cx/chat/completions", chat("m-ok", model="gpt-5-mini"))
        self.assertEqual(r.status, 200)
        r = self.post("models", "/piapi/cx/chat/completions", chat("m-bad", model="gpt-5"))
        doc = self.assert_refused(r, "model", "'gpt-5'", status=403)
        self.assertIn("not allowed", doc["error"]["message"])
        self.assertEqual(self.upstream_saw("m-bad"), 0)
        # a prefix pattern; a request with no model passes
        r = self.post("models", "/piapi/cx/chat/completions",
                      chat("m-prefix", model="claude-sonnet-4-5"))
        self.assertEqual(r.status, 200)
        r = self.stack.request("GET", "/piapi/cx/models", auth("models"))
        self.assertEqual(r.status, 200)
        self.assertEqual(self.metrics().get("piapi_limited_total", user="models",
                                            limit="model"), 1)
        lim = self.stack.request("GET", "/usage", auth("models")).json()["limits"]
        self.assertEqual(lim["models"], ["claude-sonnet-4*", "gpt-5-mini"])


def stream_in_thread(stack, name, marker, seconds, out):
    def run():
        t0 = time.monotonic()
        r = stack.request("POST", "/piapi/cc/v1/messages", auth(name),
                          body=slow_stream(marker, seconds), timeout=30)
        out[marker] = (r, time.monotonic() - t0)
    t = threading.Thread(target=run)
    t.start()
    return t


class TestConcurrency(LimitsStack, unittest.TestCase):

    def wait_in_flight(self, name, n):
        ok = harness.wait_until(lambda: self.metrics().get("piapi_user_in_flight",
                                                           user=name) == n, 5.0, 0.02)
        self.assertTrue(ok, f"{name} never had {n} in flight")

    def test_third_stream_waits_for_a_slot(self):
        out = {}
        threads = [stream_in_thread(self.stack, "conc", f"conc-{i}", 1.2, out)
                   for i in range(2)]
        self.wait_in_flight("conc", 2)
        threads.append(stream_in_thread(self.stack, "conc", "conc-third", 0.2, out))
        for t in threads:
            t.join(30)
        for marker, (r, took) in out.items():
            self.assertEqual(r.status, 200, (marker, r.body[:200]))
            self.assertIn(b"message_stop", r.body)
        # it waited for a slot: about the first streams' time, then its own
        self.assertGreater(out["conc-third"][1], 0.8)
        self.assertEqual(self.upstream_saw("conc-third"), 1)
        m = self.metrics()
        self.assertGreaterEqual(m.get("piapi_queue_wait_seconds_count"), 1)
        self.assertEqual(m.get("piapi_user_in_flight", user="conc"), 0)
        self.assertEqual(m.get("piapi_limited_total", user="conc", limit="concurrency"), 0)

    def test_third_stream_refused_when_queue_ms_runs_out(self):
        out = {}
        threads = [stream_in_thread(self.stack, "noq", f"noq-{i}", 1.5, out) for i in range(2)]
        self.wait_in_flight("noq", 2)
        t0 = time.monotonic()
        r = self.post("noq", "/piapi/cc/v1/messages", slow_stream("noq-third", 0.1))
        took = time.monotonic() - t0
        self.assert_refused(r, "concurrency", "concurrentRequests")
        self.assertGreaterEqual(took, 0.25)   # it waited queueMs (300) first
        self.assertLess(took, 1.2)
        for t in threads:
            t.join(30)
        self.assertEqual(self.upstream_saw("noq-third"), 0)
        self.assertEqual(out["noq-0"][0].status, 200)
        self.assertEqual(self.metrics().get("piapi_limited_total", user="noq",
                                            limit="concurrency"), 1)

    def test_client_leaving_the_queue(self):
        """A waiter whose client gives up leaves the queue: its request never
        goes upstream, and it takes no slot from those after it."""
        out = {}
        threads = [stream_in_thread(self.stack, "conc", f"leave-{i}", 1.5, out)
                   for i in range(2)]
        self.wait_in_flight("conc", 2)
        body = slow_stream("leave-quitter", 0.1)
        raw = harness.build_request("POST", "/piapi/cc/v1/messages", auth("conc"), body)
        s = socket.create_connection(("127.0.0.1", self.stack.port))
        s.sendall(raw)
        time.sleep(0.3)
        s.close()
        rec = self.stack.wait_log(lambda l: l.get("msg") == "request completed" and
                                  l.get("status") == 499 and l.get("user") == "conc",
                                  timeout=3)
        self.assertIsNotNone(rec, "the quitter never left the queue")
        for t in threads:
            t.join(30)
        # the queue is empty: the next request goes straight through
        r = self.post("conc", "/piapi/cc/v1/messages", slow_stream("leave-after", 0.1))
        self.assertEqual(r.status, 200)
        self.assertEqual(self.upstream_saw("leave-quitter"), 0)


class TestBudgets(LimitsStack, unittest.TestCase):

    def test_daily_budget_reached_stays_reached_after_a_restart(self):
        for i in range(2):   # 1.25, then 2.50: admitted while under 2 USD
            r = self.post("day", "/piapi/cx/chat/completions", chat(f"day-{i}", MILLION_IN))
            self.assertEqual(r.status, 200)
        r = self.post("day", "/piapi/cx/chat/completions", chat("day-over", MILLION_IN))
        self.assert_refused(r, "daily_budget", "dailyBudgetUsd", retry=to_utc_midnight())
        m = self.metrics()
        self.assertAlmostEqual(m.get("piapi_user_spend_usd", user="day", period="day"), 2.5)
        # the ledger's batches go out within about a second, then a restart
        time.sleep(1.5)
        self.stack.restart_piapi()
        r = self.post("day", "/piapi/cx/chat/completions", chat("day-after", MILLION_IN))
        self.assert_refused(r, "daily_budget", "dailyBudgetUsd")
        self.assertEqual(self.upstream_saw("day-over") + self.upstream_saw("day-after"), 0)
        lim = self.stack.request("GET", "/usage", auth("day")).json()["limits"]
        self.assertEqual(lim["dailyBudgetUsd"], {"limit": 2.0, "remaining": 0.0})

    def test_monthly_budget(self):
        r = self.post("month", "/piapi/cx/chat/completions", chat("month-0", MILLION_IN))
        self.assertEqual(r.status, 200)
        r = self.post("month", "/piapi/cx/chat/completions", chat("month-1", MILLION_IN))
        self.assert_refused(r, "monthly_budget", "monthlyBudgetUsd", retry=to_next_month())
        self.assertEqual(self.upstream_saw("month-1"), 0)


class TestReload(unittest.TestCase):
    """A reload changes limits for new requests."""

    @classmethod
    def setUpClass(cls):
        cls.stack = harness.Stack("nginx", cls.config, name="limits-reload").start()

    @classmethod
    def tearDownClass(cls):
        cls.stack.stop()

    @staticmethod
    def config(stack, rpm=1, models=None):
        cfg = limits_config(stack)
        cfg["limits"] = {"requestsPerMinute": rpm}
        if models is not None:
            cfg["users"][0]["models"] = models
        return cfg

    def reload(self, **kw):
        def successes():
            m = Metrics(self.stack.request("GET", "/metrics").body.decode())
            return m.get("piapi_config_reloads_total", result="success")
        before = successes()
        harness.write_config(self.stack.config_path, self.config(self.stack, **kw))
        self.assertTrue(harness.wait_until(lambda: successes() > before, 5.0, 0.05))

    def test_limits_follow_the_config(self):
        post = lambda m: self.stack.request("POST", "/piapi/cx/chat/completions", auth("rpm"),
                                            body=chat(m))
        self.assertEqual(post("r-0").status, 200)
        self.assertEqual(post("r-1").status, 429)
        self.reload(rpm=3)      # the window remembers r-0: two more
        self.assertEqual(post("r-2").status, 200)
        self.assertEqual(post("r-3").status, 200)
        self.assertEqual(post("r-4").status, 429)
        self.reload(rpm=0, models=["claude-*"])
        r = post("r-5")
        self.assertEqual(r.status, 403, r.body)
        self.assertIn("gpt-5-mini", r.json()["error"]["message"])


class TestLimitsConfig(unittest.TestCase):

    def check(self, text):
        import subprocess
        import tempfile
        from pathlib import Path
        d = Path(tempfile.mkdtemp(prefix="piapi-limits-cfg-"))
        (d / "c.yaml").write_text(text)
        p = subprocess.run([str(harness.piapi_bin()), "--check-config", "--config",
                            str(d / "c.yaml")], capture_output=True, text=True, timeout=10)
        return p.returncode, p.stdout + p.stderr

    BASE = """providers:
  - name: p
    apiKeys: {main: sk-abcdefgh}
    services:
      - type: cx
        baseUrl: https://api.example.com/v1
"""

    def test_every_bad_field_with_its_line(self):
        rc, out = self.check(self.BASE + """limits:
  requestsPerMinute: -1
  dailyBudgetUsd: lots
  queueMS: 10
users:
  - name: a
    apiKey: piapi-user-a-xxxxxxxx
    providerName: p
    providerKeyName: main
    limits:
      concurrentRequests: 1.5
    models: ["gpt-*-mini", ""]
settings:
  redis: http://127.0.0.1:6379
""")
        self.assertEqual(rc, 1, out)
        for want in ("c.yaml:8: limits.requestsPerMinute: expected an integer",
                     "c.yaml:9: limits.dailyBudgetUsd: expected an amount in USD",
                     "c.yaml:10: limits.queueMS: unknown field; did you mean 'queueMs'?",
                     "c.yaml:17: users[0].limits.concurrentRequests: expected an integer",
                     "c.yaml:18: users[0].models[0]: '*' may only end a model pattern",
                     "c.yaml:18: users[0].models[1]: expected a model name",
                     "c.yaml:20: settings.redis: expected redis://host:port/db"):
            self.assertIn(want, out)

    def test_valid(self):
        rc, out = self.check(self.BASE + """limits:
  concurrentRequests: 8
  queueMs: 10000
  requestsPerMinute: 120
  tokensPerDay: 20000000
  dailyBudgetUsd: 25
  monthlyBudgetUsd: 300.50
users:
  - name: a
    apiKey: piapi-user-a-xxxxxxxx
    providerName: p
    providerKeyName: main
    limits: {requestsPerMinute: 0}
    models: ["claude-sonnet-4*", "gpt-5"]
settings:
  redis: redis://127.0.0.1:6379/0
""")
        self.assertEqual(rc, 0, out)
        self.assertIn("configuration OK", out)


if __name__ == "__main__":
    unittest.main()
