"""Config hot reload behind real nginx: every way a config file
gets replaced is picked up quickly, invalid edits are refused and counted,
SIGHUP reloads, a deleted file keeps the gateway serving, running streams
keep the snapshot they started with, and 50 reloads under traffic neither
serve a wrong answer nor grow the process.

Reload latencies and memory numbers are printed ("reload latency ...",
"reload stress ...") so they show in the run's output."""
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import threading
import time
import unittest
from pathlib import Path

import harness
from harness import build_request

PROVIDER_KEY = "sk-reload-main-7c1d9e2a4b6f"
ALICE = "piapi-user-alice-R3l0adA1ic3"
BOB = "piapi-user-bob-R3l0adB0bb0b"
SLOT_KEY0 = "piapi-user-slot-R3l0ad000000"   # the key edits replace (sed-friendly)

LATENCY_LIMIT_S = 1.0       # the assertion
LATENCY_TARGET_S = 0.250    # the goal, reported
REPS = 3                    # measurements per edit style

LATENCIES = {}              # style -> [seconds], printed at the end of the class


# --------------------------------------------------------------- helpers ----

def bearer(key):
    return ("Authorization", "Bearer " + key)


def fnv_hash(data):
    """piapi's config hash: FNV-1a 64 over the file's bytes, top 48 bits."""
    h = 0xcbf29ce484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return "%012x" % (h >> 16)


def config_text(mock_port, slot_key=SLOT_KEY0, users=("alice", "bob"), base="/v1",
                fillers=0):
    """The YAML text piapi is given. `slot` is an extra member whose key the
    edits change; `fillers` pads the file with more members (a snapshot leak
    then shows in RSS)."""
    all_users = {
        "alice": ALICE, "bob": BOB,
    }
    cfg = {
        "providers": [
            {"name": "mock",
             "apiKeys": {"main": PROVIDER_KEY},
             "services": [{"type": "cx", "baseUrl": f"http://127.0.0.1:{mock_port}{base}"}]},
        ],
        "users": [{"name": n, "apiKey": all_users[n], "providerName": "mock",
                   "providerKeyName": "main"} for n in users],
        "settings": {"connectTimeoutMs": 2000, "headerTimeoutMs": 5000},
    }
    cfg["users"].append({"name": "slot", "apiKey": slot_key, "providerName": "mock",
                         "providerKeyName": "main"})
    for i in range(fillers):
        cfg["users"].append({"name": f"filler{i:04d}",
                             "apiKey": f"piapi-filler-{i:04d}-0123456789abcdef",
                             "providerName": "mock", "providerKeyName": "main"})
    return harness.to_yaml(cfg) + "\n"


METRIC_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)\s*$')
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text):
    """{name: [(labels dict, value)]} from the text exposition."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = METRIC_RE.match(line)
        if not m:
            continue
        labels = dict(LABEL_RE.findall(m.group(2) or ""))
        out.setdefault(m.group(1), []).append((labels, float(m.group(3))))
    return out


class Metrics:
    def __init__(self, text):
        self.text = text
        self.samples = parse_metrics(text)

    def get(self, name, **labels):
        for lab, v in self.samples.get(name, []):
            if all(lab.get(k) == val for k, val in labels.items()):
                return v
        return 0.0

    def reloads(self):
        return (int(self.get("piapi_config_reloads_total", result="success")),
                int(self.get("piapi_config_reloads_total", result="failure")))

    def config_hashes(self):
        return [lab.get("hash") for lab, _ in self.samples.get("piapi_config_info", [])]

    def reload_ts(self):
        return self.get("piapi_config_last_reload_success_timestamp_seconds")


def scrape(stack):
    r = stack.request("GET", "/metrics", timeout=5)
    if r.status != 200:
        raise AssertionError(f"/metrics answered {r.status}: {r!r}")
    return Metrics(r.body.decode())


def wait_hash(stack, want, timeout=3.0):
    """Waits until piapi_config_info shows exactly `want`; returns the scrape."""
    last = [None]

    def ok():
        m = scrape(stack)
        last[0] = m
        return m if m.config_hashes() == [want] else None
    return harness.wait_until(ok, timeout, 0.02) or last[0]


def wait_reloads(stack, at_least, timeout=3.0):
    """Waits until success+failure >= at_least; returns the last scrape."""
    last = [None]

    def ok():
        m = scrape(stack)
        last[0] = m
        return m if sum(m.reloads()) >= at_least else None
    return harness.wait_until(ok, timeout, 0.02) or last[0]


def write_in_place(path, text):
    """open(O_TRUNC) + write + close on the existing inode."""
    with open(path, "w") as f:
        f.write(text)


def write_rename(path, text):
    tmp = Path(path).with_name(".config.yaml.tmp")
    harness.write_config(tmp, text)
    os.rename(tmp, path)


def log_since(stack, start):
    return stack.piapi_log()[start:]


def wait_log_since(stack, start, pred, timeout=2.0):
    """First log line after the first `start` lines matching pred."""
    def find():
        for rec in log_since(stack, start):
            if pred(rec):
                return rec
        return None
    return harness.wait_until(find, timeout, 0.05)


def settle(stack, quiet=0.35, timeout=3.0):
    """Waits until the reload counters stop moving for `quiet` seconds (a
    pending debounced check has run); returns the last scrape."""
    deadline = time.monotonic() + timeout
    m = scrape(stack)
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        n = scrape(stack)
        if n.reloads() != m.reloads():
            m, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return n
    return m


def status_of(stack, key, path="/piapi/cx/echo"):
    return stack.request("GET", path, [bearer(key)], timeout=5).status


# ----------------------------------------------------------- edit styles ----

class ReloadBase:
    """One nginx stack per class; the config is YAML text we control byte for
    byte, so the expected piapi_config_info hash is known."""
    STACK_NAME = "reload"

    @classmethod
    def setUpClass(cls):
        cls.stack = harness.Stack("nginx", lambda s: config_text(s.mock.port),
                                  piapi_args=["--grace", "2"], name=cls.STACK_NAME)
        cls.prepare(cls.stack)
        cls.addClassCleanup(cls.stack.stop)
        cls.stack.start()
        cls.port = cls.stack.mock.port
        cls.slot_key = SLOT_KEY0

    @classmethod
    def prepare(cls, stack):
        pass

    def text(self, **kw):
        kw.setdefault("slot_key", self.slot_key)
        return config_text(self.port, **kw)

    def make_live(self, text):
        """Puts `text` in place (rename, unless the file already holds it),
        waits until piapi serves it and the watcher has gone quiet."""
        try:
            same = Path(self.stack.config_path).read_text() == text
        except OSError:
            same = False
        if not same:
            write_rename(self.stack.config_path, text)
        m = wait_hash(self.stack, fnv_hash(text.encode()))
        settle(self.stack)
        self.assertEqual(m.config_hashes(), [fnv_hash(text.encode())],
                         "baseline config not live:\n" + self.stack.piapi_log_text()[-2000:])
        return m

    def measure(self, style, commit, new_key, old_key):
        """Runs commit() (the write) and polls with new_key until a request
        is served with the new config. Returns seconds."""
        t0 = time.monotonic()
        commit()
        t_written = time.monotonic()
        polls = 0
        while True:
            st = status_of(self.stack, new_key)
            polls += 1
            if st == 200:
                break
            self.assertEqual(st, 401, f"{style}: poll answered {st}")
            if time.monotonic() - t0 > 3.0:
                self.fail(f"{style}: new key not live 3 s after the write\n"
                          + self.stack.piapi_log_text()[-2000:])
            time.sleep(0.005)
        lat = time.monotonic() - t0
        LATENCIES.setdefault(style, []).append(lat)
        print(f"\n  reload latency {style}: {lat * 1000:.0f} ms "
              f"(write took {(t_written - t0) * 1000:.0f} ms, {polls} polls)", flush=True)
        self.assertEqual(status_of(self.stack, old_key), 401, f"{style}: old key still works")
        self.assertEqual(status_of(self.stack, ALICE), 200, f"{style}: alice broken")
        self.assertLess(lat, LATENCY_LIMIT_S, f"{style}: reload took {lat * 1000:.0f} ms")
        return lat

    @classmethod
    def tearDownClass(cls):
        lines = []
        for style, vals in LATENCIES.items():
            if getattr(cls, "STYLES", None) and style not in cls.STYLES:
                continue
            ms = [round(v * 1000) for v in vals]
            lines.append(f"  reload latency {style}: {ms} ms, median "
                         f"{statistics.median(ms):.0f} ms (target < {LATENCY_TARGET_S * 1000:.0f} ms)")
        if lines:
            print("\n" + "\n".join(lines), flush=True)


class TestReloadNginx(ReloadBase, unittest.TestCase):
    STYLES = ("in-place", "rename", "sed -i", "recreate")

    def setUp(self):
        self.make_live(self.text())

    def _styled(self, style, commit_for):
        for i in range(REPS):
            old = self.slot_key
            new = f"piapi-user-slot-{style[:3].replace(' ', '')}{i:02d}{int(time.time() * 1000) % 10**6:06d}"
            new_text = self.text(slot_key=new)
            self.measure(style, commit_for(old, new, new_text), new, old)
            type(self).slot_key = new

    def test_01_in_place_write(self):
        self._styled("in-place",
                     lambda old, new, text: lambda: write_in_place(self.stack.config_path, text))

    def test_02_temp_and_rename(self):
        self._styled("rename",
                     lambda old, new, text: lambda: write_rename(self.stack.config_path, text))

    def test_03_sed_in_place(self):
        def commit_for(old, new, _text):
            def commit():
                subprocess.run(["sed", "-i", f"s/{old}/{new}/", str(self.stack.config_path)],
                               check=True, timeout=5)
            return commit
        self._styled("sed -i", commit_for)

    def test_04_invalid_edit_refused(self):
        stack = self.stack
        good = self.text()
        before = scrape(stack)
        ok0, fail0 = before.reloads()
        nlog = len(stack.piapi_log())
        # the second user (bob, users[1]) names a key the provider lacks
        lines = good.split("\n")
        idx = [i for i, l in enumerate(lines) if "providerKeyName" in l][1]
        lines[idx] = lines[idx].replace('"main"', '"nope"')
        bad = "\n".join(lines)
        self.assertNotEqual(bad, good)
        write_rename(stack.config_path, bad)
        m = wait_reloads(stack, ok0 + fail0 + 1)
        time.sleep(0.4)            # a second (double-counted) attempt would show now
        m = scrape(stack)
        self.assertEqual(m.reloads(), (ok0, fail0 + 1),
                         "an invalid edit must count exactly one failure and no success")
        self.assertEqual(m.config_hashes(), before.config_hashes(), "live hash changed")
        self.assertEqual(m.reload_ts(), before.reload_ts(), "success timestamp moved")
        recs = [r for r in log_since(stack, nlog) if r.get("msg") == "config reload failed"]
        self.assertEqual(len(recs), 1, log_since(stack, nlog))
        want = (f"{stack.config_path}:{idx + 1}: users[1].providerKeyName: "
                f"key 'nope' not defined for provider 'mock'")
        self.assertEqual(recs[0].get("error"), want, recs[0])
        self.assertEqual(recs[0].get("level"), "error", recs[0])
        for key in (ALICE, BOB, PROVIDER_KEY):
            self.assertNotIn(key, json.dumps(recs[0]))
        # old routes keep working
        self.assertEqual(status_of(stack, ALICE), 200)
        self.assertEqual(status_of(stack, BOB), 200)
        # a YAML syntax error names its line too
        nlog = len(stack.piapi_log())
        broken = good + "users: [\n"
        write_rename(stack.config_path, broken)
        m = wait_reloads(stack, ok0 + fail0 + 2)
        self.assertEqual(m.reloads(), (ok0, fail0 + 2))
        rec = wait_log_since(stack, nlog, lambda r: r.get("msg") == "config reload failed")
        self.assertTrue(rec, "no log line for the syntax error")
        self.assertRegex(rec.get("error", ""), r"^%s:\d+: " % re.escape(str(stack.config_path)), rec)
        self.assertEqual(status_of(stack, ALICE), 200)

    def test_05_valid_edit_counts_success_and_moves_hash(self):
        stack = self.stack
        before = scrape(stack)
        ok0, fail0 = before.reloads()
        ts0 = before.reload_ts()
        new_key = "piapi-user-slot-R3l0advalid5"
        text = self.text(slot_key=new_key)
        want = fnv_hash(text.encode())
        self.assertNotEqual(before.config_hashes(), [want])
        time.sleep(0.01)
        write_rename(stack.config_path, text)
        m = wait_hash(stack, want)
        self.assertEqual(m.config_hashes(), [want], "piapi_config_info did not move to the new hash")
        time.sleep(0.3)
        m = scrape(stack)
        self.assertEqual(m.reloads(), (ok0 + 1, fail0))
        self.assertEqual(m.config_hashes(), [want], "exactly one piapi_config_info series")
        self.assertGreater(m.reload_ts(), ts0, "last-success timestamp did not move")
        self.assertLess(abs(m.reload_ts() - time.time()), 5.0, m.reload_ts())
        rec = stack.wait_log(lambda r: r.get("msg") == "config reloaded" and r.get("hash") == want)
        self.assertTrue(rec, "no 'config reloaded' line with the new hash")
        self.assertEqual(rec.get("trigger"), "inotify", rec)
        self.assertEqual(status_of(stack, new_key), 200)
        type(self).slot_key = new_key

    def test_06_sighup_reloads(self):
        """The file is changed through a hard link in another directory, so
        the directory watch sees nothing and only SIGHUP can pick it up."""
        stack = self.stack
        hidden = stack.tmp / "hidden"
        hidden.mkdir(exist_ok=True)
        shadow = hidden / "shadow.yaml"
        if shadow.exists():
            shadow.unlink()
        os.link(stack.config_path, shadow)
        time.sleep(0.3)                     # let any ATTRIB from the link settle
        before = scrape(stack)
        ok0, fail0 = before.reloads()
        new_key = "piapi-user-slot-R3l0adsighup"
        text = self.text(slot_key=new_key)
        want = fnv_hash(text.encode())
        write_in_place(shadow, text)
        time.sleep(0.4)
        m = scrape(stack)
        if m.config_hashes() == [want]:
            self.skipTest("this kernel reports writes through a hard link to the "
                          "config's directory watch; cannot isolate SIGHUP")
        self.assertEqual(m.reloads(), (ok0, fail0))
        nlog = len(stack.piapi_log())
        t0 = time.monotonic()
        os.kill(stack.piapi.pid, signal.SIGHUP)
        m = wait_hash(stack, want)
        self.assertEqual(m.config_hashes(), [want], "SIGHUP did not reload the changed file")
        print(f"\n  reload latency SIGHUP: {(time.monotonic() - t0) * 1000:.0f} ms", flush=True)
        self.assertEqual(m.reloads(), (ok0 + 1, fail0))
        recs = [r for r in log_since(stack, nlog) if r.get("msg") == "config reloaded"]
        self.assertEqual([r.get("trigger") for r in recs], ["sighup"], recs)
        self.assertEqual(status_of(stack, new_key), 200)
        type(self).slot_key = new_key
        shadow.unlink()
        settle(stack)

    def test_07_sighup_unchanged_counts_success_keeps_hash(self):
        stack = self.stack
        before = scrape(stack)
        ok0, fail0 = before.reloads()
        nlog = len(stack.piapi_log())
        os.kill(stack.piapi.pid, signal.SIGHUP)
        m = wait_reloads(stack, ok0 + fail0 + 1)
        time.sleep(0.2)
        m = scrape(stack)
        self.assertEqual(m.reloads(), (ok0 + 1, fail0))
        self.assertEqual(m.config_hashes(), before.config_hashes())
        self.assertGreaterEqual(m.reload_ts(), before.reload_ts())
        recs = [r for r in log_since(stack, nlog) if r.get("msg", "").startswith("config ")]
        self.assertTrue(any(r.get("msg") == "config unchanged" and r.get("trigger") == "sighup"
                            for r in recs), recs)
        self.assertFalse(any(r.get("msg") == "config reloaded" for r in recs), recs)

    def test_08_delete_keeps_serving_recreate_reloads(self):
        stack = self.stack
        nlog = len(stack.piapi_log())
        os.unlink(stack.config_path)
        rec = wait_log_since(stack, nlog,
                             lambda r: r.get("msg", "").startswith("config file removed"))
        self.assertTrue(rec, "no warning after the config file was deleted:\n"
                        + json.dumps(log_since(stack, nlog))[-2000:])
        self.assertEqual(rec.get("level"), "warn", rec)
        for _ in range(5):
            self.assertEqual(status_of(stack, ALICE), 200, "stopped serving without a config file")
            time.sleep(0.05)
        self.assertEqual(stack.request("GET", "/healthz").status, 200)
        self.assertTrue(stack.piapi.alive())
        new_key = "piapi-user-slot-R3l0adrecre8"
        text = self.text(slot_key=new_key)
        self.measure("recreate", lambda: harness.write_config(stack.config_path, text),
                     new_key, self.slot_key)
        type(self).slot_key = new_key

    def test_09_stream_survives_reload_removing_member(self):
        stack = self.stack
        result = {}
        req = build_request("GET", "/piapi/cx/sse?n=25&interval=0.2",
                            [bearer(BOB), ("Accept", "text/event-stream"), ("Connection", "close")])
        th = threading.Thread(target=lambda: result.setdefault("ex", stack.raw(req, timeout=15)))
        t_start = time.monotonic()
        th.start()
        time.sleep(0.6)
        self.assertTrue(th.is_alive(), "stream ended early")
        text = self.text(users=("alice",))
        want = fnv_hash(text.encode())
        write_rename(stack.config_path, text)
        m = wait_hash(stack, want)
        self.assertEqual(m.config_hashes(), [want], "reload without bob not live")
        r = stack.request("GET", "/piapi/cx/echo", [bearer(BOB)])
        self.assertTrue(th.is_alive(), "stream finished before the check: not meaningful")
        self.assertEqual(r.status, 401, f"removed member still served right after the reload: {r!r}")
        self.assertEqual(status_of(stack, ALICE), 200)
        th.join(15)
        self.assertFalse(th.is_alive(), "stream did not finish")
        ex = result["ex"]
        self.assertEqual(ex.status, 200, ex.raw[:300])
        body = re.sub(rb"(?m)^:[^\n]*\n\n", b"", ex.body())   # keepalive comments
        expected = b"".join(b'data: {"i":%d}\n\n' % k for k in range(25)) + b"data: [DONE]\n\n"
        self.assertEqual(body, expected, f"stream not intact after {time.monotonic() - t_start:.1f}s")


class TestReloadConfigMapSymlink(ReloadBase, unittest.TestCase):
    """Kubernetes ConfigMap volume layout: config.yaml -> ..data/config.yaml,
    ..data -> ..v1; an update renames a temp symlink over ..data."""
    STACK_NAME = "reload-cm"
    STYLES = ("configmap symlink swap",)

    @classmethod
    def prepare(cls, stack):
        d = stack.tmp
        (d / "..v1").mkdir()
        os.symlink("..v1", d / "..data")
        os.symlink("..data/config.yaml", d / "config.yaml")
        cls.version = 1
        # harness.write_config follows the symlinks and creates ..v1/config.yaml

    def swap(self, text):
        d = self.stack.tmp
        old = d / f"..v{self.version}"
        type(self).version += 1
        new = d / f"..v{self.version}"
        new.mkdir()
        harness.write_config(new / "config.yaml", text)
        tmp_link = d / "..data_tmp"
        os.symlink(new.name, tmp_link)

        def commit():
            os.rename(tmp_link, d / "..data")
        return commit, old

    def test_symlink_swap(self):
        d = self.stack.tmp
        self.assertTrue(os.path.islink(d / "config.yaml"))
        self.assertEqual(os.readlink(d / "..data"), "..v1")
        for i in range(REPS):
            old_key = self.slot_key
            new_key = f"piapi-user-slot-cmswap{i:02d}x{int(time.time() * 1000) % 10**6:06d}"
            commit, old_dir = self.swap(self.text(slot_key=new_key))
            self.measure("configmap symlink swap", commit, new_key, old_key)
            shutil.rmtree(old_dir)          # kubelet removes the old version
            type(self).slot_key = new_key
        self.assertTrue(os.path.islink(d / "config.yaml"), "config.yaml is no longer a symlink")
        # an invalid version swapped in is refused; the last good one serves on
        m0 = scrape(self.stack)
        commit, _ = self.swap(self.text() + "bogusTopLevelField: 1\n")
        commit()
        m = wait_reloads(self.stack, sum(m0.reloads()) + 1)
        self.assertEqual(m.reloads(), (m0.reloads()[0], m0.reloads()[1] + 1))
        self.assertEqual(status_of(self.stack, self.slot_key), 200)


# ---------------------------------------------------------------- stress ----

def rss_kb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class TestReloadStress(unittest.TestCase):
    """50 reloads in a row (valid/invalid alternating; the valid ones swap
    the member between baseUrl /v1 and /v2) while clients keep asking."""
    CLIENTS = 3
    FILLERS = 1500         # ~190 KB of YAML: a snapshot leaked per reload (~25 x 150 KB) shows in RSS
    RSS_LIMIT_KB = 2048

    @classmethod
    def setUpClass(cls):
        cls.stack = harness.Stack(
            "nginx", lambda s: config_text(s.mock.port, base="/v1", fillers=cls.FILLERS),
            piapi_args=["--grace", "2"], name="reload-stress")
        cls.addClassCleanup(cls.stack.stop)
        cls.stack.start()

    def texts(self):
        port = self.stack.mock.port
        v1 = config_text(port, base="/v1", fillers=self.FILLERS)
        v2 = config_text(port, base="/v2", fillers=self.FILLERS)
        invalid = [
            v1.replace('providerName: "mock"', 'providerName: "nosuch"', 1),  # unknown provider
            v2 + "users: [\n",                                                  # YAML syntax
            v1.replace('baseUrl:', 'baseURL:', 1),                            # typo'd field
            v2.replace(f"http://127.0.0.1:{port}/v2", "ftp://127.0.0.1/v2", 1),   # bad URL
        ]
        return {"/v1": v1, "/v2": v2}, invalid

    def run_round(self, n_reloads, label):
        """n_reloads edits while CLIENTS threads send requests. Returns
        (requests, timeline) after checking every answer."""
        stack = self.stack
        valid, invalid = self.texts()
        stop = threading.Event()
        results = []          # (start, end, status, served base or None, detail)
        lock = threading.Lock()

        def client(n):
            while not stop.is_set():
                s = time.monotonic()
                try:
                    r = stack.request("GET", f"/piapi/cx/echo?c={n}", [bearer(ALICE)], timeout=5)
                    e = time.monotonic()
                    base = None
                    if r.status == 200:
                        p = r.json().get("path", "")
                        base = p.split("/echo")[0] if p.endswith(f"/echo?c={n}") else ("?" + p)
                    rec = (s, e, r.status, base, r.body[:200])
                except OSError as ex:
                    rec = (s, time.monotonic(), None, None, repr(ex))
                with lock:
                    results.append(rec)
                time.sleep(0.01)

        for t in invalid:
            self.assertNotIn(t, valid.values(), "an 'invalid' edit is not an edit")
        m0 = scrape(stack)
        live = "/v2" if m0.config_hashes() == [fnv_hash(valid["/v2"].encode())] else "/v1"
        self.assertEqual(m0.config_hashes(), [fnv_hash(valid[live].encode())])
        # timeline of valid versions: (earliest live, version); a version may
        # serve until the next valid one is confirmed live
        timeline = [(float("-inf"), None, live)]
        threads = [threading.Thread(target=client, args=(i,), daemon=True)
                   for i in range(self.CLIENTS)]
        for t in threads:
            t.start()
        ok0, fail0 = m0.reloads()
        done = 0
        try:
            for i in range(n_reloads):
                if i % 2 == 0:
                    live = "/v2" if live == "/v1" else "/v1"
                    text = valid[live]
                else:
                    text = invalid[(i // 2) % len(invalid)]
                t_write = time.monotonic()
                write_rename(stack.config_path, text)
                m = wait_reloads(stack, ok0 + fail0 + i + 1, timeout=3.0)
                t_conf = time.monotonic()
                self.assertGreaterEqual(sum(m.reloads()), ok0 + fail0 + i + 1,
                                        f"{label}: reload {i + 1} not processed within 3 s")
                if i % 2 == 0:
                    self.assertEqual(m.config_hashes(), [fnv_hash(text.encode())],
                                     f"{label}: reload {i + 1}")
                    prev = timeline[-1]
                    timeline[-1] = (prev[0], t_conf, prev[2])
                    timeline.append((t_write, None, live))
                done += 1
        finally:
            time.sleep(0.1)
            stop.set()
            for t in threads:
                t.join(10)
        m = scrape(stack)
        n_valid = (n_reloads + 1) // 2
        self.assertEqual(m.reloads(), (ok0 + n_valid, fail0 + n_reloads - n_valid),
                         f"{label}: reload counters")

        def possible(s, e):
            out = set()
            for start, end, ver in timeline:
                if start <= e and (end is None or end >= s):
                    out.add(ver)
            return out

        bad = []
        seen = {}
        for s, e, st, base, detail in results:
            if st != 200 or base not in ("/v1", "/v2"):
                bad.append((st, base, detail))
                continue
            seen[base] = seen.get(base, 0) + 1
            if base not in possible(s, e):
                bad.append(("stale", base, f"served {base}; live during it: {possible(s, e)}"))
        self.assertEqual(bad[:10], [], f"{label}: {len(bad)} of {len(results)} answers wrong")
        self.assertGreater(len(results), 20, f"{label}: too few requests")
        if n_reloads >= 4:
            self.assertEqual(set(seen), {"/v1", "/v2"}, f"{label}: both configs should serve")
        return results, seen

    def test_50_reloads_under_traffic(self):
        stack = self.stack
        pid = stack.piapi.pid
        self.assertEqual(Path(f"/proc/{pid}/comm").read_text().strip(), "piapi")
        t0 = time.monotonic()
        self.run_round(10, "warm-up")
        time.sleep(0.3)
        rss_warm = rss_kb(pid)
        t1 = time.monotonic()
        results, seen = self.run_round(50, "stress")
        t2 = time.monotonic()
        time.sleep(0.3)
        rss_after = rss_kb(pid)
        growth = rss_after - rss_warm
        print(f"\n  reload stress: 50 reloads in {t2 - t1:.1f}s (warm-up {t1 - t0:.1f}s), "
              f"{len(results)} requests all correct ({seen}), "
              f"config {len(self.texts()[0]['/v1'])} bytes", flush=True)
        print(f"  reload stress memory: VmRSS after warm-up {rss_warm} kB, after 50 reloads "
              f"{rss_after} kB, growth {growth} kB (limit {self.RSS_LIMIT_KB} kB)", flush=True)
        if os.environ.get("PIAPI_SANITIZED"):
            # ASan keeps freed memory in quarantine, so RSS says nothing
            # there; LeakSanitizer checks for leaks when piapi exits.
            print("  (sanitizer build: RSS growth not checked)", flush=True)
            return
        self.assertLess(growth, self.RSS_LIMIT_KB, "piapi grew over 50 reloads")


if __name__ == "__main__":
    unittest.main(verbosity=2)
