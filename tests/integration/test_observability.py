"""Observability behind real nginx: exact metric values after a
known sequence of requests, /healthz, one JSON log line per request with
every field right, --log-level, --log-file with SIGUSR1 reopen (logrotate),
lifecycle lines, and no key in any log or metrics output.

The metrics are parsed here with a small regex parser, and checked with
`promtool check metrics` when promtool is installed (Debian: prometheus)."""
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import unittest
from pathlib import Path

import harness
from harness import build_request

ALICE = "piapi-user-alice-0bsV9kQ2xW"     # openai / main: cx, oq
BOB = "piapi-user-bob-0bsL4mN8pR"         # anthropic / main: cc
DAVE = "piapi-user-dave-0bsT6yU1iO"       # dead / only: cx (nothing listens)
MEMBER_KEYS = (ALICE, BOB, DAVE)
OPENAI_MAIN = "sk-obs-openai-main-5e2d8c1a9f"
ANTHROPIC_MAIN = "sk-obs-ant-main-3b6f0e7d2c"
DEAD_KEY = "sk-obs-dead-9a4c1e8b7d"
PROVIDER_KEYS = (OPENAI_MAIN, ANTHROPIC_MAIN, DEAD_KEY)
SERVICE_TYPES = {"cx", "oq", "cc", "unknown"}

TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

# Everything every stack of this module wrote (logs) and every /metrics body
# fetched: TestZZNoSecrets greps it at the end of the module.
COLLECTED = []          # (source, text)


def bearer(key):
    return ("Authorization", "Bearer " + key)


def obs_config(stack):
    mock = f"http://127.0.0.1:{stack.mock.port}"
    return {
        "providers": [
            {"name": "openai", "apiKeys": {"main": OPENAI_MAIN},
             "services": [
                 {"type": "cx", "baseUrl": mock + "/codex"},
                 {"type": "oq", "baseUrl": mock + "/q",
                  "auth": {"mode": "query", "name": "api_key"}},
             ]},
            {"name": "anthropic", "apiKeys": {"main": ANTHROPIC_MAIN},
             "services": [{"type": "cc", "baseUrl": mock + "/anthropic",
                           "auth": {"mode": "header", "name": "x-api-key"}}]},
            {"name": "dead", "apiKeys": {"only": DEAD_KEY},
             "services": [{"type": "cx", "baseUrl": f"http://127.0.0.1:{stack.dead_port}/v1"}]},
        ],
        "users": [
            {"name": "alice", "apiKey": ALICE, "providerName": "openai", "providerKeyName": "main"},
            {"name": "bob", "apiKey": BOB, "providerName": "anthropic", "providerKeyName": "main"},
            {"name": "dave", "apiKey": DAVE, "providerName": "dead", "providerKeyName": "only"},
        ],
        "settings": {"connectTimeoutMs": 2000, "headerTimeoutMs": 5000},
    }


# ---------------------------------------------------------------- metrics ----

METRIC_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?\s*$')
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Metrics:
    def __init__(self, text):
        self.text = text
        self.samples = {}       # (name, frozenset(labels)) -> value
        self.bad_lines = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = METRIC_RE.match(line)
            if not m:
                self.bad_lines.append(line)
                continue
            labels = frozenset(LABEL_RE.findall(m.group(2) or ""))
            self.samples[(m.group(1), labels)] = float(m.group(3))

    def get(self, name, **labels):
        """The sample with exactly these labels; 0 when absent."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def series(self, name):
        return {lab: v for (n, lab), v in self.samples.items() if n == name}

    def keys(self):
        return set(self.samples)

    def label_values(self, label):
        return {v for (_, lab) in self.samples for k, v in lab if k == label}


def promtool():
    return shutil.which("promtool")


def retire(stack):
    """Class cleanup: stop the processes (their last lines get written),
    keep every log file's text for the secrets check, then remove the stack."""
    try:
        stack.stop_processes()
        if stack.tmp.exists():
            for p in sorted(stack.tmp.rglob("*")):
                # the mock is the provider: it must see the provider key
                if not p.is_file() or p.name.startswith("mock") or "config" in p.name:
                    continue
                try:
                    COLLECTED.append((str(p), p.read_text(errors="replace")))
                except OSError:
                    pass
    finally:
        stack.stop()


class ObsStack:
    """Mixin: one nginx stack per class, retired (logs collected) at the end."""
    PIAPI_ARGS = ()
    NAME = "obs"

    @classmethod
    def start_stack(cls, extra_args=()):
        s = harness.Stack("nginx", obs_config, piapi_args=["--grace", "2"] + list(cls.PIAPI_ARGS),
                          name=cls.NAME)
        s.piapi_args += [a(s) if callable(a) else a for a in extra_args]
        (s.tmp / "log").mkdir()
        cls.addClassCleanup(retire, s)
        cls.t_started = time.time()
        s.start()
        return s


# ------------------------------------------------------- the main sequence ----

class Req:
    """One request of the sequence and what its log line must say."""

    def __init__(self, name, method, path, headers=(), body=None, status=None, user=None,
                 svc=None, provider=None, key=None, upstream_url=None, error=None,
                 local=False):
        self.name, self.method, self.path = name, method, path
        self.headers, self.body = list(headers), body
        self.want_status, self.user, self.svc, self.provider = status, user, svc, provider
        self.key, self.upstream_url, self.error, self.local = key, upstream_url, error, local
        self.status = self.rid = None
        self.resp_len = 0
        # body bytes sent upstream: only a forwarded request sends any
        self.sent_len = len(body) if body and upstream_url else 0


class TestObservabilityNginx(ObsStack, unittest.TestCase):
    NAME = "obs"

    @classmethod
    def setUpClass(cls):
        cls.stack = cls.start_stack()
        cls.mock_base = f"http://127.0.0.1:{cls.stack.mock.port}"
        cls.reqs = []
        cls.scrapes = {}
        cls.run_sequence()

    # ---- helpers ----

    @classmethod
    def send(cls, r):
        resp = cls.stack.request(r.method, r.path, r.headers, r.body, timeout=10)
        r.status, r.rid, r.resp_len = resp.status, resp.header("X-Request-ID"), len(resp.body)
        r.resp_body = resp.body
        cls.reqs.append(r)
        return resp

    @classmethod
    def local(cls, path, label=None):
        r = Req(label or path, "GET", path, status=200, local=True)
        resp = cls.send(r)
        if path == "/metrics":
            COLLECTED.append((f"/metrics {label}", resp.body.decode(errors="replace")))
            m = Metrics(resp.body.decode())
            if label:
                cls.scrapes[label] = m
            return m
        return resp

    @classmethod
    def run_sequence(cls):
        b = cls.mock_base
        q = "?trace=1&note=hello"
        cls.local("/metrics", "baseline")
        for i, n in enumerate((100, 200, 300)):
            cls.send(Req(f"cx-{i}", "POST", f"/piapi/cx/v1/echo{q}",
                         [bearer(ALICE), ("Content-Type", "application/json")],
                         b"x" * n, 200, "alice", "cx", "openai", "main",
                         f"{b}/codex/v1/echo{q}"))
        cls.send(Req("oq", "GET", "/piapi/oq/v1/models?a=1", [bearer(ALICE)], None, 200,
                     "alice", "oq", "openai", "main", f"{b}/q/v1/models?a=1&api_key=REDACTED"))
        for i in range(2):
            cls.send(Req(f"nokey-{i}", "GET", "/piapi/cx/v1/models", [], None, 401))
        cls.send(Req("nosvc", "POST", "/piapi/cc/v1/messages", [bearer(ALICE)], b"{}", 404,
                     "alice", None, "openai", "main"))
        cls.send(Req("down", "GET", "/piapi/cx/v1/models", [bearer(DAVE)], None, 502,
                     "dave", "cx", "dead", "only",
                     f"http://127.0.0.1:{cls.stack.dead_port}/v1/v1/models", "connect"))
        cls.local("/metrics", "before-random")
        cls.send(Req("random", "GET", "/piapi/zzz-random-123/x", [bearer(ALICE)], None, 404,
                     "alice", None, "openai", "main"))
        cls.local("/metrics", "after-random")
        cls.stream()
        cls.final = cls.final_scrape()

    @classmethod
    def stream(cls):
        """An SSE stream, scraped while it runs and after it ended."""
        path = "/piapi/cx/v1/sse?n=10&interval=0.2"
        req = build_request("GET", path, [bearer(ALICE), ("Accept", "text/event-stream"),
                                          ("Connection", "close")])
        box = {}
        th = threading.Thread(target=lambda: box.setdefault("ex", cls.stack.raw(req, timeout=10)))
        th.start()
        time.sleep(0.7)
        cls.stream_alive_at_scrape = th.is_alive()
        cls.local("/metrics", "mid-stream")
        th.join(10)
        ex = box["ex"]
        r = Req("sse", "GET", path, [bearer(ALICE)], None, 200, "alice", "cx", "openai", "main",
                f"{cls.mock_base}/codex/v1/sse?n=10&interval=0.2")
        r.status, r.rid, r.resp_len = ex.status, ex.header("X-Request-ID"), len(ex.body())
        r.resp_body = ex.body()
        cls.reqs.insert(len(cls.reqs) - 1, r)   # it started before the mid-stream scrape
        # in-flight settles once the stream's thread is done with it
        deadline = time.monotonic() + 1.0
        while True:
            m = cls.local("/metrics", "after-stream")
            if m.get("piapi_requests_in_flight") <= 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)

    @classmethod
    def gateway(cls):
        return [r for r in cls.reqs if not r.local]

    @classmethod
    def expected(cls, local_counted, n_local):
        """Counter deltas between the baseline scrape and a scrape that is
        preceded by n_local local requests (baseline included)."""
        g = cls.gateway()
        local = [r for r in cls.reqs if r.local][:n_local]

        def sv(r):
            return r.svc or "unknown"

        def cls_of(st):
            return f"{st // 100}xx"
        exp = {}

        def add(key, n=1):
            exp[key] = exp.get(key, 0) + n
        for r in g:
            add(("piapi_requests_total", frozenset({("service_type", sv(r)),
                                                    ("status_class", cls_of(r.want_status))})))
            add(("piapi_request_latency_seconds_count", frozenset({("service_type", sv(r))})))
            if r.user:
                add(("piapi_user_requests_total", frozenset({
                    ("user", r.user), ("service_type", sv(r)),
                    ("status_class", cls_of(r.want_status))})))
            add(("piapi_request_bytes_total", frozenset({("service_type", sv(r))})), r.sent_len)
            add(("piapi_response_bytes_total", frozenset({("service_type", sv(r))})), r.resp_len)
            if r.error is None and r.upstream_url:
                add(("piapi_upstream_ttfb_seconds_count",
                     frozenset({("service_type", sv(r)), ("provider", r.provider)})))
            if r.error:
                add(("piapi_upstream_errors_total",
                     frozenset({("provider", r.provider), ("reason", r.error)})))
        if local_counted:
            for r in local:
                add(("piapi_requests_total", frozenset({("service_type", "unknown"),
                                                        ("status_class", "2xx")})))
                add(("piapi_request_latency_seconds_count",
                     frozenset({("service_type", "unknown")})))
                add(("piapi_request_bytes_total", frozenset({("service_type", "unknown")})), 0)
                add(("piapi_response_bytes_total", frozenset({("service_type", "unknown")})),
                    r.resp_len)
        return exp

    COUNTED = ("piapi_requests_total", "piapi_request_latency_seconds_count",
               "piapi_user_requests_total", "piapi_request_bytes_total",
               "piapi_response_bytes_total", "piapi_upstream_ttfb_seconds_count",
               "piapi_upstream_errors_total")

    @classmethod
    def deltas(cls, m):
        base = cls.scrapes["baseline"]
        out = {}
        for key in m.keys() | base.keys():
            if key[0] in cls.COUNTED:
                d = m.samples.get(key, 0.0) - base.samples.get(key, 0.0)
                if d:
                    out[key] = int(d) if d == int(d) else d
        return out

    @classmethod
    def final_scrape(cls):
        """Scrapes until the deltas match one of the two exact models (local
        endpoints counted as service_type "unknown", or not counted at all),
        at most 2 s (a request's metrics are recorded just after its last
        byte left); returns (scrape, model name, expected, deltas)."""
        deadline = time.monotonic() + 2.0
        while True:
            n_before = sum(1 for r in cls.reqs if r.local)
            m = cls.local("/metrics", "final")
            got = cls.deltas(m)
            models = {"local endpoints counted": cls.expected(True, n_before),
                      "local endpoints not counted": cls.expected(False, n_before)}
            for name, exp in models.items():
                exp = {k: v for k, v in exp.items() if v}
                if got == exp:
                    return m, name, exp, got
            if time.monotonic() > deadline:
                return m, None, models["local endpoints counted"], got
            time.sleep(0.05)

    def fmt(self, d):
        return "\n".join(f"  {k[0]}{{{','.join(f'{a}={b!r}' for a, b in sorted(k[1]))}}} = {v}"
                         for k, v in sorted(d.items(), key=lambda kv: (kv[0][0], sorted(kv[0][1]))))

    # ---- metrics ----

    def test_01_sequence_answers(self):
        for r in self.reqs:
            self.assertEqual(r.status, r.want_status, f"{r.name}: {r.method} {r.path}")
            self.assertTrue(r.rid, f"{r.name}: no X-Request-ID")
        self.assertTrue(self.stream_alive_at_scrape, "stream ended before the mid-stream scrape")

    def test_02_counters_exact(self):
        m, model, exp, got = self.final
        if model is None:
            missing = {k: v for k, v in exp.items() if got.get(k, 0) != v}
            extra = {k: v for k, v in got.items() if k not in exp}
            self.fail("counter deltas match neither model.\nexpected (local endpoints counted):\n"
                      f"{self.fmt(exp)}\ngot:\n{self.fmt(got)}\n"
                      f"differing/missing:\n{self.fmt(missing)}\nunexpected:\n{self.fmt(extra)}")
        print(f"\n  metrics model: {model}; {len(exp)} series exact", flush=True)
        # the headline numbers, spelled out
        self.assertEqual(m.get("piapi_upstream_errors_total", provider="dead", reason="connect")
                         - self.scrapes["baseline"].get("piapi_upstream_errors_total",
                                                         provider="dead", reason="connect"), 1)
        self.assertEqual(got[("piapi_requests_total",
                              frozenset({("service_type", "cx"), ("status_class", "2xx")}))], 4)
        self.assertEqual(got[("piapi_requests_total",
                              frozenset({("service_type", "unknown"), ("status_class", "4xx")}))], 4)

    def test_03_histograms_consistent(self):
        m = self.final[0]
        for fam in ("piapi_request_latency_seconds", "piapi_upstream_ttfb_seconds"):
            # the sequence answered upstream requests: both histograms have series
            self.assertTrue(m.series(fam + "_count"), f"no {fam}_count series:\n{m.text[-3000:]}")
            for lab, count in m.series(fam + "_count").items():
                inf = m.samples.get((fam + "_bucket", lab | {("le", "+Inf")}))
                self.assertEqual(inf, count, f"{fam}{dict(lab)}: +Inf bucket != _count")
                buckets = sorted(((float(dict(l)["le"]), v) for (n, l), v in m.samples.items()
                                  if n == fam + "_bucket" and l - {("le", dict(l)["le"])} == lab))
                vals = [v for _, v in buckets]
                self.assertEqual(vals, sorted(vals), f"{fam}{dict(lab)}: buckets not cumulative")
                self.assertGreaterEqual(m.samples.get((fam + "_sum", lab), -1), 0)

    def test_04_random_path_adds_no_label_value(self):
        before, after = self.scrapes["before-random"], self.scrapes["after-random"]
        self.assertEqual(after.keys() - before.keys(), set(),
                         "the random path created new series")
        self.assertNotIn("zzz-random-123", self.final[0].text)
        self.assertLessEqual(self.final[0].label_values("service_type"), SERVICE_TYPES)
        self.assertEqual(after.get("piapi_user_requests_total", user="alice",
                                   service_type="unknown", status_class="4xx")
                         - before.get("piapi_user_requests_total", user="alice",
                                      service_type="unknown", status_class="4xx"), 1)

    def test_05_in_flight_during_stream(self):
        # The stream runs on the event loop: it holds a request slot and
        # counts in flight, but no pool thread stays busy with it.
        mid, after = self.scrapes["mid-stream"], self.scrapes["after-stream"]
        got = (mid.get("piapi_requests_in_flight"), after.get("piapi_requests_in_flight"))
        self.assertEqual(got, (1, 0), "piapi_requests_in_flight (during one stream, after it): "
                         "the /metrics scrape itself must not count")
        for state in ("busy", "idle"):
            self.assertIn(("piapi_pool_threads", frozenset({("state", state)})), mid.keys())
        self.assertGreaterEqual(mid.get("piapi_pool_threads", state="idle"), 1)
        self.assertEqual(mid.get("piapi_pool_threads", state="busy"),
                         after.get("piapi_pool_threads", state="busy"),
                         "a stream on the event loop keeps a pool thread busy")

    def test_06_build_info_and_start_time(self):
        m = self.final[0]
        info = m.series("piapi_build_info")
        self.assertEqual(len(info), 1, info)
        (labels, value), = info.items()
        version = dict(labels).get("version")
        out = subprocess.run([str(self.stack.bin), "--version"], capture_output=True,
                             text=True, timeout=5).stdout
        self.assertTrue(version and version in out, f"build_info version {version!r} vs {out!r}")
        self.assertEqual(value, 1)
        start = m.get("piapi_process_start_time_seconds")
        self.assertTrue(self.t_started - 5 <= start <= time.time(), start)
        self.assertEqual(len(m.series("piapi_config_info")), 1)
        self.assertEqual(m.get("piapi_config_reloads_total", result="failure"), 0)

    def test_07_exposition_parses(self):
        m = self.final[0]
        self.assertEqual(m.bad_lines, [], "unparseable sample lines")
        text = m.text
        self.assertTrue(text.endswith("\n"))
        types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
        for (name, _), _v in m.samples.items():
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            self.assertTrue(name in types or (base in types and types[base] == "histogram"),
                            f"{name} has no # TYPE")
        for name, kind in types.items():
            if kind == "counter":
                self.assertTrue(name.endswith("_total"), name)

    def test_08_promtool_check_metrics(self):
        tool = promtool()
        if not tool:
            self.skipTest("promtool not installed (apt-get install -y prometheus); "
                          "exposition checked by the regex parser only")
        r = subprocess.run([tool, "check", "metrics"], input=self.final[0].text,
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 0, f"promtool check metrics:\n{r.stdout}{r.stderr}")
        self.assertEqual((r.stdout + r.stderr).strip(), "", r.stdout + r.stderr)

    def test_09_healthz(self):
        r = self.stack.request("GET", "/healthz")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.body, b"ok\n")
        self.assertTrue(r.header("X-Request-ID"))

    # ---- logs ----

    def lines(self):
        text = self.stack.piapi_log_text()
        return [l for l in text.splitlines() if l.strip()]

    def test_10_every_log_line_is_json(self):
        lines = self.lines()
        # at least the start-up lines and one line per request of the sequence
        self.assertGreater(len(lines), len(self.reqs), f"only {len(lines)} log lines")
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                self.fail(f"not JSON: {line!r}")
            self.assertIsInstance(rec, dict, line)
            self.assertRegex(rec.get("ts", ""), TS_RE, line)
            self.assertIn(rec.get("level"), ("debug", "info", "warn", "error"), line)
            self.assertIsInstance(rec.get("msg"), str, line)

    def test_11_one_log_line_per_request_with_fields(self):
        recs = [json.loads(l) for l in self.lines()]
        done = [r for r in recs if r.get("msg") == "request completed"]
        for q in self.reqs:
            mine = [r for r in done if r.get("request_id") == q.rid]
            self.assertEqual(len(mine), 1, f"{q.name}: {len(mine)} log lines for {q.rid}")
            rec = mine[0]
            ctx = f"{q.name}: {rec}"
            self.assertRegex(rec["ts"], TS_RE, ctx)
            # probes and scrapes (/healthz, /metrics) are logged at debug
            level = ("debug" if q.local else "info" if q.status < 400
                     else "warn" if q.status < 500 else "error")
            self.assertEqual(rec["level"], level, ctx)
            self.assertEqual(rec["method"], q.method, ctx)
            self.assertEqual(rec["path"], q.path.split("?")[0], ctx)
            self.assertNotIn("?", rec["path"], ctx)
            self.assertEqual(rec["status"], q.status, ctx)
            self.assertIsInstance(rec.get("latency_ms"), (int, float), ctx)
            self.assertGreaterEqual(rec["latency_ms"], 0, ctx)
            self.assertEqual(rec.get("bytes_out"), q.resp_len, ctx)
            if q.local:
                continue
            for f in ("request_id", "method", "path", "user", "service_type", "upstream_provider",
                      "upstream_key", "status", "latency_ms", "bytes_in", "bytes_out"):
                self.assertIn(f, rec, ctx)
            self.assertEqual(rec["user"], q.user, ctx)
            if q.svc:
                self.assertEqual(rec["service_type"], q.svc, ctx)
            else:
                self.assertIn(rec["service_type"], (None, "unknown"), ctx)
            self.assertEqual(rec["upstream_provider"], q.provider, ctx)
            self.assertEqual(rec["upstream_key"], q.key, ctx)
            self.assertEqual(rec.get("upstream_url"), q.upstream_url, ctx)
            self.assertEqual(rec["bytes_in"], q.sent_len, ctx)
            if q.upstream_url and not q.error:
                self.assertIsInstance(rec.get("ttfb_ms"), (int, float), ctx)
                self.assertLessEqual(rec["ttfb_ms"], rec["latency_ms"] + 0.001, ctx)
            if q.error:
                self.assertEqual(rec.get("error"), q.error, ctx)
            else:
                self.assertNotIn("error", rec, ctx)

    def test_12_startup_lines(self):
        recs = [json.loads(l) for l in self.lines()]
        msgs = [r.get("msg") for r in recs]
        self.assertIn("config loaded", msgs)
        self.assertIn("piapi started", msgs)
        self.assertLess(msgs.index("config loaded"), msgs.index("piapi started"))
        loaded = recs[msgs.index("config loaded")]
        self.assertEqual(loaded.get("users"), 3, loaded)
        self.assertRegex(loaded.get("hash", ""), r"^[0-9a-f]{12}$", loaded)
        self.assertEqual([h for (n, lab) in self.final[0].keys() if n == "piapi_config_info"
                          for k, h in lab], [loaded["hash"]])


class TestLogLevelWarn(ObsStack, unittest.TestCase):
    NAME = "obs-warn"
    PIAPI_ARGS = ("--log-level", "warn")   # after the harness's --log-level: wins

    @classmethod
    def setUpClass(cls):
        cls.stack = cls.start_stack()

    def test_warn_filters_info(self):
        s = self.stack
        ok = s.request("GET", "/piapi/cx/v1/echo", [bearer(ALICE)])
        denied = s.request("GET", "/piapi/cx/v1/echo")
        down = s.request("GET", "/piapi/cx/v1/echo", [bearer(DAVE)])
        self.assertEqual((ok.status, denied.status, down.status), (200, 401, 502))
        rec = s.wait_log(lambda r: r.get("request_id") == down.header("X-Request-ID"))
        self.assertTrue(rec, s.piapi_log_text()[-2000:])
        self.assertEqual(rec["level"], "error")
        recs = s.piapi_log()
        self.assertEqual(len(recs), len([l for l in s.piapi_log_text().splitlines() if l.strip()]))
        self.assertEqual([r for r in recs if r.get("level") in ("debug", "info")], [],
                         "info/debug lines written at --log-level warn")
        ids = [r.get("request_id") for r in recs]
        self.assertNotIn(ok.header("X-Request-ID"), ids)
        self.assertIn(denied.header("X-Request-ID"), ids)


class TestLogFileReopen(ObsStack, unittest.TestCase):
    """--log-file PATH, logrotate's rename + SIGUSR1, and the lifecycle lines
    (startup, config loaded/reloaded, shutdown) all in the file."""
    NAME = "obs-file"

    @classmethod
    def setUpClass(cls):
        cls.stack = cls.start_stack(extra_args=["--log-file",
                                                lambda s: str(s.tmp / "log" / "piapi.log")])

    def read(self, p):
        try:
            return [json.loads(l) for l in Path(p).read_text().splitlines() if l.strip()]
        except FileNotFoundError:
            return []

    def by_rid(self, p, rid):
        return [r for r in self.read(p) if r.get("request_id") == rid]

    def wait_rid(self, p, rid, timeout=2.0):
        return harness.wait_until(lambda: self.by_rid(p, rid), timeout, 0.02)

    def test_log_file_sigusr1_and_lifecycle(self):
        s = self.stack
        log = s.tmp / "log" / "piapi.log"
        rotated = s.tmp / "log" / "piapi.log.1"
        first = self.read(log)
        msgs = [r.get("msg") for r in first]
        self.assertIn("config loaded", msgs, first)
        self.assertIn("piapi started", msgs, first)
        self.assertEqual([l for l in s.piapi.stderr_text().splitlines() if l.startswith("{")], [],
                         "JSON lines on stderr despite --log-file")

        # a reload produces its line
        cfg = obs_config(s)
        cfg["settings"]["connectTimeoutMs"] = 2500
        tmp = s.config_path.with_name(".config.yaml.tmp")
        harness.write_config(tmp, cfg)
        os.rename(tmp, s.config_path)
        self.assertTrue(harness.wait_until(
            lambda: [r for r in self.read(log) if r.get("msg") == "config reloaded"], 3.0, 0.05),
            "no 'config reloaded' line in the log file")

        r1 = s.request("GET", "/piapi/cx/v1/echo", [bearer(ALICE)])
        self.assertTrue(self.wait_rid(log, r1.header("X-Request-ID")), "r1 not in the log file")
        os.rename(log, rotated)                       # logrotate: rename ...
        r2 = s.request("GET", "/piapi/cx/v1/echo", [bearer(ALICE)])
        self.assertTrue(self.wait_rid(rotated, r2.header("X-Request-ID")),
                        "before SIGUSR1, lines keep going to the renamed file")
        os.kill(s.piapi.pid, signal.SIGUSR1)          # ... then postrotate
        self.assertTrue(harness.wait_until(log.exists, 2.0, 0.02), "SIGUSR1 did not reopen")
        r3 = s.request("GET", "/piapi/cx/v1/echo", [bearer(BOB)])
        r3b = s.request("GET", "/piapi/cc/v1/messages", [bearer(BOB)], b"{}")
        for r in (r3, r3b):
            rid = r.header("X-Request-ID")
            self.assertTrue(self.wait_rid(log, rid), f"{rid} not in the reopened file")
            self.assertEqual(self.by_rid(rotated, rid), [], "line after SIGUSR1 in the old file")
        self.assertEqual(len(self.by_rid(log, r3.header("X-Request-ID"))), 1)

        # shutdown lines land in the (new) file
        code = s.piapi.stop(timeout=5)
        self.assertEqual(code, 0)
        msgs = [r.get("msg") for r in self.read(log)]
        self.assertIn("shutting down", msgs)
        self.assertIn("piapi stopped", msgs)
        self.assertLess(msgs.index("shutting down"), msgs.index("piapi stopped"))
        for rec in self.read(log) + self.read(rotated):
            self.assertRegex(rec.get("ts", ""), TS_RE, rec)


class TestZZNoSecrets(unittest.TestCase):
    """Runs last in this module (classes run in name order): greps every log
    file, stderr, nginx log and /metrics body the module produced, its own
    stack's included (so it checks something when it runs alone, too)."""

    @staticmethod
    def exercise_own_stack():
        """Requests that carry every member and provider key one way or
        another (Authorization, x-api-key, a query-mode provider key, a
        provider key offered as a member key, a dead upstream), at debug
        level, then the stack is retired (its logs collected)."""
        s = harness.Stack("nginx", obs_config, name="obs-secrets",
                          piapi_args=["--grace", "2", "--log-level", "debug"])
        try:
            s.start()
            json_hdr = ("Content-Type", "application/json")
            answers = [
                s.request("POST", "/piapi/cx/v1/echo", [bearer(ALICE), json_hdr], b'{"a":1}'),
                s.request("GET", "/piapi/oq/v1/models?x=1", [("x-api-key", ALICE)]),
                s.request("POST", "/piapi/cc/v1/messages", [bearer(BOB), json_hdr], b"{}"),
                s.request("GET", "/piapi/cx/v1/models", [bearer(DAVE)]),
                s.request("GET", "/piapi/cx/v1/models", [bearer(OPENAI_MAIN)]),
                s.request("GET", "/piapi/cx/v1/echo?n=1", [bearer(ALICE)]),
            ]
            metrics = s.request("GET", "/metrics")
            COLLECTED.append(("/metrics obs-secrets", metrics.body.decode(errors="replace")))
            return [a.status for a in answers]
        finally:
            retire(s)

    def test_no_key_in_logs_or_metrics(self):
        statuses = self.exercise_own_stack()
        self.assertEqual(statuses, [200, 200, 200, 502, 401, 200])
        self.assertTrue(any("obs-secrets" in src for src, _ in COLLECTED),
                        "this class's own stack left nothing to grep")
        sources = sorted({src.rsplit("/", 1)[-1] if "/" in src else src for src, _ in COLLECTED})
        hits = []
        for src, text in COLLECTED:
            for key in MEMBER_KEYS + PROVIDER_KEYS:
                if key in text:
                    hits.append((src, key[:12] + "..."))
        total = sum(len(t) for _, t in COLLECTED)
        print(f"\n  secrets grep: {len(COLLECTED)} outputs, {total} bytes: {sources}", flush=True)
        self.assertTrue(any("piapi-error.log" in s for s, _ in COLLECTED), "nginx error log missing")
        self.assertTrue(any(s.endswith("piapi.stderr") for s, _ in COLLECTED), "piapi stderr missing")
        self.assertEqual(hits, [], "key values found in logs or metrics")


if __name__ == "__main__":
    unittest.main(verbosity=2)
