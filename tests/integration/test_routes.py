"""Routes and failover behind real nginx: per-service routes, failover
between candidates before the first byte (each trigger), what never fails
over (a 400, a stream cut after its first event, a client that leaves, a
body too large to hold), cooldowns (Retry-After, every candidate cooling),
the spread strategy, the log line and metrics, a reload that drops a
cooling candidate, --check-config.

One recording mock plays every candidate: each provider's baseUrl is its
own path on it, and its query (mock_fail=..., mock_retry_after=...,
mock_delay=...) says how that candidate misbehaves. Every scenario has its
own providers, so cooldowns of one never touch another."""
import json
import socket
import subprocess
import tempfile
import time
import unittest
from pathlib import Path

import harness
import mock_upstream
from test_observability import Metrics

STATUS_CASES = {"529": "status_529", "429": "status_429", "500": "status_5xx",
                "502": "status_5xx", "503": "status_5xx", "504": "status_5xx"}


def pkey(prov):
    return f"sk-{prov}-secret-91f3"


def member_key(user):
    return f"piapi-user-{user}-7Hq2"


class Routes:
    """Scenario table: user -> (strategy, [(provider, query or None)]);
    a provider's query None means it answers normally."""
    SCENARIOS = {
        **{f"st{code}": ("failover", [(f"st{code}-a", f"mock_fail={code}"),
                                      (f"st{code}-b", None)]) for code in STATUS_CASES},
        "reset": ("failover", [("reset-a", "mock_fail=reset"), ("reset-b", None)]),
        "conn": ("failover", [("conn-a", "DEAD"), ("conn-b", None)]),
        "tls": ("failover", [("tls-a", "TLS"), ("tls-b", None)]),
        "bad": ("failover", [("bad-a", "mock_fail=400"), ("bad-b", None)]),
        "cut": ("failover", [("cut-a", "mock_fail=cut-after-first"), ("cut-b", None)]),
        "ra": ("failover", [("ra-a", "mock_fail=429&mock_retry_after=2"), ("ra-b", None)]),
        "all": ("failover", [("all-a", "mock_fail=429&mock_retry_after=2"),
                             ("all-b", "mock_fail=503&mock_retry_after=5")]),
        "abort": ("failover", [("abort-a", "mock_delay=0.8"), ("abort-b", None)]),
        "spread": ("spread", [("spread-a", None), ("spread-b", None)]),
        "big": ("failover", [("big-a", "mock_fail=529"), ("big-b", None)]),
        "rl": ("failover", [("rl-a", "mock_fail=529"), ("rl-b", None)]),
        "ov": ("failover", [("ov-a", "mock_fail=overloaded"), ("ov-b", None)]),
        "hold": ("failover", [("hold-a", None), ("hold-b", None)]),
    }


def routes_config(stack, drop_rl_a=False):
    mock = f"http://127.0.0.1:{stack.mock.port}"
    providers, users = [], []

    def provider(name, query, types=("cc",)):
        if query == "DEAD":
            base = f"http://127.0.0.1:{stack.dead_port}/{name}"
        elif query == "TLS":
            base = f"https://127.0.0.1:{stack.mock.port}/{name}"   # the mock speaks plain HTTP
        else:
            base = f"{mock}/{name}" + (f"?{query}" if query else "")
        providers.append({"name": name, "apiKeys": {"k": pkey(name)},
                          "services": [{"type": t, "baseUrl": base,
                                        "auth": {"mode": "header", "name": "x-api-key"}}
                                       for t in types]})

    for user, (strategy, cands) in Routes.SCENARIOS.items():
        for prov, query in cands:
            provider(prov, query)
        listed = [{"providerName": p, "providerKeyName": "k"} for p, _ in cands]
        if user == "rl" and drop_rl_a:
            listed = listed[1:]
        route = {"candidates": listed, "strategy": strategy}
        users.append({"name": user, "apiKey": member_key(user),
                      "providerName": cands[-1][0], "providerKeyName": "k",
                      "services": {"cc": {"route": f"r-{user}"}}})
        users[-1]["_route"] = route
    routes = {f"r-{u['name']}": u.pop("_route") for u in users}
    # the seed's flat format, and services: single targets
    provider("flat-cc", None, ("cc", "cx"))
    provider("single-cx", None, ("cx",))
    users.append({"name": "flat", "apiKey": member_key("flat"), "providerName": "flat-cc",
                  "providerKeyName": "k",
                  "services": {"cx": {"providerName": "single-cx", "providerKeyName": "k"}}})
    return {"providers": providers, "routes": routes, "users": users}


class RoutesNginx(unittest.TestCase):
    FORM = "nginx"

    @classmethod
    def setUpClass(cls):
        cls.stack = harness.Stack(cls.FORM, routes_config, name="routes").start()

    @classmethod
    def tearDownClass(cls):
        cls.stack.stop()

    # -- helpers --

    def call(self, user, path="/piapi/cc/big?bytes=3000", body=b'{"model":"m","x":1}',
             headers=(), timeout=15):
        return self.stack.request("POST", path, [("x-api-key", member_key(user)),
                                                 ("Content-Type", "application/json")]
                                  + list(headers), body=body, timeout=timeout)

    def reqs(self, prov):
        return [r for r in self.stack.mock.requests() if r["path"].startswith(f"/{prov}/")]

    def line(self, r):
        rid = r.header("X-Request-ID")
        rec = self.stack.wait_log(lambda l: l.get("msg") == "request completed" and
                                  l.get("request_id") == rid, timeout=5)
        self.assertIsNotNone(rec, f"no log line for {rid}")
        return rec

    def metrics(self):
        return Metrics(self.stack.request("GET", "/metrics").body.decode())

    def assert_failed_over(self, user, a, b, outcome, a_reached=True):
        body = b'{"model":"claude-x","messages":[{"role":"user","content":"' + \
            user.encode() + b'"}]}'
        r = self.call(user, body=body)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.body, mock_upstream.big_content(3000))   # byte-exact, b's answer
        ra, rb = self.reqs(a), self.reqs(b)
        if a_reached:
            # libcurl itself sends once more on a fresh connection when a
            # reused one dies without an answer (reset): still candidate a
            self.assertIn(len(ra), (1, 2) if outcome == "reset" else (1,), ra)
        else:
            self.assertEqual(ra, [])
        self.assertEqual(len(rb), 1, rb)
        got = dict((k.lower(), v) for k, v in rb[0]["headers"])
        self.assertEqual(got["x-api-key"], pkey(b))
        self.assertNotIn(pkey(a), json.dumps([rb[0]["headers"], rb[0]["path"]]))  # never a's key
        self.assertEqual(rb[0]["body"], body)           # the same body, again
        if a_reached:
            self.assertEqual(ra[0]["body"], body)
            self.assertEqual(dict((k.lower(), v) for k, v in ra[0]["headers"])["x-api-key"],
                             pkey(a))
        rec = self.line(r)
        self.assertEqual(rec["attempts"], 2, rec)
        self.assertEqual(rec["candidates"], f"{a}/k:{outcome},{b}/k:ok")
        self.assertEqual(rec["upstream_provider"], b)
        self.assertEqual(rec["upstream_key"], "k")
        self.assertNotIn(pkey(a), self.stack.piapi_log_text())
        return rec

    # -- each trigger fails over --

    def test_status_triggers_fail_over(self):
        for code, outcome in STATUS_CASES.items():
            with self.subTest(status=code):
                self.assert_failed_over(f"st{code}", f"st{code}-a", f"st{code}-b", outcome)
        m = self.metrics()
        self.assertEqual(m.get("piapi_upstream_attempts_total", provider="st529-a", key="k",
                               outcome="status_529"), 1)
        self.assertEqual(m.get("piapi_upstream_attempts_total", provider="st529-b", key="k",
                               outcome="ok"), 1)
        self.assertEqual(m.get("piapi_candidate_cooling", provider="st529-a", key="k"), 1)
        self.assertEqual(m.get("piapi_candidate_cooling", provider="st529-b", key="k"), 0)
        self.assertGreaterEqual(m.get("piapi_failovers_total", service_type="cc"), 6)

    def test_reset_fails_over(self):
        self.assert_failed_over("reset", "reset-a", "reset-b", "reset")

    def test_connect_failure_fails_over(self):
        self.assert_failed_over("conn", "conn-a", "conn-b", "connect", a_reached=False)

    def test_tls_failure_fails_over(self):
        self.assert_failed_over("tls", "tls-a", "tls-b", "tls", a_reached=False)

    def test_first_event_overloaded_fails_over(self):
        body = b'{"model":"claude-x","stream":true,"max_tokens":16,' \
               b'"messages":[{"role":"user","content":"hi"}]}'
        r = self.call("ov", "/piapi/cc/v1/messages", body=body)
        self.assertEqual(r.status, 200)
        self.assertEqual(r.header("Content-Type").split(";")[0], "text/event-stream")
        self.assertNotIn(b"overloaded_error", r.body)
        self.assertIn(b"event: message_start", r.body)
        self.assertIn(mock_upstream.ANSWER_DELTAS[0].encode(), r.body)
        self.assertEqual(len(self.reqs("ov-a")), 1)
        self.assertEqual(len(self.reqs("ov-b")), 1)
        self.assertEqual(self.reqs("ov-b")[0]["body"], body)
        rec = self.line(r)
        self.assertEqual(rec["candidates"], "ov-a/k:overloaded,ov-b/k:ok")
        self.assertEqual(self.metrics().get("piapi_upstream_attempts_total", provider="ov-a",
                                            key="k", outcome="overloaded"), 1)

    def test_held_head_leaves_with_the_first_event(self):
        # a healthy stream through a route that could fail over: the head
        # waits for the first event, then both leave together, and every
        # later event still arrives as it is sent
        raw = self.stack.raw(harness.build_request(
            "POST", "/piapi/cc/sse?n=3&interval=0.4", [("x-api-key", member_key("hold")),
                                                       ("Content-Type", "application/json"),
                                                       ("Connection", "close")],
            b'{}'), timeout=10)
        self.assertEqual(raw.body().count(b"data:"), 4)
        t_head = raw.time_of(0)
        t_first = raw.arrival_of(b'data: {"i":0}')
        t_second = raw.arrival_of(b'data: {"i":1}')
        self.assertGreater(t_head, 0.3)            # held until the first event
        self.assertLess(t_first - t_head, 0.1)     # which left with it
        self.assertGreater(t_second - t_first, 0.25)   # the rest as it comes

    # -- what never fails over --

    def test_400_is_relayed_not_retried(self):
        r = self.call("bad")
        self.assertEqual(r.status, 400)
        self.assertEqual(len(self.reqs("bad-a")), 1)
        self.assertEqual(self.reqs("bad-b"), [])
        rec = self.line(r)
        self.assertEqual(rec["attempts"], 1)
        self.assertEqual(rec["upstream_provider"], "bad-a")

    def test_stream_cut_after_first_event_is_not_retried(self):
        raw = self.stack.raw(harness.build_request(
            "POST", "/piapi/cc/v1/messages", [("x-api-key", member_key("cut")),
                                              ("Content-Type", "application/json")],
            b'{"stream":true}'), timeout=10)
        self.assertIn(b"message_start", raw.body())
        self.assertNotIn(b"0\r\n\r\n", raw.body()[-5:])   # no clean end: cut
        self.assertEqual(len(self.reqs("cut-a")), 1)
        self.assertEqual(self.reqs("cut-b"), [])

    def test_client_abort_leaves_the_candidate_healthy(self):
        req = harness.build_request("POST", "/piapi/cc/echo",
                                    [("x-api-key", member_key("abort")),
                                     ("Content-Type", "application/json")], b'{"a":1}')
        s = socket.create_connection(("127.0.0.1", self.stack.port), timeout=5)
        s.sendall(req)
        time.sleep(0.3)
        s.close()   # before abort-a answers (it waits 0.8 s)
        harness.wait_until(lambda: self.stack.mock.events() and any(
            e.get("path", "").startswith("/abort-a/") for e in self.stack.mock.events()), 3)
        r = self.call("abort", "/piapi/cc/echo")
        self.assertEqual(r.status, 200)
        self.assertEqual(len(self.reqs("abort-a")), 2)   # the next request went to it
        self.assertEqual(self.reqs("abort-b"), [])
        self.assertEqual(self.metrics().get("piapi_candidate_cooling", provider="abort-a",
                                            key="k"), 0)

    def test_large_body_is_not_retried_and_says_why(self):
        big = b'{"pad":"' + b"x" * (12 << 20) + b'"}'
        r = self.call("big", "/piapi/cc/echo", body=big, timeout=30)
        self.assertEqual(r.status, 529)
        self.assertEqual(len(self.reqs("big-a")), 1)
        self.assertEqual(self.reqs("big-b"), [])
        rec = self.line(r)
        self.assertEqual(rec["attempts"], 1)
        self.assertIn("8 MiB", rec.get("failover", ""))

    # -- cooldowns --

    def test_retry_after_keeps_the_candidate_out_then_back(self):
        r = self.call("ra")
        self.assertEqual(r.status, 200)
        t_fail = time.monotonic()
        self.assertEqual(len(self.reqs("ra-a")), 1)
        r = self.call("ra")                       # within its 2 s: straight to b
        self.assertEqual(r.status, 200)
        self.assertEqual(len(self.reqs("ra-a")), 1)
        self.assertEqual(self.line(r)["candidates"], "ra-b/k:ok")
        time.sleep(max(0, t_fail + 2.2 - time.monotonic()))
        r = self.call("ra")                       # back after it
        self.assertEqual(r.status, 200)
        self.assertEqual(len(self.reqs("ra-a")), 2)
        self.assertEqual(len(self.reqs("ra-b")), 3)

    def test_all_cooling_tries_the_soonest(self):
        r = self.call("all")
        self.assertEqual(r.status, 503)           # the last candidate's answer, relayed
        self.assertEqual(r.header("Retry-After"), "5")
        r = self.call("all")
        self.assertEqual(len(self.reqs("all-a")), 2)   # a cools for 2 s, b for 5: a
        self.assertEqual(len(self.reqs("all-b")), 1)
        self.assertEqual(r.status, 429)
        self.assertEqual(r.header("Retry-After"), "2")
        self.assertEqual(self.line(r)["candidates"], "all-a/k:status_429")

    # -- spread --

    def test_spread_keeps_a_session_and_spreads_sessions(self):
        for _ in range(20):
            r = self.call("spread", "/piapi/cc/echo",
                          headers=[("X-Claude-Code-Session-Id", "session-one")])
            self.assertEqual(r.status, 200)
        counts = sorted([len(self.reqs("spread-a")), len(self.reqs("spread-b"))])
        self.assertEqual(counts, [0, 20])
        self.stack.mock.reset()
        for i in range(20):
            self.call("spread", "/piapi/cc/echo",
                      headers=[("X-Claude-Code-Session-Id", f"session-{i}")])
        a, b = len(self.reqs("spread-a")), len(self.reqs("spread-b"))
        self.assertEqual(a + b, 20)
        self.assertGreater(a, 0)
        self.assertGreater(b, 0)

    # -- config --

    def test_flat_format_and_single_targets_route_as_configured(self):
        r = self.call("flat", "/piapi/cc/echo")
        self.assertEqual(r.status, 200)
        r2 = self.call("flat", "/piapi/cx/echo")
        self.assertEqual(r2.status, 200)
        fc, sc = self.reqs("flat-cc"), self.reqs("single-cx")
        self.assertEqual(len(fc), 1)
        self.assertEqual(len(sc), 1)
        self.assertEqual(dict((k.lower(), v) for k, v in sc[0]["headers"])["x-api-key"],
                         pkey("single-cx"))
        self.assertEqual(self.line(r2)["upstream_provider"], "single-cx")
        out = subprocess.run([str(harness.piapi_bin()), "--check-config", "--config",
                              str(self.stack.config_path)], capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("route: user flat, service cc: flat-cc/k\n", out.stdout)
        self.assertIn("route: user flat, service cx: single-cx/k\n", out.stdout)
        self.assertIn("route: user ra, service cc: route r-ra, failover ra-a/k, ra-b/k\n",
                      out.stdout)
        self.assertIn("route: user spread, service cc: route r-spread, spread over "
                      "spread-a/k, spread-b/k\n", out.stdout)

    def test_reload_removing_a_cooling_candidate_drops_its_state(self):
        self.assertEqual(self.call("rl").status, 200)
        self.assertEqual(self.metrics().get("piapi_candidate_cooling", provider="rl-a",
                                            key="k"), 1)

        def reload(drop):
            before = len([l for l in self.stack.piapi_log() if l.get("msg") == "config reloaded"])
            harness.write_config(self.stack.config_path, routes_config(self.stack, drop))
            ok = harness.wait_until(lambda: len([l for l in self.stack.piapi_log()
                                                 if l.get("msg") == "config reloaded"]) > before, 5)
            self.assertTrue(ok, "no reload")

        reload(True)
        self.assertNotIn(("piapi_candidate_cooling", frozenset({("provider", "rl-a"),
                                                                ("key", "k")})),
                         self.metrics().keys())
        reload(False)
        self.assertEqual(self.call("rl").status, 200)
        self.assertEqual(len(self.reqs("rl-a")), 2)   # tried at once: no cooldown left

    def test_config_errors_name_line_and_field(self):
        text = """providers:
  - name: a
    apiKeys: {k: sk-aaaa-1234}
    services:
      - {type: cc, baseUrl: "http://127.0.0.1:1/a"}
  - name: b
    apiKeys: {k: sk-bbbb-1234}
    services:
      - {type: cx, baseUrl: "http://127.0.0.1:1/b"}
routes:
  ha: {candidates: [{providerName: a, providerKeyName: k}, {providerName: b, providerKeyName: k}]}
users:
  - name: u
    apiKey: piapi-user-u-12345
    providerName: a
    providerKeyName: k
    services:
      cc:
        candidates:
          - {providerName: a, providerKeyName: nope}
          - {providerName: b, providerKeyName: k}
        strategy: sideways
      cx: {route: ha}
      zz: {route: missing}
"""
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "c.yaml"
            harness.write_config(p, text)
            out = subprocess.run([str(harness.piapi_bin()), "--check-config", "--config",
                                  str(p)], capture_output=True, text=True)
        self.assertEqual(out.returncode, 1)
        err = out.stderr
        self.assertIn("c.yaml:20: users[0].services.cc.candidates[0].providerKeyName: "
                      "key 'nope' not defined for provider 'a'", err)
        self.assertIn("c.yaml:21: users[0].services.cc.candidates[1].providerName: "
                      "provider 'b' offers no service of type 'cc'", err)
        self.assertIn("c.yaml:22: users[0].services.cc.strategy: unknown strategy "
                      "'sideways'", err)
        self.assertIn("c.yaml:23: users[0].services.cx.route: route 'ha': candidates[0]: "
                      "provider 'a' offers no service of type 'cx'", err)
        self.assertIn("c.yaml:24: users[0].services.zz.route: unknown route 'missing'", err)


class RoutesLighttpd(RoutesNginx):
    """The same behind lighttpd, which streams request bodies to piapi."""
    FORM = "lighttpd-socket"


if __name__ == "__main__":
    unittest.main()
