"""deploy/monitoring/ for real: the alert rules pass `promtool check rules`
and their unit tests (`promtool test rules`, a firing and a quiet case for
every alert), and a real Prometheus (Debian's) scrapes a running piapi
through nginx's /metrics while traffic of every kind goes through it
(answers 2xx, 4xx, an upstream failure, a saturated pool, a good and a bad
config reload). Then every expression of grafana-dashboard.json and of
alerts.rules.yml is evaluated through Prometheus's HTTP API and must return
data, so no panel or alert is silently empty because of a typo.

Grafana's own variables are replaced by concrete values for Prometheus:
$__rate_interval and $__range by 30s (4 x the 1 s scrape interval, as
Grafana derives $__rate_interval; the traffic runs within the last 30 s),
$instance by ".*" (the dashboard's "All"). An alert expression ends in a
threshold comparison, empty while the alert does not fire: it is evaluated
with `bool` added to that comparison, which keeps every series of the
left-hand side (0 or 1).

PIAPI_MONITORING_TRAFFIC_S (default 12) sets how long traffic runs;
PIAPI_MONITORING_SCREENSHOT=FILE.png also renders the dashboard's main
queries on Prometheus's graph page with headless Chromium into FILE
(scripts/monitoring-screenshot.sh does that)."""
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import harness

MON = harness.REPO / "deploy" / "monitoring"
RULES = MON / "alerts.rules.yml"
RULE_TESTS = MON / "alerts.tests.yml"
DASHBOARD = MON / "grafana-dashboard.json"

ALERTS = ("PiapiDown", "PiapiConfigReloadFailing", "PiapiHigh5xxRatio",
          "PiapiUpstreamErrors", "PiapiUpstreamTTFBHigh", "PiapiPoolSaturated",
          "PiapiUsageLedgerErrors")
GRAFANA_VARS = {"$__rate_interval": "30s", "$__range": "30s", "$instance": ".*"}

ALICE = "piapi-user-alice-m0nT7rQ2xW"     # openai: cx
BOB = "piapi-user-bob-m0nL4mN8pR"         # anthropic: cc
DAVE = "piapi-user-dave-m0nT6yU1iO"       # dead (nothing listens): cx

TRAFFIC_S = float(os.environ.get("PIAPI_MONITORING_TRAFFIC_S", "12"))
SCREENSHOT = os.environ.get("PIAPI_MONITORING_SCREENSHOT")


def promtool():
    return shutil.which("promtool")


def need(tc, tool):
    if not shutil.which(tool):
        tc.skipTest(f"{tool} not installed (scripts/install-deps.sh test: prometheus)")


def mon_config(stack, broken=False):
    mock = f"http://127.0.0.1:{stack.mock.port}"
    cfg = {
        "providers": [
            {"name": "openai", "apiKeys": {"main": "sk-mon-openai-5e2d8c1a9f"},
             "services": [{"type": "cx", "baseUrl": mock + "/codex"}]},
            {"name": "anthropic", "apiKeys": {"main": "sk-mon-ant-3b6f0e7d2c"},
             "services": [{"type": "cc", "baseUrl": mock + "/anthropic",
                           "auth": {"mode": "header", "name": "x-api-key"}}]},
            {"name": "dead", "apiKeys": {"only": "sk-mon-dead-9a4c1e8b7d"},
             "services": [{"type": "cx", "baseUrl": f"http://127.0.0.1:{stack.dead_port}/v1"}]},
        ],
        "users": [
            {"name": "alice", "apiKey": ALICE, "providerName": "openai", "providerKeyName": "main"},
            {"name": "bob", "apiKey": BOB, "providerName": "anthropic", "providerKeyName": "main"},
            {"name": "dave", "apiKey": DAVE, "providerName": "dead", "providerKeyName": "only"},
        ],
        # every model the mock names is priced: the cost panels have data
        "pricing": [{"model": "*", "input": "1.5", "output": "6"}],
        "settings": {"connectTimeoutMs": 2000, "headerTimeoutMs": 5000},
    }
    if broken:
        cfg["users"][0]["providerName"] = "nosuchprovider"
    return cfg


# ------------------------------------------------------------ expressions --

def dashboard_targets(dash):
    """[(panel title, expr)] of every panel, rows' nested panels included."""
    out = []

    def walk(panels):
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                out.append((p.get("title", "?"), t.get("expr", "")))
    walk(dash["panels"])
    return out


def grafana_to_promql(expr):
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")


def with_bool(expr):
    """The expression with `bool` after its last top-level comparison (the
    alert threshold), so it returns 0/1 for every series instead of only
    the ones over the threshold. Top level: outside (), {}, [] and quotes."""
    depth, quote, last = 0, None, None
    i = 0
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            for op in COMPARISONS:
                if expr.startswith(op, i):
                    last = (i, op)
                    i += len(op) - 1
                    break
        i += 1
    if last is None:
        return expr
    at = last[0] + len(last[1])
    if re.match(r"\s*bool\b", expr[at:]):
        return expr
    return expr[:at] + " bool" + expr[at:]


# ------------------------------------------------------------- promtool ---

class TestAlertRules(unittest.TestCase):

    def test_promtool_check_rules(self):
        need(self, "promtool")
        r = subprocess.run([promtool(), "check", "rules", RULES], capture_output=True,
                           text=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn(f"SUCCESS: {len(ALERTS)} rules found", r.stdout)

    def test_promtool_test_rules(self):
        need(self, "promtool")
        r = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], capture_output=True,
                           text=True, timeout=60, cwd=MON)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("SUCCESS", r.stdout)

    def test_every_alert_has_a_firing_and_a_quiet_unit_test(self):
        text = RULE_TESTS.read_text()
        names = re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.M)
        self.assertEqual(sorted(names), sorted(ALERTS))
        # each alert_rule_test item: "alertname: X" then "exp_alerts: []" or a list
        cases = re.findall(r"alertname: (\w+)\n\s*exp_alerts:(.*)", text)
        for name in ALERTS:
            kinds = {"quiet" if rest.strip() == "[]" else "firing"
                     for n, rest in cases if n == name}
            self.assertEqual(kinds, {"quiet", "firing"}, name)

    def test_promtool_test_rules_catches_a_broken_rule(self):
        """The unit tests really look at the rules: with one threshold
        changed, they fail."""
        need(self, "promtool")
        tmp = Path(tempfile.mkdtemp(prefix="piapi-it-monrules-", dir="/tmp"))
        try:
            rules = RULES.read_text()
            self.assertIn("> 0.05\n", rules)
            (tmp / RULES.name).write_text(rules.replace("> 0.05\n", "> 0.5\n", 1))
            shutil.copy(RULE_TESTS, tmp / RULE_TESTS.name)
            r = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name],
                               capture_output=True, text=True, timeout=60, cwd=tmp)
            self.assertNotEqual(r.returncode, 0, r.stdout)
            self.assertIn("PiapiHigh5xxRatio", r.stdout + r.stderr)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class TestDashboardFile(unittest.TestCase):

    def setUp(self):
        self.dash = json.loads(DASHBOARD.read_text())

    def test_panels_are_laid_out_and_use_the_datasource_variable(self):
        ids, cells = set(), set()
        vars_ = {v["name"] for v in self.dash["templating"]["list"]}
        self.assertEqual(vars_, {"datasource", "instance"})
        panels = self.dash["panels"]
        self.assertGreaterEqual(len([p for p in panels if p["type"] != "row"]), 15)
        for p in panels:
            self.assertNotIn(p["id"], ids, p["title"])
            ids.add(p["id"])
            g = p["gridPos"]
            self.assertLessEqual(g["x"] + g["w"], 24, p["title"])
            for dx in range(g["w"]):          # no two panels overlap
                for dy in range(g["h"]):
                    cell = (g["x"] + dx, g["y"] + dy)
                    self.assertNotIn(cell, cells, f"{p['title']} overlaps")
                    cells.add(cell)
            if p["type"] == "row":
                continue
            self.assertEqual(p["datasource"], {"type": "prometheus", "uid": "${datasource}"})
            self.assertTrue(p["targets"], p["title"])
            refs = [t["refId"] for t in p["targets"]]
            self.assertEqual(len(refs), len(set(refs)), p["title"])

    def test_every_expression_is_concrete_after_substitution(self):
        exprs = dashboard_targets(self.dash)
        self.assertTrue(exprs)
        for title, expr in exprs:
            self.assertTrue(expr.strip(), title)
            self.assertNotIn("$", grafana_to_promql(expr), f"{title}: unknown Grafana variable")

    def test_with_bool(self):
        self.assertEqual(with_bool('up{job="piapi"} == 0'), 'up{job="piapi"} == bool 0')
        self.assertEqual(with_bool('a{x=~">"} / b > 0.05'), 'a{x=~">"} / b > bool 0.05')
        self.assertEqual(with_bool("histogram_quantile(0.9, x > 1) > 30"),
                         "histogram_quantile(0.9, x > 1) > bool 30")
        self.assertEqual(with_bool("x > bool 3"), "x > bool 3")


class TestComposeProfile(unittest.TestCase):
    """docker-compose.yml's `monitoring` profile: what it mounts exists and
    the provisioning files agree with it (no Docker engine here)."""

    def setUp(self):
        try:
            import yaml
        except ImportError:
            self.skipTest("python3-yaml not importable (apt-get install python3-yaml)")
        self.yaml = yaml
        self.c = yaml.safe_load((harness.REPO / "docker-compose.yml").read_text())["services"]

    def mounts(self, svc):
        out = {}
        for v in self.c[svc]["volumes"]:
            src, dst = v.split(":")[:2]
            out[dst] = src
        return out

    def test_services_in_the_profile_only(self):
        for name in ("prometheus", "grafana"):
            self.assertEqual(self.c[name]["profiles"], ["monitoring"])
        for name in ("piapi", "nginx"):
            self.assertNotIn("profiles", self.c[name])

    def test_prometheus_scrapes_nginx_on_its_loopback(self):
        """In nginx's network namespace 127.0.0.1:9200 is nginx, and the
        snippet admits 127.0.0.1 to /metrics."""
        self.assertEqual(self.c["prometheus"]["network_mode"], "service:nginx")
        self.assertNotIn("ports", self.c["prometheus"])
        snippet = (harness.REPO / "deploy" / "nginx" / "piapi.conf").read_text()
        loc = re.search(r"location = /metrics \{(.*?)\}", snippet, re.S).group(1)
        self.assertIn("allow 127.0.0.1;", loc)
        m = self.mounts("prometheus")
        cfg_file = harness.REPO / m["/etc/prometheus/prometheus.yml"]
        cfg = self.yaml.safe_load(cfg_file.read_text())
        job = cfg["scrape_configs"][0]
        self.assertEqual(job["job_name"], "piapi")          # PiapiDown's up{job="piapi"}
        self.assertEqual(job["static_configs"][0]["targets"], ["127.0.0.1:9200"])
        for rf in cfg["rule_files"]:
            self.assertEqual((harness.REPO / m[rf]).resolve(), RULES.resolve())
        # promtool check config, the rule file's path moved to the repo's
        need(self, "promtool")
        tmp = Path(tempfile.mkdtemp(prefix="piapi-it-moncfg-", dir="/tmp"))
        try:
            text = cfg_file.read_text().replace("/etc/prometheus/alerts.rules.yml", str(RULES))
            (tmp / "prometheus.yml").write_text(text)
            r = subprocess.run([promtool(), "check", "config", tmp / "prometheus.yml"],
                               capture_output=True, text=True, timeout=30)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def test_grafana_provisioning_matches_the_mounts(self):
        m = self.mounts("grafana")
        prov = harness.REPO / m["/etc/grafana/provisioning"]
        ds = self.yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
        url = ds["datasources"][0]["url"]
        listen = [a for a in self.c["prometheus"]["command"] if a.startswith("--web.listen-address=")]
        self.assertEqual(url, "http://nginx:" + listen[0].rsplit(":", 1)[1])
        dp = self.yaml.safe_load((prov / "dashboards" / "piapi.yml").read_text())
        path = dp["providers"][0]["options"]["path"]
        dash = [dst for dst, src in m.items() if dst.startswith(path + "/")]
        self.assertEqual(len(dash), 1)
        self.assertEqual((harness.REPO / m[dash[0]]).resolve(), DASHBOARD.resolve())


# ----------------------------------------------------- live Prometheus ---

class Prometheus:
    """Debian's prometheus on a free loopback port with a temp storage dir,
    scraping piapi through nginx every second and evaluating the rules."""

    def __init__(self, tmp, target_port):
        self.dir = Path(tmp) / "prometheus"
        (self.dir / "data").mkdir(parents=True)
        self.port = harness.free_port()
        cfg = self.dir / "prometheus.yml"
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {json.dumps(str(RULES))}\n"
            "scrape_configs:\n  - job_name: piapi\n    metrics_path: /metrics\n"
            f"    static_configs:\n      - targets: [\"127.0.0.1:{target_port}\"]\n")
        self.proc = harness.Proc("prometheus", [
            "prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.console.templates=/etc/prometheus/consoles",
            "--web.console.libraries=/etc/prometheus/console_libraries",
        ], stderr_path=self.dir / "stderr.log")
        ok = harness.wait_until(self.ready, 20, 0.2)
        if not ok:
            raise harness.HarnessError(f"prometheus not ready:\n{self.proc.stderr_text()[-3000:]}")

    def ready(self):
        if not self.proc.alive():
            return "dead"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def api(self, path, **params):
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                doc = json.loads(r.read())
        except urllib.error.HTTPError as e:    # 400 bad_data: a syntax error
            doc = json.loads(e.read())
        return doc

    def query(self, expr):
        return self.api("query", query=expr)

    def stop(self):
        self.proc.stop(timeout=10)


def bearer(key):
    return ("Authorization", "Bearer " + key)


class TestLivePrometheus(unittest.TestCase):
    """One stack (mock, piapi --threads 1, nginx) and one Prometheus."""

    @classmethod
    def setUpClass(cls):
        if not shutil.which("prometheus"):
            raise unittest.SkipTest("prometheus not installed (scripts/install-deps.sh test)")
        # one request slot: two requests at once make the second wait (saturation)
        cls.stack = harness.Stack("nginx", mon_config, name="monitoring",
                                  piapi_args=["--threads", "1", "--queue-timeout", "5000",
                                              "--grace", "2"])
        cls.addClassCleanup(cls.stack.stop)
        cls.stack.start()
        cls.prom = Prometheus(cls.stack.tmp, cls.stack.port)
        cls.addClassCleanup(cls.prom.stop)
        cls.statuses = {}
        cls.wait_first_scrape()
        cls.drive_traffic()
        if SCREENSHOT:
            cls.screenshot(SCREENSHOT)

    # ---- traffic ----

    @classmethod
    def send(cls, method, path, headers=(), body=None):
        r = cls.stack.request(method, path, list(headers), body, timeout=10)
        cls.statuses[r.status] = cls.statuses.get(r.status, 0) + 1
        return r

    @classmethod
    def one_round(cls, i):
        js = ("Content-Type", "application/json")
        chat = json.dumps({"model": "gpt-x", "messages": [{"role": "user", "content": "hi " * (i % 7)}]})
        cls.send("POST", "/piapi/cx/v1/chat/completions", [bearer(ALICE), js], chat.encode())
        msg = json.dumps({"model": "claude-x", "max_tokens": 16,
                          "messages": [{"role": "user", "content": "hello"}]})
        cls.send("POST", "/piapi/cc/v1/messages", [bearer(BOB), js], msg.encode())
        if i % 2 == 0:
            cls.send("GET", f"/piapi/cx/v1/slow-headers?delay={0.05 * (i % 5)}", [bearer(ALICE)])
            cls.send("GET", "/piapi/cx/v1/status/429", [bearer(ALICE)])      # member 4xx
            cls.send("GET", "/piapi/cx/v1/models")                          # no key: 401
        # connect refused: 502; about 0.1/s over the alert's 5m window
        for _ in range(1 + i % 2):
            cls.send("GET", "/piapi/cx/v1/models", [bearer(DAVE)])

    @classmethod
    def wait_first_scrape(cls):
        """Prometheus applies its scrape targets on a 5 s tick after its
        start, so its first scrape comes seconds after /-/ready. A counter
        first scraped at 1 has no increase() for Prometheus (there is no
        earlier sample): the traffic must start after a scrape of the idle
        piapi, every counter at 0."""
        def scraped():
            res = cls.prom.query("piapi_pool_saturated_total").get("data", {}).get("result", [])
            return res[0]["value"][1] if res else None
        cls.saturated_first_scrape = harness.wait_until(scraped, 30, 0.2)
        if cls.saturated_first_scrape is None:
            raise harness.HarnessError(
                f"prometheus never scraped piapi:\n{cls.prom.proc.stderr_text()[-3000:]}")

    @classmethod
    def saturated_count(cls):
        """piapi_pool_saturated_total read from /metrics now (no slot taken)."""
        r = cls.stack.request("GET", "/metrics", timeout=10)
        m = re.search(rb"^piapi_pool_saturated_total (\d+)$", r.body, re.M)
        assert r.status == 200 and m, (r.status, r.body[:300])
        return int(m.group(1))

    @classmethod
    def saturate(cls):
        """Two requests at once with one slot: the second waits for it.
        Again (3 tries at most) if a loaded machine delayed the second past
        the end of the first, so that it found the slot free."""
        before = cls.saturated_count()
        cls.saturate_tries = 0
        while cls.saturate_tries < 3:
            cls.saturate_tries += 1
            ths = [threading.Thread(target=cls.send, args=(
                       "GET", "/piapi/cx/v1/slow-headers?delay=0.6", [bearer(ALICE)]))
                   for _ in range(2)]
            for t in ths:
                t.start()
                time.sleep(0.1)
            for t in ths:
                t.join(15)
            if cls.saturated_count() > before:
                break

    @classmethod
    def upstream_burst(cls):
        """30 refused connects: over PiapiUpstreamErrors' 0.05/s on its 5m
        window whatever the speed of the rounds."""
        for _ in range(30):
            cls.send("GET", "/piapi/cx/v1/models", [bearer(DAVE)])

    @classmethod
    def reload(cls, broken):
        harness.write_config(cls.stack.config_path, mon_config(cls.stack, broken=broken))

    @classmethod
    def drive_traffic(cls):
        """TRAFFIC_S seconds of requests, with a good reload, a bad one and
        the good config back along the way; then waits for two more scrapes."""
        t0 = time.monotonic()
        events = [(0.25, lambda: cls.saturate()), (0.35, lambda: cls.reload(False)),
                  (0.45, lambda: cls.upstream_burst()),
                  (0.5, lambda: cls.reload(True)), (0.65, lambda: cls.reload(False))]
        i = 0
        while time.monotonic() - t0 < TRAFFIC_S and i < 10000:
            cls.one_round(i)
            i += 1
            if events and time.monotonic() - t0 >= events[0][0] * TRAFFIC_S:
                events.pop(0)[1]()
            time.sleep(0.2)
        for _, ev in events:
            ev()
        cls.rounds = i
        t_end = time.time()
        harness.wait_until(lambda: cls.last_scrape() > t_end + 1, 10, 0.2)

    @classmethod
    def last_scrape(cls):
        doc = cls.prom.query('timestamp(up{job="piapi"})')
        res = doc.get("data", {}).get("result", [])
        return float(res[0]["value"][1]) if res else 0.0

    # ---- checks ----

    def assert_has_data(self, what, expr):
        doc = self.prom.query(expr)
        self.assertEqual(doc.get("status"), "success", f"{what}: {expr}\n{doc}")
        res = doc["data"]["result"]
        if doc["data"]["resultType"] == "scalar":
            res = [{"metric": {}, "value": res}]
        self.assertTrue(res, f"{what}: no data for\n  {expr}")
        values = [float(s["value"][1]) for s in res]
        self.assertTrue(any(not math.isnan(v) for v in values),
                        f"{what}: only NaN for\n  {expr}\n{res}")
        return res

    def test_01_traffic_of_every_kind_went_through(self):
        for st in (200, 401, 429, 502):
            self.assertGreater(self.statuses.get(st, 0), 0, f"no {st}: {self.statuses}")
        up = self.prom.query('up{job="piapi"}')["data"]["result"]
        self.assertEqual([s["value"][1] for s in up], ["1"], "the scrape through nginx fails")
        print(f"\n  monitoring: {self.rounds} traffic rounds, statuses {sorted(self.statuses.items())}, "
              f"pool saturated on try {self.saturate_tries}", flush=True)

    def test_02_every_dashboard_expression_returns_data(self):
        dash = json.loads(DASHBOARD.read_text())
        exprs = dashboard_targets(dash)
        for title, expr in exprs:
            with self.subTest(panel=title):
                self.assert_has_data(f"panel {title!r}", grafana_to_promql(expr))
        # the instance variable: label_values(METRIC, LABEL)
        for v in dash["templating"]["list"]:
            if v["type"] != "query":
                continue
            m = re.fullmatch(r"label_values\((\w+), (\w+)\)", v["query"]["query"])
            self.assertTrue(m, v["query"])
            res = self.assert_has_data(f"variable {v['name']}", m.group(1))
            self.assertTrue(all(m.group(2) in s["metric"] for s in res), res)
        print(f"\n  monitoring: {len(exprs)} dashboard expressions return data", flush=True)

    def test_03_every_alert_expression_returns_data_and_evaluates(self):
        groups = self.prom.api("rules")["data"]["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        self.assertEqual(sorted(rules), sorted(ALERTS))
        for name, r in rules.items():
            with self.subTest(alert=name):
                self.assertEqual(r["health"], "ok", f"{name}: {r.get('lastError')}")
                self.assert_has_data(f"alert {name}", with_bool(r["query"]))

    def test_04_alerts_state_matches_the_traffic(self):
        """A failed reload and a saturation just happened: those alerts
        fire at once; 5xx and upstream errors (their `for` not over yet)
        are pending; piapi is up and its first bytes are fast."""
        # the saturation is the traffic's: Prometheus saw the counter at 0
        # before it and at 1 or more after it
        seen = self.prom.query("piapi_pool_saturated_total[5m]")["data"]["result"]
        self.assertEqual(len(seen), 1, seen)
        values = [v for _, v in seen[0]["values"]]
        self.assertEqual(self.saturated_first_scrape, "0")
        self.assertEqual(values[0], "0", values)
        self.assertGreaterEqual(float(values[-1]), 1, f"{values} after {self.saturate_tries} tries")
        states = {a["labels"]["alertname"]: a["state"] for a in self.prom.api("alerts")["data"]["alerts"]}
        self.assertEqual(states.get("PiapiConfigReloadFailing"), "firing", states)
        self.assertEqual(states.get("PiapiPoolSaturated"), "firing", states)
        self.assertEqual(states.get("PiapiHigh5xxRatio"), "pending", states)
        self.assertEqual(states.get("PiapiUpstreamErrors"), "pending", states)
        self.assertNotIn("PiapiDown", states)
        self.assertNotIn("PiapiUpstreamTTFBHigh", states)
        self.assertNotIn("PiapiUsageLedgerErrors", states)

    def test_05_a_typo_would_show(self):
        """The check above is not vacuous: a misspelt metric has no data."""
        res = self.prom.query("sum(rate(piapi_request_total[30s]))")["data"]["result"]
        self.assertEqual(res, [])

    # ---- screenshot (scripts/monitoring-screenshot.sh) ----

    @classmethod
    def screenshot(cls, out):
        graphs = [
            "sum by (service_type, status_class) (rate(piapi_requests_total[$__rate_interval]))",
            'histogram_quantile(0.95, sum by (service_type, le) (rate(piapi_request_latency_seconds_bucket[$__rate_interval])))',
            'histogram_quantile(0.95, sum by (service_type, provider, le) (rate(piapi_upstream_ttfb_seconds_bucket[$__rate_interval])))',
            "sum by (user) (rate(piapi_user_requests_total[$__rate_interval]))",
            "sum by (provider, reason) (rate(piapi_upstream_errors_total[$__rate_interval]))",
            "sum by (result) (increase(piapi_config_reloads_total[$__rate_interval]))",
        ]
        dash = {e for _, e in dashboard_targets(json.loads(DASHBOARD.read_text()))}
        span = f"{max(1, int(TRAFFIC_S // 60) + 1)}m"
        params = {}
        for i, g in enumerate(graphs):
            # the dashboard's expression, with the instance filter dropped
            assert any(g.replace("[", '{instance=~"$instance"}[', 1) in e or g in e for e in dash), g
            params.update({f"g{i}.expr": grafana_to_promql(g), f"g{i}.tab": "0",
                           f"g{i}.range_input": span, f"g{i}.stacked": "0"})
        url = f"http://127.0.0.1:{cls.prom.port}/graph?" + urllib.parse.urlencode(params)
        chromium = shutil.which("chromium")
        assert chromium, "chromium not installed"
        r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                            "--hide-scrollbars", "--window-size=1280,4600",
                            "--virtual-time-budget=15000", f"--screenshot={out}", url],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and Path(out).exists(), r.stderr[-2000:]
        print(f"\n  monitoring: screenshot {out} of {url}", flush=True)


if __name__ == "__main__":
    unittest.main()
