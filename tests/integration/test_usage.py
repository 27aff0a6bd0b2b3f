"""Usage accounting behind real nginx (and lighttpd for /usage): exact token
counts and costs from the three API shapes, JSON and SSE, in the log line,
the metrics, the SQLite ledger, `piapi usage` and GET /usage; the injected
stream_options.include_usage and the removed usage chunk; cut streams;
50 concurrent streams across a reload; the ledger across a restart and a
SIGKILL; the pricing section's validation.

The mock provider answers with the usage a test puts in the request body's
"piapi_mock" member (mock_upstream.py), so every expected number here is
written out by hand."""
import base64
import http.client
import json
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
import unittest
from pathlib import Path

import harness
import mock_upstream
from test_observability import Metrics

ALICE = "piapi-user-alice-uS4ge9Xk2m"     # anthropic
BOB = "piapi-user-bob-uS7hq3Lp8z"         # openai
CAROL = "piapi-user-carol-uS1rt6Wn4v"     # openai, injection off
ANT_KEY = "sk-usage-ant-7c1f9e2b4d"
OAI_KEY = "sk-usage-oai-3a8d6f0c5e"

START = {"input_tokens": 1200, "output_tokens": 1,
         "cache_creation_input_tokens": 3000, "cache_read_input_tokens": 5000,
         "cache_creation": {"ephemeral_5m_input_tokens": 1000,
                            "ephemeral_1h_input_tokens": 2000}}
# cumulative, and above message_start's (server tools): the last value wins
DELTA = {"input_tokens": 1250, "output_tokens": 420,
         "cache_creation_input_tokens": 3000, "cache_read_input_tokens": 5000}
ANT_WANT = {"input_tokens": 1250, "output_tokens": 420, "cache_read_tokens": 5000,
            "cache_write_tokens": 3000, "cache_write_1h_tokens": 2000}
# 1250*3 + 420*15 + 5000*0.3 + 1000*3.75 + 2000*6 = 27300 per million
ANT_COST = 0.0273

CHAT_USAGE = {"prompt_tokens": 900, "completion_tokens": 77, "total_tokens": 977,
              "prompt_tokens_details": {"cached_tokens": 600},
              "completion_tokens_details": {"reasoning_tokens": 30}}
CHAT_WANT = {"input_tokens": 300, "output_tokens": 77, "cache_read_tokens": 600,
             "cache_write_tokens": 0}
# 300*1.25 + 77*10 + 600*0.125 = 1220 per million
CHAT_COST = 0.00122

RESP_USAGE = {"input_tokens": 2000, "input_tokens_details": {"cached_tokens": 1500},
              "output_tokens": 300, "output_tokens_details": {"reasoning_tokens": 120},
              "total_tokens": 2300}
RESP_WANT = {"input_tokens": 500, "output_tokens": 300, "cache_read_tokens": 1500,
             "cache_write_tokens": 0}
# 500*1.25 + 300*10 + 1500*0.125 = 3812.5 per million
RESP_COST = 0.0038125

PRICING = [
    {"model": "claude-sonnet-4*", "input": "3.00", "output": "15.00", "cacheRead": "0.30",
     "cacheWrite": "3.75", "cacheWrite1h": "6.00"},
    {"model": "gpt-5*", "input": "1.25", "output": "10.00", "cacheRead": "0.125"},
]


def usage_config(stack, extra_user=False):
    mock = f"http://127.0.0.1:{stack.mock.port}"
    users = [
        {"name": "alice", "apiKey": ALICE, "providerName": "anthropic", "providerKeyName": "main"},
        {"name": "bob", "apiKey": BOB, "providerName": "openai", "providerKeyName": "main"},
        {"name": "carol", "apiKey": CAROL, "providerName": "openai-plain",
         "providerKeyName": "main"},
    ]
    if extra_user:
        users.append({"name": "dave", "apiKey": "piapi-user-dave-uS0000000", "providerName":
                      "openai", "providerKeyName": "main"})
    return {
        "providers": [
            {"name": "anthropic", "apiKeys": {"main": ANT_KEY},
             "services": [{"type": "cc", "baseUrl": mock + "/anthropic",
                           "auth": {"mode": "header", "name": "x-api-key"}}]},
            {"name": "openai", "apiKeys": {"main": OAI_KEY},
             "services": [{"type": "cx", "baseUrl": mock + "/openai"}]},
            {"name": "openai-plain", "apiKeys": {"main": OAI_KEY},
             "services": [{"type": "cx", "baseUrl": mock + "/plain",
                           "usage": {"injectStreamUsage": "false"}}]},
        ],
        "users": users,
        "pricing": PRICING,
        "settings": {"usageDb": "usage.db"},
    }


def sent_body(rec):
    """The body the mock received, as bytes."""
    return base64.b64decode(rec["body_b64"])


def key(k):
    return ("Authorization", "Bearer " + k)


def body(**fields):
    return json.dumps(fields).encode()


def sse_events(raw):
    """The data payloads of an SSE body, in order."""
    out = []
    for block in raw.decode().replace("\r\n", "\n").split("\n\n"):
        data = [ln[5:].lstrip() for ln in block.split("\n") if ln.startswith("data:")]
        if data:
            out.append("\n".join(data))
    return out


class UsageStack:
    FORM = "nginx"

    @classmethod
    def setUpClass(cls):
        cls.stack = harness.Stack(cls.FORM, usage_config, name="usage").start()

    @classmethod
    def tearDownClass(cls):
        cls.stack.stop()

    def call(self, k, path, payload, headers=()):
        r = self.stack.request("POST", path, [key(k), ("Content-Type", "application/json")]
                               + list(headers), body=payload, timeout=20)
        self.assertEqual(r.status, 200, r.body[:300])
        return r

    def line_for(self, r):
        rec = self.stack.completed_line(r)
        self.assertIsNotNone(rec, f"no log line for {r.header('X-Request-ID')}")
        return rec

    def assert_usage(self, rec, want, cost, model, complete=True):
        for k, v in want.items():
            self.assertEqual(rec.get(k), v, f"{k} in {rec}")
        self.assertEqual(rec.get("model"), model)
        self.assertIs(rec.get("usage_complete"), complete)
        if cost is None:
            self.assertNotIn("cost_usd", rec)
        else:
            self.assertAlmostEqual(rec.get("cost_usd"), cost, places=9)

    def metrics(self):
        r = self.stack.request("GET", "/metrics")
        self.assertEqual(r.status, 200)
        return Metrics(r.body.decode())

    def usage_of(self, k):
        r = self.stack.request("GET", "/usage", [key(k)])
        self.assertEqual(r.status, 200, r.body)
        return r.json()

    def ledger_rows(self, rid=None):
        """Rows of the ledger once written (batches go out within ~1 s)."""
        db = self.stack.tmp / "usage.db"

        def rows():
            if not db.exists():
                return None
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
            try:
                con.row_factory = sqlite3.Row
                got = [dict(r) for r in con.execute("SELECT * FROM requests")]
            except sqlite3.Error:
                return None
            finally:
                con.close()
            if rid is not None:
                got = [r for r in got if r["request_id"] == rid]
            return got or None
        got = harness.wait_until(rows, 5.0, 0.1)
        self.assertTrue(got, f"no ledger row (request {rid})")
        return got


class TestUsageShapes(UsageStack, unittest.TestCase):
    """One request per shape; every number checked in every place."""

    def test_01_anthropic_stream_cumulative_delta_and_1h_cache(self):
        r = self.call(ALICE, "/piapi/cc/v1/messages",
                      body(model="claude-sonnet-4-5", stream=True, max_tokens=64,
                           messages=[{"role": "user", "content": "hi"}],
                           piapi_mock={"start_usage": START, "delta_usage": DELTA}))
        self.assertIn(b"event: message_delta", r.body)
        rec = self.line_for(r)
        self.assert_usage(rec, ANT_WANT, ANT_COST, "claude-sonnet-4-5")
        row = self.ledger_rows(r.header("X-Request-ID"))[0]
        self.assertEqual((row["user"], row["service_type"], row["provider"], row["key_name"],
                          row["model"], row["input"], row["output"], row["cache_read"],
                          row["cache_write"], row["cache_write_1h"], row["status"],
                          row["complete"]),
                         ("alice", "cc", "anthropic", "main", "claude-sonnet-4-5", 1250, 420,
                          5000, 3000, 2000, 200, 1))
        self.assertAlmostEqual(row["cost_usd"], ANT_COST, places=9)

    def test_02_anthropic_json(self):
        r = self.call(ALICE, "/piapi/cc/v1/messages",
                      body(model="claude-sonnet-4-5", max_tokens=64, messages=[],
                           piapi_mock={"start_usage": START, "delta_usage": DELTA}))
        self.assertEqual(r.json()["usage"]["output_tokens"], 420)
        # JSON: one usage object, the 1-hour split from its cache_creation
        self.assert_usage(self.line_for(r), ANT_WANT, ANT_COST, "claude-sonnet-4-5")

    def test_03_chat_stream_gets_usage_injected_and_its_chunk_removed(self):
        payload = body(model="gpt-5-mini", stream=True, messages=[{"role": "user", "content": "x"}],
                       piapi_mock={"usage": CHAT_USAGE})
        r = self.call(BOB, "/piapi/cx/chat/completions", payload)
        events = sse_events(r.body)
        self.assertEqual(events[-1], "[DONE]")
        chunks = [json.loads(e) for e in events[:-1]]
        self.assertTrue(chunks)
        for c in chunks:   # a client reading choices[0] of every chunk
            self.assertTrue(c["choices"], f"an empty-choices chunk reached the client: {c}")
            self.assertNotIn("usage", c)
        self.assertIn("PIAPI-MOCK", "".join(c["choices"][0]["delta"].get("content", "")
                                            for c in chunks))
        sent = json.loads(sent_body(self.stack.mock.requests()[-1]))
        self.assertEqual(sent["stream_options"], {"include_usage": True})
        self.assertEqual(sent["messages"], [{"role": "user", "content": "x"}])
        self.assert_usage(self.line_for(r), CHAT_WANT, CHAT_COST, "gpt-5-mini")

    def test_04_chat_stream_client_asked_gets_the_chunk_and_body_untouched(self):
        payload = body(model="gpt-5-mini", stream=True, stream_options={"include_usage": True},
                       messages=[], piapi_mock={"usage": CHAT_USAGE})
        r = self.call(BOB, "/piapi/cx/chat/completions", payload)
        chunks = [json.loads(e) for e in sse_events(r.body)[:-1]]
        self.assertEqual(chunks[-1]["choices"], [])
        self.assertEqual(chunks[-1]["usage"], CHAT_USAGE)
        self.assertEqual(sent_body(self.stack.mock.requests()[-1]), payload)
        self.assert_usage(self.line_for(r), CHAT_WANT, CHAT_COST, "gpt-5-mini")

    def test_04b_stripped_stream_still_arrives_event_by_event(self):
        payload = body(model="gpt-5", stream=True, messages=[],
                       piapi_mock={"usage": CHAT_USAGE, "interval": 0.3})
        ex = self.stack.raw(harness.build_request(
            "POST", "/piapi/cx/chat/completions",
            [key(BOB), ("Content-Type", "application/json")], payload), timeout=20)
        self.assertEqual(ex.status, 200)
        times = []
        for piece in mock_upstream.ANSWER_DELTAS:
            needle = json.dumps({"content": piece}, separators=(",", ":")).encode()
            times.append(ex.arrival_of(needle))
        self.assertNotIn(None, times)
        gaps = [b - a for a, b in zip(times, times[1:])]
        self.assertTrue(all(g > 0.15 for g in gaps), f"deltas bunched up: {gaps}")

    def test_05_chat_json_cached_tokens_are_a_subset(self):
        r = self.call(BOB, "/piapi/cx/chat/completions",
                      body(model="gpt-5", messages=[], piapi_mock={"usage": CHAT_USAGE}))
        self.assertEqual(r.json()["usage"], CHAT_USAGE)
        self.assert_usage(self.line_for(r), CHAT_WANT, CHAT_COST, "gpt-5")

    def test_06_injection_off_leaves_the_body_and_marks_incomplete(self):
        payload = body(model="gpt-5", stream=True, messages=[], piapi_mock={"usage": CHAT_USAGE})
        r = self.call(CAROL, "/piapi/cx/chat/completions", payload)
        self.assertEqual(sent_body(self.stack.mock.requests()[-1]), payload)
        rec = self.line_for(r)
        self.assert_usage(rec, {"input_tokens": 0, "output_tokens": 0}, 0.0, "gpt-5",
                          complete=False)

    def test_07_responses_stream_completed_and_incomplete(self):
        for final in ("completed", "incomplete", "failed"):
            r = self.call(BOB, "/piapi/cx/responses",
                          body(model="gpt-5-codex", stream=True, input="x",
                               piapi_mock={"usage": RESP_USAGE, "final": final}))
            self.assertIn(f"response.{final}".encode(), r.body)
            self.assert_usage(self.line_for(r), RESP_WANT, RESP_COST, "gpt-5-codex")

    def test_08_responses_json(self):
        r = self.call(BOB, "/piapi/cx/responses",
                      body(model="gpt-5-codex", input="x", piapi_mock={"usage": RESP_USAGE}))
        self.assert_usage(self.line_for(r), RESP_WANT, RESP_COST, "gpt-5-codex")

    def test_09_cut_stream_keeps_what_message_start_said(self):
        before = self.metrics().get("piapi_usage_incomplete_total", service_type="cc")
        try:
            self.stack.request("POST", "/piapi/cc/v1/messages",
                               [key(ALICE), ("Content-Type", "application/json")],
                               body=body(model="claude-sonnet-4-5", stream=True, messages=[],
                                         piapi_mock={"start_usage": START, "cut": "after_start"}),
                               timeout=20)
        except (OSError, http.client.HTTPException):
            pass   # the front cuts the client's connection: the stream broke
        rec = self.stack.wait_log(lambda l: l.get("msg") == "request completed" and
                                  l.get("usage_complete") is False and l.get("user") == "alice",
                                  timeout=5)
        self.assertIsNotNone(rec)
        self.assertEqual((rec["input_tokens"], rec["cache_read_tokens"],
                          rec["cache_write_tokens"], rec["cache_write_1h_tokens"]),
                         (1200, 5000, 3000, 2000))
        self.assertEqual(rec["output_tokens"], 0, "never guess the output of a cut stream")
        self.assertEqual(self.metrics().get("piapi_usage_incomplete_total", service_type="cc"),
                         before + 1)
        row = self.ledger_rows(rec["request_id"])[0]
        self.assertEqual((row["complete"], row["input"], row["output"]), (0, 1200, 0))

    def test_10_unpriced_model_counted_without_cost_warned_once(self):
        for _ in range(2):
            r = self.call(ALICE, "/piapi/cc/v1/messages",
                          body(model="mystery-model-1", max_tokens=1, messages=[],
                               piapi_mock={"start_usage": START, "delta_usage": DELTA}))
            self.assert_usage(self.line_for(r), ANT_WANT, None, "mystery-model-1")
        warns = [l for l in self.stack.piapi_log() if l.get("model") == "mystery-model-1" and
                 l.get("msg", "").startswith("model has no price")]
        self.assertEqual(len(warns), 1, warns)

    def test_11_model_from_the_request_when_the_answer_names_none(self):
        r = self.call(ALICE, "/piapi/cc/v1/messages",
                      body(model="claude-sonnet-4-1", max_tokens=1, messages=[],
                           piapi_mock={"start_usage": START, "delta_usage": DELTA,
                                       "answer_model": None}))
        self.assert_usage(self.line_for(r), ANT_WANT, ANT_COST, "claude-sonnet-4-1")

    def test_12_metrics_usage_and_report_agree(self):
        """Every request of this class so far, summed three ways."""
        time.sleep(1.5)   # the ledger's last batch
        m = self.metrics()
        toks = m.series("piapi_tokens_total")
        by_user = {}
        for labels, v in toks.items():
            d = dict(labels)
            by_user.setdefault(d["user"], {}).setdefault(d["kind"], 0)
            by_user[d["user"]][d["kind"]] += v
        for who, k in (("alice", ALICE), ("bob", BOB)):
            u = self.usage_of(k)
            self.assertEqual(u["user"], who)
            for kind in ("input", "output", "cache_read", "cache_write"):
                self.assertEqual(u["month"][kind + "_tokens"], by_user[who].get(kind, 0),
                                 f"{who} {kind}")
                self.assertEqual(u["today"][kind + "_tokens"], u["month"][kind + "_tokens"])
        rep = subprocess.run([str(self.stack.bin), "usage", "--config", str(self.stack.config_path),
                              "--by", "user", "--json"], capture_output=True, text=True, timeout=20)
        self.assertEqual(rep.returncode, 0, rep.stderr)
        groups = {g["group"]: g for g in json.loads(rep.stdout)["groups"]}
        for who, k in (("alice", ALICE), ("bob", BOB)):
            u = self.usage_of(k)["month"]
            g = groups[who]
            self.assertEqual(g["requests"], u["requests"])
            for kind in ("input", "output", "cache_read", "cache_write"):
                self.assertEqual(g[kind], u[kind + "_tokens"], f"report {who} {kind}")
            self.assertAlmostEqual(g["cost_usd"], u["cost_usd"], places=6)
        cost = sum(v for lab, v in m.series("piapi_cost_usd_total").items()
                   if dict(lab)["user"] == "alice")
        self.assertAlmostEqual(cost, self.usage_of(ALICE)["month"]["cost_usd"], places=6)
        table = subprocess.run([str(self.stack.bin), "usage", "--config",
                                str(self.stack.config_path), "--by", "model"],
                               capture_output=True, text=True, timeout=20)
        self.assertEqual(table.returncode, 0, table.stderr)
        self.assertIn("claude-sonnet-4-5", table.stdout)
        self.assertIn("TOTAL", table.stdout)


class TestUsageEndpoint(UsageStack, unittest.TestCase):
    def test_wrong_or_missing_key_is_401(self):
        for hdrs in ([], [key("piapi-user-nobody-123456")], [("x-api-key", "nope-nope-nope")]):
            r = self.stack.request("GET", "/usage", hdrs)
            self.assertEqual(r.status, 401, r.body)
            self.assertEqual(r.json()["error"]["type"], "authentication_error")

    def test_either_header_form_and_zero_to_start(self):
        for hdr in (key(CAROL), ("x-api-key", CAROL)):
            r = self.stack.request("GET", "/usage", [hdr])
            self.assertEqual(r.status, 200)
            u = r.json()
            self.assertEqual(u["user"], "carol")
            self.assertEqual(set(u), {"user", "today", "month"})
            self.assertEqual(u["today"], {"requests": 0, "input_tokens": 0, "output_tokens": 0,
                                          "cache_read_tokens": 0, "cache_write_tokens": 0,
                                          "cost_usd": 0})

    def test_post_is_405(self):
        r = self.stack.request("POST", "/usage", [key(CAROL)], body=b"{}")
        self.assertEqual(r.status, 405)
        self.assertEqual(r.header("Allow"), "GET, HEAD")

    def test_the_member_key_is_never_in_the_answer_or_log(self):
        self.stack.request("GET", "/usage", [key(CAROL)])
        self.assertNotIn(CAROL, self.stack.piapi_log_text())


class TestUsageEndpointLighttpd(UsageStack, unittest.TestCase):
    FORM = "lighttpd-socket"

    def test_usage_is_routed_to_piapi(self):
        r = self.call(ALICE, "/piapi/cc/v1/messages",
                      body(model="claude-sonnet-4-5", max_tokens=1, messages=[],
                           piapi_mock={"start_usage": START, "delta_usage": DELTA}))
        self.line_for(r)
        u = self.usage_of(ALICE)
        self.assertEqual(u["today"]["requests"], 1)
        self.assertEqual(u["today"]["output_tokens"], 420)
        self.assertAlmostEqual(u["today"]["cost_usd"], ANT_COST, places=9)


class TestUsageConcurrentAcrossReload(UsageStack, unittest.TestCase):
    N = 50

    def test_50_streams_across_a_reload_add_up_exactly(self):
        results, errors = [], []

        def one(i):
            try:
                results.append(self.call(
                    ALICE, "/piapi/cc/v1/messages",
                    body(model="claude-sonnet-4-5", stream=True, messages=[], i=i,
                         piapi_mock={"start_usage": START, "delta_usage": DELTA,
                                     "interval": 0.05})))
            except Exception as e:   # noqa: BLE001 - reported below
                errors.append(repr(e))
        threads = [threading.Thread(target=one, args=(i,)) for i in range(self.N)]
        for t in threads[:25]:
            t.start()
        harness.write_config(self.stack.config_path, usage_config(self.stack, extra_user=True))
        for t in threads[25:]:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual(errors, [])
        self.assertEqual(len(results), self.N)
        self.assertTrue(self.stack.wait_log(lambda l: l.get("msg") == "config reloaded", 5))
        u = self.usage_of(ALICE)["today"]
        self.assertEqual(u["requests"], self.N)
        self.assertEqual(u["input_tokens"], self.N * 1250)
        self.assertEqual(u["output_tokens"], self.N * 420)
        self.assertEqual(u["cache_read_tokens"], self.N * 5000)
        self.assertEqual(u["cache_write_tokens"], self.N * 3000)
        self.assertAlmostEqual(u["cost_usd"], self.N * ANT_COST, places=6)
        m = self.metrics()
        self.assertEqual(m.get("piapi_tokens_total", user="alice", service_type="cc",
                               model="claude-sonnet-4-5", kind="output"), self.N * 420)
        self.assertAlmostEqual(m.get("piapi_cost_usd_total", user="alice", service_type="cc",
                                     model="claude-sonnet-4-5"), self.N * ANT_COST, places=6)
        rows = harness.wait_until(lambda: len(self.ledger_rows()) == self.N, 5.0, 0.1)
        self.assertTrue(rows, "every stream has its ledger row")


class TestLedgerSurvives(UsageStack, unittest.TestCase):
    def request_once(self):
        return self.call(ALICE, "/piapi/cc/v1/messages",
                         body(model="claude-sonnet-4-5", max_tokens=1, messages=[],
                              piapi_mock={"start_usage": START, "delta_usage": DELTA}))

    def test_1_restart_restores_the_day_and_month(self):
        for _ in range(3):
            self.request_once()
        self.stack.restart_piapi(signal.SIGTERM)   # a normal stop loses nothing
        u = self.usage_of(ALICE)
        self.assertEqual(u["today"]["requests"], 3)
        self.assertEqual(u["month"]["output_tokens"], 3 * 420)
        self.assertAlmostEqual(u["month"]["cost_usd"], 3 * ANT_COST, places=9)

    def test_2_sigkill_loses_at_most_the_last_second(self):
        before = self.usage_of(ALICE)["today"]["requests"]
        for _ in range(2):
            self.request_once()
        time.sleep(1.5)
        self.stack.restart_piapi(signal.SIGKILL)
        self.assertEqual(self.usage_of(ALICE)["today"]["requests"], before + 2)
        self.assertEqual(len(self.ledger_rows()), before + 2)


class TestPricingConfig(unittest.TestCase):
    """--check-config on bad pricing: the field and line named."""

    def check(self, pricing_yaml):
        text = ("providers:\n  - name: p\n    apiKeys: {k: sk-abcdefgh}\n"
                "    services:\n      - type: cc\n        baseUrl: http://127.0.0.1:9/x\n"
                "users: []\n" + pricing_yaml)
        with tempfile.TemporaryDirectory() as d:
            cfg = Path(d, "config.yaml")
            cfg.write_text(text)
            cfg.chmod(0o600)
            r = subprocess.run([str(harness.piapi_bin()), "--check-config", "--config", str(cfg)],
                               capture_output=True, text=True, timeout=10)
        return r

    def test_negative_price_names_field_and_line(self):
        r = self.check("pricing:\n  - model: gpt-5*\n    input: -1\n    output: 10\n")
        self.assertEqual(r.returncode, 1)
        self.assertIn("config.yaml:10: pricing[0].input", r.stderr)

    def test_star_inside_a_pattern_is_refused(self):
        r = self.check("pricing:\n  - model: gpt*5\n    input: 1\n    output: 10\n")
        self.assertEqual(r.returncode, 1)
        self.assertIn("pricing[0].model", r.stderr)

    def test_missing_output_and_junk_price(self):
        r = self.check("pricing:\n  - model: a\n    input: cheap\n")
        self.assertEqual(r.returncode, 1)
        self.assertIn("pricing[0].input", r.stderr)
        self.assertIn("pricing[0].output", r.stderr)

    def test_valid_pricing_and_usage_db(self):
        r = self.check("pricing:\n  - model: a*\n    input: 0\n    output: 2.5e1\n"
                       "settings:\n  usageDb: u.db\n")
        self.assertEqual(r.returncode, 0, r.stderr)


if __name__ == "__main__":
    unittest.main()
