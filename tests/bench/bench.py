#!/usr/bin/env python3
"""`make bench` orchestrator (started by tests/bench/run.sh, which builds the
helpers first). Everything runs on loopback, every load is bounded in time.

Starts: a mock upstream (nginx answering a fixed Anthropic message to any POST),
a mock SSE upstream (sse_server), the floor (a do-nothing libfcgi responder),
piapi, and one nginx front with four locations: the proxy_pass baseline,
the floor, and piapi's shipped snippet. Then runs BENCH_ROUNDS interleaved
rounds of: wrk -c64 (throughput), wrk -c1 (added latency), 200 and 1,000
concurrent SSE streams, and a few unloaded streams; prints one table of
medians with ratios and pass/fail, and writes it to $BUILD/bench/results.md
(raw per-round figures: results.json).

Keep-conn (BENCH_KEEPCONN=1, the default): the floor and piapi are also run
behind `fastcgi_keep_conn on` + upstream `keepalive` (own processes: a floor
with keepalive x workers + c threads, and piapi_kc with --threads as piapi),
in the wrk phases, with a second table; then, once, an overload phase
(`kcover`): a keep-conn piapi with a SMALL pool (BENCH_KC_OVERLOAD_THREADS)
under wrk -c64, counting the requests that fail when nginx holds far more
kept connections than piapi has request slots and threads.

TLS (phase `tls`): a third nginx terminates TLS (a certificate from a
throw-away CA made for the run) in front of the same two mocks, on an
HTTP/1.1 port and an HTTP/2 port. nginx proxy_pass (https upstream with
keepalive and proxy_ssl_session_reuse) and piapi (https baseUrl, the CA as
settings.caFile) run against it under wrk -c64, and with one unloaded stream
at a time; the TLS nginx logs every request with its connection number and
$ssl_session_reused, from which the new TLS handshakes are counted. Own
table (report_tls).

A/B (BENCH_PIAPI_B=BINARY and/or BENCH_B_CONFIG_EXTRA=FILE): a second
piapi, slot B, runs beside slot A (BENCH_PIAPI) in the same run, and an
"A/B" table of B ÷ A is appended. The two slots are measured the same way:
each has its own nginx server block in the same front (A on PORT+8, B on
PORT+3, the same shipped snippet), each gets a cold 1,000-stream burst and
the same warm-up, and in every phase of every round A and B take turns in
ABBA order (BENCH_AB_SLICES turns each in a wrk phase, its duration split
among them; BENCH_AB_REPEATS in a stream phase), A first in odd rounds and
B first in even ones; an even round is the odd one before it with A and B
swapped (BENCH_ROUNDS defaults to 4 in A/B mode, and must be even). The table shows both the ratio of the
medians and the median of the per-round ratios (B and A measured a few
seconds apart, under the same background load), with their spread. An A/A
run (BENCH_PIAPI_B = BENCH_PIAPI) shows the harness's own error.
  BENCH_B_CONFIG_EXTRA=FILE: a YAML file whose top-level sections are merged
  into slot B's config.yaml (BENCH_A_CONFIG_EXTRA: the same for slot A). A
  section the bench config lacks is appended; a mapping section it has
  (e.g. `settings:`) is merged key by key, the file's key replacing the
  bench's; a sequence or scalar section (`providers:`, `users:`) is replaced
  whole. With BENCH_B_CONFIG_EXTRA and no BENCH_PIAPI_B, B is A's binary: a
  config variant of the same build (e.g. a feature on vs off).

The mocks answer in Anthropic Messages shape with usage: the chat mock a
~650-byte message JSON with a usage object, the SSE mock message_start
(usage incl. cache tokens), content_block_start, content_block_delta x
(CHUNKS - 5), content_block_stop, message_delta (cumulative usage) and
message_stop, CHUNKS events in all, INTERVAL ms apart.

`run.sh profile` instead records a CPU profile of piapi (perf, or callgrind
when perf cannot sample) under the wrk -c64 load; see docs/performance.md.
"""
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def env_num(name, default, kind=float):
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return kind(v)
    except ValueError:
        sys.exit(f"bench: {name}={v!r} is not a number")


BUILD = os.path.abspath(os.path.join(ROOT, os.environ.get("BUILD", "build")))
OUT = os.path.join(BUILD, "bench")
RUN = os.path.join(OUT, "run")
BIN = os.path.join(OUT, "bin")
PIAPI = os.path.abspath(os.environ.get("BENCH_PIAPI") or os.path.join(BUILD, "piapi"))
# Optional second build, benchmarked side by side in the same run (A/B).
# Config variants: YAML files merged into slot A's / slot B's config.
A_EXTRA = os.path.abspath(os.environ["BENCH_A_CONFIG_EXTRA"]) \
    if os.environ.get("BENCH_A_CONFIG_EXTRA") else None
B_EXTRA = os.path.abspath(os.environ["BENCH_B_CONFIG_EXTRA"]) \
    if os.environ.get("BENCH_B_CONFIG_EXTRA") else None
PIAPI_B = os.path.abspath(os.environ["BENCH_PIAPI_B"]) if os.environ.get("BENCH_PIAPI_B") \
    else (PIAPI if B_EXTRA else None)

C = {
    "rounds": env_num("BENCH_ROUNDS", 4 if PIAPI_B else 3, int),
    "duration": env_num("BENCH_DURATION", 8.0),
    "conns": env_num("BENCH_CONNECTIONS", 64, int),
    "wrk_threads": env_num("BENCH_WRK_THREADS", 2, int),
    "streams": [int(x) for x in os.environ.get("BENCH_STREAMS", "200,1000").split(",") if x],
    "unloaded": env_num("BENCH_UNLOADED_STREAMS", 5, int),
    "chunks": env_num("BENCH_SSE_CHUNKS", 50, int),
    "interval_ms": env_num("BENCH_SSE_INTERVAL_MS", 20, int),
    "threads": env_num("BENCH_PIAPI_THREADS", 1100, int),
    "floor_threads": env_num("BENCH_FLOOR_THREADS", 8, int),
    "nginx_workers": os.environ.get("BENCH_NGINX_WORKERS", "1"),
    "port": env_num("BENCH_PORT", 18480, int),
    "settle": env_num("BENCH_SETTLE", 0.5),
    "warmup": env_num("BENCH_WARMUP", 1, int),
    "log_level": os.environ.get("BENCH_LOG_LEVEL", "info"),
    "log_max_mb": env_num("BENCH_LOG_MAX_MB", 64, int),
    "phases": os.environ.get("BENCH_PHASES", "wrk64,wrk1,sse,unloaded,kcover,tls").split(","),
    "keepconn": env_num("BENCH_KEEPCONN", 1, int),
    "kc_keepalive": env_num("BENCH_KC_KEEPALIVE", 32, int),
    "kc_over_threads": env_num("BENCH_KC_OVERLOAD_THREADS", 4, int),
    "kc_over_duration": env_num("BENCH_KC_OVERLOAD_DURATION", 5.0),
    # A/B: turns per slot and round, in ABBA order (see expand_ab)
    "ab_slices": env_num("BENCH_AB_SLICES", 8, int),
    "ab_repeats": env_num("BENCH_AB_REPEATS", 2, int),
}
# wrk takes whole seconds only
C["lat_duration"] = int(env_num("BENCH_LAT_DURATION", max(2, int(C["duration"] // 2))))
FRONT_PORT, UP_PORT, SSE_PORT, B_PORT = C["port"], C["port"] + 1, C["port"] + 2, C["port"] + 3
KC_PORT, KCO_PORT = C["port"] + 4, C["port"] + 5
# A/B: slot A gets its own server block too (as B has on B_PORT)
A_PORT = C["port"] + 8
if PIAPI_B and C["rounds"] % 2:
    sys.exit("bench: A/B needs an even BENCH_ROUNDS (A first in half of them, B in the other)")
if C["chunks"] < 6:
    sys.exit("bench: BENCH_SSE_CHUNKS must be at least 6 (an Anthropic stream's frame)")
# phase tls: the TLS-terminating nginx, HTTP/1.1 only and HTTP/2 by ALPN
TLS1_PORT, TLS2_PORT = C["port"] + 6, C["port"] + 7
TLS = "tls" in C["phases"]
# The keep-conn floor needs a thread per FastCGI connection nginx can hold:
# cached idle ones (keepalive per worker) + one per request in flight.
_workers = os.cpu_count() if C["nginx_workers"] == "auto" else int(C["nginx_workers"])
C["floor_kc_threads"] = env_num("BENCH_FLOOR_KC_THREADS",
                                C["kc_keepalive"] * _workers + C["conns"], int)

MEMBER_KEY = "piapi-bench-user"
PROVIDER_KEY = "sk-bench-provider-key"
# The fixed non-streamed answer (652 bytes, as the chat completion it
# replaced), from the mock and the floor: an Anthropic Messages response
# with a usage object (cache tokens included).
RESPONSE = json.dumps({
    "id": "msg_bench01A2B3C4D5E6F7G8H9J0K1L2M3N4P5Q6",
    "type": "message",
    "role": "assistant",
    "model": "claude-bench-2024-01-01",
    "content": [{
        "type": "text",
        "text": ("Here is the refactored function. It builds a dictionary keyed by id "
                 "once, so every lookup is O(1) instead of a scan over the list. "
                 "def find(items, wanted): index = {item.id: item for item in items}; "
                 "return [index[w] for w in wanted if w in index]. "
                 "The behaviour is unchanged for missing ids, which are skipped."),
    }],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 231, "cache_creation_input_tokens": 64,
              "cache_read_input_tokens": 1024, "output_tokens": 88,
              "service_tier": "standard"},
}, separators=(",", ":"))

TARGET_PATHS = {
    "base": "/base/v1/messages",
    "floor": "/floor/v1/messages",
    "piapi": "/piapi/oa/messages",
}
SSE_PATHS = {
    "base": "/base-sse/v1/messages",
    "piapi": "/piapi/sse/messages",
}
if PIAPI_B:
    TARGET_PATHS["piapi_b"] = TARGET_PATHS["piapi"]
    SSE_PATHS["piapi_b"] = SSE_PATHS["piapi"]
if C["keepconn"]:
    TARGET_PATHS["floor_kc"] = "/floor-kc/v1/messages"
    TARGET_PATHS["piapi_kc"] = TARGET_PATHS["piapi"]
# run once, not in the rounds (the keep-conn overload phase)
ONCE_PATHS = {"piapi_kco": TARGET_PATHS["piapi"]} if C["keepconn"] else {}
# which process group answers a target (the baseline has none but nginx)
BACKEND = {"base": None, "floor": "floor", "piapi": "piapi", "piapi_b": "piapi_b",
           "floor_kc": "floor_kc", "piapi_kc": "piapi_kc", "piapi_kco": "piapi_kco"}
PORTS = {"piapi_b": B_PORT, "piapi_kc": KC_PORT, "piapi_kco": KCO_PORT}
if PIAPI_B:
    PORTS["piapi"] = A_PORT
# phase tls: proxy_pass speaks only HTTP/1.1 to an upstream, so it has one
# target; piapi has one per listener of the TLS nginx (libcurl offers h2 by
# ALPN, the HTTP/1.1 port does not take it).
TLS_PATHS = {
    "base_tls": "/base-tls/v1/messages",
    "piapi_tls1": "/piapi/tls1/messages",
    "piapi_tls2": "/piapi/tls2/messages",
} if TLS else {}
TLS_SSE_PATHS = {
    "base_tls": "/base-tls-sse/v1/messages",
    "piapi_tls1": "/piapi/tls1sse/messages",
    "piapi_tls2": "/piapi/tls2sse/messages",
} if TLS else {}
BACKEND.update({"base_tls": None, "piapi_tls1": "piapi", "piapi_tls2": "piapi"})


def wrk_path(target):
    return TARGET_PATHS.get(target) or ONCE_PATHS.get(target) or TLS_PATHS[target]


def sse_path(target):
    return SSE_PATHS.get(target) or TLS_SSE_PATHS[target]


def target_port(target):
    return PORTS.get(target, FRONT_PORT)


def is_floor(target):
    return target.startswith("floor")
TICK = os.sysconf("SC_CLK_TCK")


def parse_pin(spec):
    """BENCH_PIN="piapi=1 front=0 load=0-1": CPU sets per kind of process
    (kinds: front, up, sse, tls, floor, piapi, load = wrk and sse_client);
    a kind not named is not pinned."""
    out = {}
    for item in spec.replace(",", " ").split():
        kind, _, cpus = item.partition("=")
        got = set()
        for part in cpus.split("+"):
            lo, _, hi = part.partition("-")
            try:
                got.update(range(int(lo), int(hi or lo) + 1))
            except ValueError:
                sys.exit(f"bench: BENCH_PIN: bad CPU list in {item!r}")
        out[kind] = got
    return out


PIN = parse_pin(os.environ.get("BENCH_PIN", ""))


def pinned(kind):
    """preexec_fn for a child of that kind (None: not pinned)."""
    cpus = PIN.get(kind)
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- processes

class Proc:
    """A child in its own session; stopped by pid, never by name."""
    all = []

    def __init__(self, name, argv, kind=None, **kw):
        self.name = name
        self.logpath = os.path.join(RUN, f"{name}.out")
        self.logf = open(self.logpath, "ab")
        self.p = subprocess.Popen(argv, stdout=self.logf, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True,
                                  preexec_fn=pinned(kind), **kw)
        self.pid = self.p.pid
        Proc.all.append(self)

    def alive(self):
        return self.p.poll() is None

    def stop(self, timeout=5.0):
        if self.alive():
            try:
                self.p.send_signal(signal.SIGTERM)
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
            except ProcessLookupError:
                pass
        self.logf.close()

    def tail(self, n=20):
        try:
            with open(self.logpath, "rb") as f:
                return b"".join(f.readlines()[-n:]).decode(errors="replace")
        except OSError:
            return ""


def stop_all():
    for p in reversed(Proc.all):
        p.stop()
    Proc.all.clear()


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def ctx_switches(pid):
    """Voluntary + involuntary context switches over all of pid's threads."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt", "nonvoluntary_ctxt")):
                        total += int(line.split()[1])
        except (OSError, ValueError):
            pass
    return total


def status_kb(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kb(pids):
    return sum(status_kb(p, "VmRSS") for p in pids)


class RssSampler:
    """Peak of summed VmRSS per group, sampled every 50 ms in a thread."""

    def __init__(self, groups):
        self.groups = groups
        self.peak = {g: 0 for g in groups}
        self.stop_ev = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stop_ev.is_set():
            for g, pids in self.groups.items():
                self.peak[g] = max(self.peak[g], rss_kb(pids))
            self.stop_ev.wait(0.05)

    def finish(self):
        self.stop_ev.set()
        self.t.join()
        return self.peak


def wait_port(port, proc, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            break
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"bench: {proc.name} did not start listening on {port}:\n{proc.tail()}")


def wait_unix(path, proc, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            break
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"bench: {proc.name} did not start listening on {path}:\n{proc.tail()}")


def port_free(port):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def http_req(method, path, body=None, headers=None, port=None, timeout=10):
    c = http.client.HTTPConnection("127.0.0.1", port or FRONT_PORT, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


# ------------------------------------------------------------------- setup

def fill(template, **kv):
    with open(os.path.join(HERE, template)) as f:
        text = f.read()
    for k, v in kv.items():
        text = text.replace(f"@{k}@", str(v))
    if "\\" in text:
        sys.exit(f"bench: {template}: backslashes would be nginx escapes")
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        sys.exit(f"bench: {template}: unfilled {left}")
    return text


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def nginx_has(module):
    out = subprocess.run(["nginx", "-V"], capture_output=True, text=True).stderr
    return module in out


def make_pki(d):
    """A throw-away CA and a server certificate it signed (the approach of
    tests/integration/harness.py make_test_pki). SANs: IP 127.0.0.1 for
    libcurl, which checks the URL's IP against IP SANs, and DNS localhost for
    nginx's proxy_ssl_verify, which checks proxy_ssl_name against DNS names
    only."""
    os.makedirs(d)
    p = lambda n: os.path.join(d, n)
    write(p("srv.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
          "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    for argv in (
        ["openssl", "req", "-x509", *ec, "-keyout", p("ca.key"), "-out", p("ca.pem"),
         "-days", "2", "-subj", "/CN=piapi bench CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["openssl", "req", *ec, "-keyout", p("srv.key"), "-out", p("srv.csr"),
         "-subj", "/CN=127.0.0.1"],
        ["openssl", "x509", "-req", "-in", p("srv.csr"), "-CA", p("ca.pem"),
         "-CAkey", p("ca.key"), "-CAcreateserial", "-out", p("srv.pem"), "-days", "2",
         "-extfile", p("srv.ext")],
    ):
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"bench: {' '.join(argv[:3])} failed: {r.stderr}")


def tls_services():
    """piapi's services behind the TLS nginx (phase tls), and the CA."""
    if not TLS:
        return ""
    svc = ""
    for typ, port, prefix in (("tls1", TLS1_PORT, ""), ("tls1sse", TLS1_PORT, "/sse"),
                              ("tls2", TLS2_PORT, ""), ("tls2sse", TLS2_PORT, "/sse")):
        svc += f"""\
      - type: {typ}
        baseUrl: https://127.0.0.1:{port}{prefix}/v1
        auth:
          mode: header
          name: Authorization
          prefix: "Bearer "
"""
    # appended to the provider's services; settings follow at top level
    return svc + f"settings:\n  caFile: {os.path.join(RUN, 'pki', 'ca.pem')}\n"


_TOP_KEY = re.compile(r"^([A-Za-z_][\w-]*):(.*)$")
_SUB_KEY = re.compile(r"^  ([A-Za-z_][\w-]*):")


def yaml_blocks(lines, key_re):
    """Splits block-style YAML lines into (key, lines) at lines matching
    key_re; leading lines before the first key come under key None."""
    out, cur = [], [None, []]
    for line in lines:
        m = key_re.match(line)
        if m:
            out.append(cur)
            cur = [m.group(1), [line]]
        else:
            cur[1].append(line)
    out.append(cur)
    return [(k, v) for k, v in out if k is not None or any(x.strip() for x in v)]


def is_mapping(block):
    """A top-level section whose body is a block mapping indented by 2."""
    head, body = block[0], block[1:]
    if _TOP_KEY.match(head).group(2).split("#")[0].strip():
        return False  # a scalar or flow value on the key's line
    first = next((x for x in body if x.strip() and not x.lstrip().startswith("#")), "")
    return bool(_SUB_KEY.match(first))


def merge_config(base, extra, name):
    """base with the top-level sections of extra merged in (see
    BENCH_B_CONFIG_EXTRA in the docstring). Block-style YAML, second-level
    keys indented by 2, as the bench's own config is written."""
    top = yaml_blocks(base.splitlines(), _TOP_KEY)
    keys = [k for k, _ in top]
    for key, lines in yaml_blocks(extra.splitlines(), _TOP_KEY):
        if key is None:
            continue  # comments before the first section
        if key not in keys:
            top.append((key, lines))
            keys.append(key)
            continue
        i = keys.index(key)
        old = top[i][1]
        if is_mapping(old) and is_mapping(lines):
            subs = yaml_blocks(old[1:], _SUB_KEY)
            names = [k for k, _ in subs]
            for sk, sl in yaml_blocks(lines[1:], _SUB_KEY):
                if sk is None:
                    continue
                if sk in names:
                    subs[names.index(sk)] = (sk, sl)
                else:
                    subs.append((sk, sl))
                    names.append(sk)
            top[i] = (key, [old[0]] + [x for _, sl in subs for x in sl])
        else:
            if is_mapping(old) != is_mapping(lines) and lines[1:]:
                log(f"{name}: section {key!r} replaced whole (mapping vs not)")
            top[i] = (key, lines)
    return "\n".join(x for _, lines in top for x in lines) + "\n"


def piapi_config(extra_path, name):
    """The bench's piapi config, with extra_path's sections merged in."""
    text = f"""\
providers:
  - name: mock
    apiKeys:
      main: {PROVIDER_KEY}
      backup: {PROVIDER_KEY}-backup
    services:
      - type: oa
        baseUrl: http://127.0.0.1:{UP_PORT}/v1
        auth:
          mode: header
          name: Authorization
          prefix: "Bearer "
      - type: sse
        baseUrl: http://127.0.0.1:{SSE_PORT}/v1
        auth:
          mode: header
          name: Authorization
          prefix: "Bearer "
{tls_services()}users:
  - name: bench
    apiKey: {MEMBER_KEY}
    providerName: mock
    providerKeyName: main
"""
    if not extra_path:
        return text
    try:
        with open(extra_path) as f:
            extra = f.read()
    except OSError as e:
        sys.exit(f"bench: {name}: {e}")
    return merge_config(text, extra, name)


def tls_front_upstreams():
    """The baseline's https upstream: kept alive, sessions reused, verified."""
    if not TLS:
        return ""
    return ("upstream tls_h1 {\n        server 127.0.0.1:%d;\n        keepalive 128;\n"
            "        keepalive_requests 1000000;\n        keepalive_timeout 300s;\n    }"
            % TLS1_PORT)


def tls_front_locations():
    if not TLS:
        return ""
    out = ""
    for loc, uri in (("/base-tls/", "/"), ("/base-tls-sse/", "/sse/")):
        out += f"""location {loc} {{
            proxy_pass https://tls_h1{uri};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {PROVIDER_KEY}";
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            proxy_ssl_session_reuse on;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {os.path.join(RUN, 'pki', 'ca.pem')};
            proxy_ssl_name localhost;
            proxy_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
            client_max_body_size 32m;
        }}
        """
    return out


class TlsLog:
    """The TLS nginx's access log ($connection $connection_requests
    $ssl_session_reused $server_port $server_protocol $ssl_protocol), read
    slice by slice. A connection number not seen before is a new TLS
    connection, which began with a handshake: resumed when its first logged
    request has $ssl_session_reused "r", full otherwise. (Connection numbers
    are unique in one nginx; a connection that never carried a request is not
    seen, and none is expected here.)"""

    def __init__(self, path):
        self.path = path
        self.pos = 0
        self.seen = set()

    def consume(self):
        """What the log got since the last call (wait for nginx's 1 s flush
        first)."""
        out = {"requests": 0, "new": 0, "resumed": 0, "conns": 0, "protocols": {}}
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except OSError:
            return out
        end = data.rfind(b"\n") + 1  # a line cut by the buffer waits for the next call
        self.pos += end
        conns = set()
        for line in data[:end].decode(errors="replace").splitlines():
            parts = line.split()
            if len(parts) != 6:
                continue
            conn, _, reused, _, proto, tls = parts
            out["requests"] += 1
            conns.add(conn)
            key = f"{proto} {tls}"
            out["protocols"][key] = out["protocols"].get(key, 0) + 1
            if conn not in self.seen:
                self.seen.add(conn)
                out["new"] += 1
                out["resumed"] += reused == "r"
        out["conns"] = len(conns)
        if self.pos > C["log_max_mb"] << 20:  # nginx appends (O_APPEND)
            os.truncate(self.path, 0)
            self.pos = 0
        return out


class Stack:
    def __init__(self):
        self.count_mode = os.environ.get("BENCH_CONN_COUNT") or (
            "stub_status" if nginx_has("http_stub_status_module") else "log")
        self.up_log = os.path.join(RUN, "upstream-conn.log")
        self.up_log_pos = 0

    def start(self):
        for p in ((FRONT_PORT, UP_PORT, SSE_PORT) + ((A_PORT, B_PORT) if PIAPI_B else ())
                  + ((KC_PORT, KCO_PORT) if C["keepconn"] else ())
                  + ((TLS1_PORT, TLS2_PORT) if TLS else ())):
            if not port_free(p):
                sys.exit(f"bench: 127.0.0.1:{p} is in use; set BENCH_PORT to a free base "
                         f"port (it uses BENCH_PORT..BENCH_PORT+8)")
        if os.path.isdir(RUN):
            shutil.rmtree(RUN)
        os.makedirs(os.path.join(RUN, "tmp"))
        user_line = "user root;" if os.geteuid() == 0 else ""
        write(os.path.join(RUN, "response.json"), RESPONSE)

        # the mock upstream
        if self.count_mode == "stub_status":
            access, stub = "access_log off;", "stub_status;"
        else:
            access = ("log_format conns '$connection $connection_requests';\n"
                      f"    access_log {self.up_log} conns;")
            stub = "return 404;"
        write(os.path.join(RUN, "upstream.conf"),
              fill("upstream.conf.in", RUN=RUN, UP_PORT=UP_PORT, USER_LINE=user_line,
                   ACCESS_LOG=access, STUB_STATUS=stub, RESPONSE=RESPONSE))
        self.up = Proc("upstream", ["nginx", "-p", RUN, "-c", os.path.join(RUN, "upstream.conf")],
                       "up")
        self.sse = Proc("sse_server", [os.path.join(BIN, "sse_server"), str(SSE_PORT),
                                       str(C["chunks"]), str(C["interval_ms"])], "sse")
        if TLS:
            make_pki(os.path.join(RUN, "pki"))
            write(os.path.join(RUN, "tls.conf"),
                  fill("tls.conf.in", RUN=RUN, UP_PORT=UP_PORT, SSE_PORT=SSE_PORT,
                       TLS1_PORT=TLS1_PORT, TLS2_PORT=TLS2_PORT, USER_LINE=user_line))
            self.tls = Proc("tls", ["nginx", "-p", RUN, "-c", os.path.join(RUN, "tls.conf")],
                            "tls")
            self.handshakes = TlsLog(os.path.join(RUN, "tls-access.log"))
        self.floor = Proc("floor", [os.path.join(BIN, "floor"), os.path.join(RUN, "floor.sock"),
                                    str(C["floor_threads"]), os.path.join(RUN, "response.json")],
                          "floor")
        if C["keepconn"]:
            self.floor_kc = Proc("floor_kc", [os.path.join(BIN, "floor"),
                                              os.path.join(RUN, "floor_kc.sock"),
                                              str(C["floor_kc_threads"]),
                                              os.path.join(RUN, "response.json")], "floor")

        # piapi, with the shipped snippet; slot B (A/B) with its own config
        write(os.path.join(RUN, "piapi.yaml"), piapi_config(A_EXTRA, "BENCH_A_CONFIG_EXTRA"))
        if PIAPI_B:
            write(os.path.join(RUN, "piapi_b.yaml"),
                  piapi_config(B_EXTRA, "BENCH_B_CONFIG_EXTRA"))
        self.piapi_log = os.path.join(RUN, "piapi.log")
        self.piapi = self.start_piapi("piapi", PIAPI)
        self.piapi_b = self.start_piapi("piapi_b", PIAPI_B, config="piapi_b.yaml") \
            if PIAPI_B else None
        if C["keepconn"]:
            self.piapi_kc = self.start_piapi("piapi_kc", PIAPI)
            self.piapi_kco = self.start_piapi("piapi_kco", PIAPI, C["kc_over_threads"])
        with open(os.path.join(ROOT, "deploy/nginx/piapi.conf")) as f:
            site = f.read()
        sock = "unix:/run/piapi/piapi.sock"
        if site.count(sock) < 1:
            sys.exit(f"bench: deploy/nginx/piapi.conf no longer names {sock}; update bench.py")
        write(os.path.join(RUN, "piapi-site.conf"),
              site.replace(sock, "unix:" + os.path.join(RUN, "piapi.sock")))
        extra = ""
        if PIAPI_B:
            # Both slots the same way: a server block of their own each,
            # the snippet and nothing else, in the same nginx.
            write(os.path.join(RUN, "piapi_b-site.conf"),
                  site.replace(sock, "unix:" + os.path.join(RUN, "piapi_b.sock")))
            for port, conf in ((A_PORT, "piapi-site.conf"), (B_PORT, "piapi_b-site.conf")):
                extra += ("server {\n        listen 127.0.0.1:%d backlog=4096;\n"
                          "        include %s;\n    }\n    " % (port, conf))
        kc_servers = ""
        if C["keepconn"]:
            # deploy/nginx/piapi.conf with every fastcgi_pass turned into the
            # keep-conn upstream; the upstream blocks are in front.conf.in
            # (they must be at http level).
            line = f"fastcgi_pass {sock};"
            if line not in site:
                sys.exit(f"bench: deploy/nginx/piapi.conf has no {line!r}; update bench.py")
            for name, port in (("piapi_kc", KC_PORT), ("piapi_kco", KCO_PORT)):
                write(os.path.join(RUN, f"{name}-site.conf"),
                      site.replace(line, f"fastcgi_pass {name};\n    fastcgi_keep_conn on;"))
                kc_servers += ("server {\n        listen 127.0.0.1:%d backlog=4096;\n"
                               "        include %s-site.conf;\n    }\n    " % (port, name))
        shutil.copy("/etc/nginx/fastcgi_params", os.path.join(RUN, "fastcgi_params"))
        write(os.path.join(RUN, "front.conf"),
              fill("front.conf.in", RUN=RUN, FRONT_PORT=FRONT_PORT, UP_PORT=UP_PORT,
                   SSE_PORT=SSE_PORT, NGINX_WORKERS=C["nginx_workers"], USER_LINE=user_line,
                   EXTRA_SERVER=extra, KC_SERVERS=kc_servers,
                   KC_KEEPALIVE=C["kc_keepalive"], TLS_UPSTREAMS=tls_front_upstreams(),
                   TLS_LOCATIONS=tls_front_locations()))
        self.front = Proc("front", ["nginx", "-p", RUN, "-c", os.path.join(RUN, "front.conf")],
                          "front")

        wait_port(UP_PORT, self.up)
        wait_port(SSE_PORT, self.sse)
        if TLS:
            wait_port(TLS1_PORT, self.tls)
            wait_port(TLS2_PORT, self.tls)
        wait_unix(os.path.join(RUN, "floor.sock"), self.floor)
        wait_unix(os.path.join(RUN, "piapi.sock"), self.piapi)
        if PIAPI_B:
            wait_unix(os.path.join(RUN, "piapi_b.sock"), self.piapi_b)
        if C["keepconn"]:
            wait_unix(os.path.join(RUN, "floor_kc.sock"), self.floor_kc)
            wait_unix(os.path.join(RUN, "piapi_kc.sock"), self.piapi_kc)
            wait_unix(os.path.join(RUN, "piapi_kco.sock"), self.piapi_kco)
        wait_port(FRONT_PORT, self.front)
        for _ in range(100):
            if (children(self.front.pid) and children(self.up.pid)
                    and (not TLS or children(self.tls.pid))):
                break
            time.sleep(0.05)
        self.groups = {
            "front": [self.front.pid] + children(self.front.pid),
            "up": [self.up.pid] + children(self.up.pid),
            "sse": [self.sse.pid],
            "floor": [self.floor.pid],
            "piapi": [self.piapi.pid],
        }
        if PIAPI_B:
            self.groups["piapi_b"] = [self.piapi_b.pid]
        if TLS:
            self.groups["tls"] = [self.tls.pid] + children(self.tls.pid)
        if C["keepconn"]:
            self.groups["floor_kc"] = [self.floor_kc.pid]
            self.groups["piapi_kc"] = [self.piapi_kc.pid]
            self.groups["piapi_kco"] = [self.piapi_kco.pid]

    def start_piapi(self, name, binary, threads=None, config="piapi.yaml"):
        return Proc(name, [binary, "--config", os.path.join(RUN, config),
                           "--socket", os.path.join(RUN, f"{name}.sock"),
                           "--socket-mode", "0666", "--threads", str(threads or C["threads"]),
                           "--log-level", C["log_level"],
                           "--log-file", os.path.join(RUN, f"{name}.log")], "piapi")

    # ---- counters on the upstream side
    def up_stats(self):
        """(new connections, requests) seen by the mock upstream so far."""
        if self.count_mode == "stub_status":
            st, body = http_req("GET", "/__status", port=UP_PORT)
            m = re.search(rb"\n\s*(\d+)\s+(\d+)\s+(\d+)", body)
            return int(m.group(1)), int(m.group(3))
        # access-log mode: lines are "$connection $connection_requests";
        # a line with 1 is a new connection. nginx writes it unbuffered.
        news = reqs = 0
        with open(self.up_log) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2:
                    reqs += 1
                    news += parts[1] == "1"
        return news, reqs

    def up_stats_self(self):
        return 1 if self.count_mode == "stub_status" else 0

    def sse_stats(self):
        st, body = http_req("GET", "/stats", port=SSE_PORT)
        d = dict(zip(*[iter(body.decode().split())] * 2))
        return int(d["accepts"]), int(d["requests"])

    def snapshot(self):
        return {
            "t": time.monotonic(),
            "cpu": {g: cpu_ticks(p) for g, p in self.groups.items()},
            "csw": {g: ctx_switches(self.groups[g][0]) for g in self.groups
                    if g in BACKEND.values()},
            "up": self.up_stats(),
            "sse": self.sse_stats(),
        }

    def delta(self, a, b):
        d = {"wall": b["t"] - a["t"]}
        for g in a["cpu"]:
            d["cpu_" + g] = (b["cpu"][g] - a["cpu"][g]) / TICK
        for g in a["csw"]:
            d["csw_" + g] = b["csw"][g] - a["csw"][g]
        self_up = self.up_stats_self()
        d["up_conns"] = b["up"][0] - a["up"][0] - self_up
        d["up_reqs"] = b["up"][1] - a["up"][1] - self_up
        d["sse_conns"] = b["sse"][0] - a["sse"][0] - 1
        d["sse_reqs"] = b["sse"][1] - a["sse"][1] - 1
        return d

    def check_alive(self):
        for p in Proc.all:
            if not p.alive():
                sys.exit(f"bench: {p.name} exited (rc {p.p.returncode}):\n{p.tail()}")

    def trim_log(self):
        # A full run writes millions of access-log lines; keep the disk use
        # bounded (both nginx and piapi open their logs with O_APPEND).
        for name in ("piapi.log", "piapi_b.log", "piapi_kc.log", "piapi_kco.log",
                     "front-access.log"):
            path = os.path.join(RUN, name)
            try:
                if os.path.getsize(path) > C["log_max_mb"] << 20:
                    os.truncate(path, 0)  # piapi appends (O_APPEND)
            except OSError:
                pass


# ------------------------------------------------------------------ phases

def run_wrk(st, target, conns, threads, duration, record=True):
    url = f"http://127.0.0.1:{target_port(target)}{wrk_path(target)}"
    be = BACKEND[target]
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration:g}s", "--timeout", "5s",
            "-s", os.path.join(HERE, "post.lua"), url]
    before = st.snapshot()
    sampler = RssSampler({"backend": st.groups[be] if be else [], "front": st.groups["front"]})
    r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60,
                       preexec_fn=pinned("load"))
    peak = sampler.finish()
    if st.count_mode == "log":
        time.sleep(0.2)
    after = st.snapshot()
    m = re.search(r"^BENCHJSON (\{.*\})$", r.stdout, re.M)
    if r.returncode != 0 or not m:
        sys.exit(f"bench: wrk failed (rc {r.returncode}):\n{r.stdout}\n{r.stderr}")
    w = json.loads(m.group(1))
    d = st.delta(before, after)
    n = max(w["requests"], 1)
    res = {
        "target": target,
        "requests": w["requests"],
        "rps": w["requests"] / (w["duration_us"] / 1e6),
        "p50_us": w["p50_us"], "p99_us": w["p99_us"], "max_us": w["max_us"],
        "errors": w["connect"] + w["read"] + w["write"] + w["status"] + w["timeout"],
        "err_detail": {k: w[k] for k in ("connect", "read", "write", "status", "timeout")},
        "body_bytes": w["body_bytes"],
        "cpu_front_us": d["cpu_front"] / n * 1e6,
        "cpu_backend_us": (d["cpu_" + be] if be else 0.0) / n * 1e6,
        "cpu_up_us": d["cpu_up"] / n * 1e6 if not is_floor(target) else None,
        "up_conns": d["up_conns"], "up_reqs": d["up_reqs"],
        "up_conns_per_1000": d["up_conns"] / n * 1000 if not is_floor(target) else None,
        "rss_peak_kb": peak["backend"],
        "front_rss_peak_kb": peak["front"],
    }
    res["csw_per_req"] = d["csw_" + be] / n if be else None
    if "cpu_tls" in d:
        res["cpu_tls_us"] = d["cpu_tls"] / n * 1e6
    res["cpu_total_us"] = res["cpu_front_us"] + res["cpu_backend_us"]
    return res


# The TLS nginx's access log is flushed every second.
TLS_FLUSH = 1.3


def tls_counted(st, path, fn):
    """Runs a phase of the tls targets and adds what the TLS nginx logged
    during it: new TLS connections (each began with a handshake), how many
    of them resumed a session, the connections that carried requests, and
    the protocols; and the requests the front logged as 499 (cut off by the
    load's stop: an HTTP/1.1 upstream connection still carrying one is
    closed, and the next phase opens a new one)."""
    flog = os.path.join(RUN, "front-access.log")
    st.handshakes.consume()  # flushed after the phase before
    cut = count_lines(flog, f" {path} ", '" 499 ')
    r = fn()
    time.sleep(TLS_FLUSH)  # both logs flush every second
    h = st.handshakes.consume()
    r["cut_off"] = count_lines(flog, f" {path} ", '" 499 ') - cut
    n = r.get("requests", r.get("n"))
    r.update({"tls_new": h["new"], "tls_resumed": h["resumed"], "tls_conns": h["conns"],
              "tls_reqs": h["requests"], "tls_protocols": h["protocols"],
              "tls_new_per_1000": h["new"] / max(n, 1) * 1000})
    return r


def scrape_metrics(port=None):
    try:
        st, body = http_req("GET", "/metrics", port=port, timeout=5)
    except OSError as e:
        return {"error": str(e)}
    if st != 200:
        return {"error": f"status {st}"}
    g = {}
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^(piapi_pool_\w+|piapi_requests_in_flight)(\{[^}]*\})?\s+(\S+)$", line)
        if m:
            g[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return g


def run_sse(st, target, n, concurrency=None, record=True):
    be = BACKEND[target]
    argv = [os.path.join(BIN, "sse_client"), "--port", str(target_port(target)),
            "--path", sse_path(target), "--n", str(n), "--expect", str(C["chunks"]),
            "--timeout", str(30 + C["chunks"] * C["interval_ms"] / 1000 * (n if concurrency == 1 else 1)),
            "--header", f"Authorization: Bearer {MEMBER_KEY}",
            "--rss", "piapi:" + ",".join(map(str, st.groups[be or "piapi"])),
            "--rss", "front:" + ",".join(map(str, st.groups["front"]))]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    before = st.snapshot()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=pinned("load"))
    gauges = {}
    rss_at_all = {}

    def watch():
        # On ALL_STARTED every stream is open: read the pool gauges then.
        for line in p.stderr:
            if line.startswith("ALL_STARTED") and not gauges and be and n > 1:
                rss_at_all["piapi"] = rss_kb(st.groups[be])
                gauges.update(scrape_metrics(target_port(target)))
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        out, _ = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        p.kill()
        sys.exit("bench: sse_client did not finish in 600 s")
    t.join(5)
    after = st.snapshot()
    try:
        r = json.loads(out)
    except ValueError:
        sys.exit(f"bench: sse_client printed no result: {out!r}")
    d = st.delta(before, after)
    res = {
        "target": target, "n": n, "ok": r["ok"], "errors": r["errors"],
        "error_kinds": r["error_kinds"], "peak_live": r["peak_live"],
        "ttfe_p50_ms": r["ttfe_ms"]["p50"], "ttfe_p99_ms": r["ttfe_ms"]["p99"],
        "ttfe_max_ms": r["ttfe_ms"]["max"],
        "total_p50_ms": r["total_ms"]["p50"], "total_p99_ms": r["total_ms"]["p99"],
        "max_gap_ms": r["max_gap_ms"], "gap_p99_ms": r["stream_max_gap_ms"]["p99"],
        "cpu_front_us": d["cpu_front"] / n * 1e6,
        "cpu_backend_us": (d["cpu_" + be] if be else 0.0) / n * 1e6,
        "cpu_sse_us": d["cpu_sse"] / n * 1e6,
        "csw_per_stream": d["csw_" + be] / n if be else None,
        "sse_conns": d["sse_conns"], "sse_reqs": d["sse_reqs"],
        "sse_conns_per_1000": d["sse_conns"] / n * 1000,
        "rss_peak_kb": r["rss_peak_kb"].get("piapi", 0) if be else 0,
        "front_rss_peak_kb": r["rss_peak_kb"].get("front", 0),
        "gauges": gauges, "rss_at_all_started_kb": rss_at_all.get("piapi"),
    }
    res["cpu_total_us"] = res["cpu_front_us"] + res["cpu_backend_us"]
    return res


def sanity(st):
    hdr = {"Authorization": f"Bearer {MEMBER_KEY}", "Content-Type": "application/json"}
    body = b'{"model":"bench-model","messages":[{"role":"user","content":"hi"}]}'
    for target, path in list(TARGET_PATHS.items()) + list(ONCE_PATHS.items()):
        status, got = http_req("POST", path, body=body, headers=hdr, port=target_port(target))
        if status != 200 or got.decode() != RESPONSE:
            sys.exit(f"bench: sanity: {target} {path} answered {status}: {got[:300]!r}\n"
                     f"piapi log:\n{st.piapi.tail()}\nfront log:\n{st.front.tail()}")
    status, got = http_req("GET", "/metrics")
    if status != 200 or b"piapi_pool_threads" not in got:
        sys.exit(f"bench: sanity: /metrics answered {status}: {got[:300]!r}")
    for target in SSE_PATHS:
        r = run_sse(st, target, 1)
        if r["ok"] != 1:
            sys.exit(f"bench: sanity: one SSE stream through {target} failed: {r}")
    # phase tls: the same checks, and the protocol each target reaches the
    # TLS nginx with (the HTTP/2 column must be HTTP/2).
    for target, path in TLS_PATHS.items():
        want = "HTTP/2.0" if target == "piapi_tls2" else "HTTP/1.1"
        st.handshakes.consume()
        status, got = http_req("POST", path, body=body, headers=hdr, port=target_port(target))
        if status != 200 or got.decode() != RESPONSE:
            sys.exit(f"bench: sanity: {target} {path} answered {status}: {got[:300]!r}\n"
                     f"piapi log:\n{st.piapi.tail()}\nfront log:\n{st.front.tail()}\n"
                     f"TLS nginx log:\n{st.tls.tail()}")
        r = run_sse(st, target, 1)
        if r["ok"] != 1:
            sys.exit(f"bench: sanity: one SSE stream through {target} failed: {r}")
        time.sleep(TLS_FLUSH)
        seen = st.handshakes.consume()["protocols"]
        if not seen or any(not k.startswith(want + " ") for k in seen):
            sys.exit(f"bench: sanity: {target} reached the TLS nginx as {seen}, not {want}")


# ---------------------------------------------------------------- reporting

def med(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def fmt(v, unit="", nd=None):
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if nd is None:
        nd = 0 if abs(v) >= 100 else 1 if abs(v) >= 10 else 2
    return f"{v:,.{nd}f}{unit}"


def ratio(a, b):
    if a is None or b in (None, 0):
        return "—"
    return f"{a / b:.2f}×"


def machine():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    nginx_v = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    curl_v = subprocess.run(["curl-config", "--version"], capture_output=True, text=True).stdout.strip() \
        if shutil.which("curl-config") else "?"
    fcgi_v = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "libfcgi0ldbl"],
                            capture_output=True, text=True).stdout.strip() or "?"
    wrk_v = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "wrk"],
                           capture_output=True, text=True).stdout.strip() or "?"
    return (f"{os.cpu_count()} CPUs ({model}), {mem_kb / 1048576:.1f} GiB RAM, "
            f"Linux {os.uname().release}; {nginx_v.replace('nginx version: ', '')}, "
            f"{curl_v}, libfcgi {fcgi_v}, wrk {wrk_v}")


def report(results, idle_rss, mem, end_idle_rss, hwm, load_before, load_after, elapsed):
    W = lambda phase, tgt: [r for r in results if r["phase"] == phase and r["target"] == tgt]
    rows = []  # (figure, base, floor, piapi, ÷base, ÷floor, target, verdict)

    def add(fig, b=None, fl=None, p=None, rb="—", rf="—", target="", ok=None):
        if ok is not None and p in (None, "—"):
            ok = None  # phase not run
        rows.append((fig, b, fl, p, rb, rf, target,
                     "" if ok is None else ("**PASS**" if ok else "**FAIL**")))

    c = C["conns"]
    wb, wf, wp = W("wrk64", "base"), W("wrk64", "floor"), W("wrk64", "piapi")
    rps = [med(x, "rps") for x in (wb, wf, wp)]
    errs = [sum(r["errors"] for r in x) for x in (wb, wf, wp)]
    ok_tp = rps[2] is not None and rps[1] and rps[2] >= 0.85 * rps[1] and errs[2] == 0
    add(f"req/s, wrk -t{C['wrk_threads']} -c{c}", *[fmt(v) for v in rps],
        ratio(rps[2], rps[0]), ratio(rps[2], rps[1]), "≥ 0.85× floor, 0 errors", ok_tp)
    add(f"errors at c{c} (all rounds: HTTP ≥ 400 + socket errors, as wrk counts them)",
        *[str(e) for e in errs])
    for key, lab in (("p50_us", "p50"), ("p99_us", "p99")):
        v = [med(x, key) for x in (wb, wf, wp)]
        add(f"latency {lab} at c{c}", *[fmt(x / 1000 if x is not None else None, " ms", 2) for x in v],
            ratio(v[2], v[0]), ratio(v[2], v[1]))

    lb, lf, lp = W("wrk1", "base"), W("wrk1", "floor"), W("wrk1", "piapi")
    v = [med(x, "p50_us") for x in (lb, lf, lp)]
    add("latency p50 at c1", *[fmt(x, " µs", 0) for x in v], ratio(v[2], v[0]), ratio(v[2], v[1]))
    added = v[2] - v[0] if None not in (v[0], v[2]) else None
    add("added latency p50 at c1 (vs proxy_pass)", "0 µs",
        fmt(v[1] - v[0], " µs", 0) if None not in (v[0], v[1]) else None,
        fmt(added, " µs", 0), "", "", "≤ +50 µs", added is not None and added <= 50)
    v = [med(x, "rps") for x in (lb, lf, lp)]
    add("req/s at c1", *[fmt(x) for x in v], ratio(v[2], v[0]), ratio(v[2], v[1]))

    cf = [med(x, "cpu_front_us") for x in (wb, wf, wp)]
    cb = [None, med(wf, "cpu_backend_us"), med(wp, "cpu_backend_us")]
    ct = [med(x, "cpu_total_us") for x in (wb, wf, wp)]
    add(f"CPU per request at c{c}: nginx front", *[fmt(x, " µs", 1) for x in cf],
        ratio(cf[2], cf[0]), ratio(cf[2], cf[1]))
    add(f"CPU per request at c{c}: responder (floor / piapi)", "—", fmt(cb[1], " µs", 1),
        fmt(cb[2], " µs", 1), "", ratio(cb[2], cb[1]))
    ok_cpu = None not in (ct[1], ct[2]) and ct[2] <= 1.25 * ct[1]
    add(f"CPU per request at c{c}: nginx + responder", *[fmt(x, " µs", 1) for x in ct],
        ratio(ct[2], ct[0]), ratio(ct[2], ct[1]), "≤ 1.25× nginx+floor", ok_cpu)
    v = [None, med(wf, "csw_per_req"), med(wp, "csw_per_req")]
    add(f"context switches per request at c{c} (responder threads)", "—", fmt(v[1], "", 2),
        fmt(v[2], "", 2), "", ratio(v[2], v[1]))
    v = [med(x, "cpu_up_us") for x in (wb, wf, wp)]
    add(f"CPU per request at c{c}: mock upstream nginx", *[fmt(x, " µs", 1) for x in v])

    # Over all rounds together, not a median: reconnect storms come in one
    # round (after a burst of streams) and a median would hide them.
    def per_1000(rs):
        n = sum(r["requests"] for r in rs)
        return sum(r["up_conns"] for r in rs) / n * 1000 if n else None

    def worst(rs):
        return max((r["up_conns_per_1000"] for r in rs), default=None)
    uc = [per_1000(wb), None, per_1000(wp)]
    add(f"new upstream connections per 1,000 requests, c{c} (all rounds; worst round)",
        fmt(uc[0], "", 2) + (f" ({worst(wb):.2f})" if wb else ""), "—",
        fmt(uc[2], "", 2) + (f" ({worst(wp):.2f})" if wp else ""),
        "", "", "≤ 2", uc[2] is not None and uc[2] <= 2)
    l1b, l1p = W("wrk1", "base"), W("wrk1", "piapi")
    add("new upstream connections per 1,000 requests, c1 (all rounds)",
        fmt(per_1000(l1b), "", 2), "—", fmt(per_1000(l1p), "", 2))
    v = [None, med(wf, "rss_peak_kb"), med(wp, "rss_peak_kb")]
    add(f"responder peak RSS during c{c}", "—", fmt(v[1] and v[1] / 1024, " MiB", 1),
        fmt(v[2] and v[2] / 1024, " MiB", 1))

    ub, up = W("unloaded", "base"), W("unloaded", "piapi")
    v = [med(ub, "ttfe_p50_ms"), med(up, "ttfe_p50_ms")]
    ok_u = None not in v and v[1] <= v[0] + 1.0
    add(f"unloaded stream: time to first event (p50 of {C['unloaded']})", fmt(v[0], " ms", 2), "—",
        fmt(v[1], " ms", 2), f"+{v[1] - v[0]:.2f} ms" if None not in v else "—", "",
        "≤ baseline + 1 ms", ok_u)

    for n in C["streams"]:
        sb, sp = W(f"sse{n}", "base"), W(f"sse{n}", "piapi")
        if not sb and not sp:
            continue
        okb = sum(r["ok"] for r in sb), sum(r["n"] for r in sb)
        okp = sum(r["ok"] for r in sp), sum(r["n"] for r in sp)
        add(f"{n} streams: completed (all rounds)", f"{okb[0]}/{okb[1]}", "—", f"{okp[0]}/{okp[1]}")
        v = [med(sb, "ttfe_p50_ms"), med(sp, "ttfe_p50_ms")]
        add(f"{n} streams: TTFE p50", fmt(v[0], " ms", 1), "—", fmt(v[1], " ms", 1), ratio(v[1], v[0]))
        v = [med(sb, "ttfe_p99_ms"), med(sp, "ttfe_p99_ms")]
        ok_s = okp[0] == okp[1] and okp[1] > 0 and None not in v and v[1] <= v[0] + 20
        add(f"{n} streams: TTFE p99", fmt(v[0], " ms", 1), "—", fmt(v[1], " ms", 1),
            f"+{v[1] - v[0]:.1f} ms" if None not in v else "—", "",
            "all complete, ≤ baseline p99 + 20 ms", ok_s)
        v = [med(sb, "total_p50_ms"), med(sp, "total_p50_ms")]
        v2 = [med(sb, "total_p99_ms"), med(sp, "total_p99_ms")]
        add(f"{n} streams: total stream time p50 / p99",
            f"{fmt(v[0], '', 0)} / {fmt(v2[0], ' ms', 0)}", "—",
            f"{fmt(v[1], '', 0)} / {fmt(v2[1], ' ms', 0)}", ratio(v2[1], v2[0]))
        v = [med(sb, "max_gap_ms"), med(sp, "max_gap_ms")]
        add(f"{n} streams: largest inter-event gap (nominal {C['interval_ms']} ms)",
            fmt(v[0], " ms", 1), "—", fmt(v[1], " ms", 1), ratio(v[1], v[0]))
        v = [med(sb, "cpu_front_us"), med(sp, "cpu_front_us")]
        add(f"{n} streams: CPU per stream, nginx front", fmt(v[0] and v[0] / 1000, " ms", 2), "—",
            fmt(v[1] and v[1] / 1000, " ms", 2), ratio(v[1], v[0]))
        v = [med(sb, "cpu_total_us"), med(sp, "cpu_total_us")]
        cp = med(sp, "cpu_backend_us")
        add(f"{n} streams: CPU per stream, nginx + piapi (piapi alone)",
            fmt(v[0] and v[0] / 1000, " ms", 2), "—",
            f"{fmt(v[1] and v[1] / 1000, ' ms', 2)} ({fmt(cp and cp / 1000, ' ms', 2)})",
            ratio(v[1], v[0]))
        v = [med(sb, "sse_conns_per_1000"), med(sp, "sse_conns_per_1000")]
        add(f"{n} streams: new upstream connections per 1,000 streams", fmt(v[0], "", 0), "—",
            fmt(v[1], "", 0))
        if n == max(C["streams"]):
            # the scrape that saw the most requests in flight
            g = max((r["gauges"] for r in sp if r["gauges"]),
                    key=lambda x: x.get("piapi_requests_in_flight", 0), default={})
            gv = lambda k: fmt(g.get(k), "", 0)
            live = [r["peak_live"] for r in sp]
            busy_k, idle_k = 'piapi_pool_threads{state="busy"}', 'piapi_pool_threads{state="idle"}'
            add(f"{n} streams: piapi pool gauges while all open (/metrics, fullest round)", "—", "—",
                f"threads busy {gv(busy_k)} idle {gv(idle_k)}, "
                f"in flight {gv('piapi_requests_in_flight')}, "
                f"saturated_total {gv('piapi_pool_saturated_total')}; client saw "
                f"{min(live) if live else 0}–{max(live) if live else 0} streams live at once")
            cold = mem.get("cold_peak_kb")
            per = (cold - idle_rss) / mem["cold_n"] if cold else None
            peak = med(sp, "rss_peak_kb")
            add(f"piapi RSS: fresh idle → first {mem.get('cold_n', n)} streams → "
                f"median peak at {n} streams in the rounds", "—", "—",
                f"{idle_rss / 1024:.1f} → {fmt(cold and cold / 1024, '', 1)} → "
                f"{fmt(peak and peak / 1024, ' MiB', 1)}")
            add(f"piapi memory per concurrent stream ((first-burst peak − fresh idle) / "
                f"{mem.get('cold_n', n)})", "—", "—",
                fmt(per, " KB", 1), "", "", "≤ 64 KB", per is not None and per <= 64)
            fb = med(sb, "front_rss_peak_kb")
            fp = med(sp, "front_rss_peak_kb")
            add(f"nginx front peak RSS at {n} streams", fmt(fb and fb / 1024, " MiB", 1), "—",
                fmt(fp and fp / 1024, " MiB", 1))
    add("piapi RSS idle after the run / VmHWM", "—", "—",
        f"{end_idle_rss / 1024:.1f} / {hwm / 1024:.1f} MiB")

    head = ("| figure | proxy_pass (baseline) | floor | piapi | piapi ÷ baseline | piapi ÷ floor "
            "| target | result |\n|---|---:|---:|---:|---:|---:|---|---|\n")
    table = head + "".join("| " + " | ".join(fmt(x) if not isinstance(x, str) else x for x in r)
                           + " |\n" for r in rows)
    verdicts = [r[7] for r in rows if r[7]]
    if not any(r["phase"] in ("wrk64", "wrk1", "unloaded") or r["phase"].startswith("sse")
               for r in results):
        table, verdicts = "(BENCH_PHASES has none of wrk64, wrk1, sse, unloaded.)\n", []
    passed = sum(1 for v in verdicts if "PASS" in v)
    params = (f"{C['rounds']} rounds (medians shown), wrk {C['duration']:g} s at c{c} and "
              f"{C['lat_duration']:g} s at c1 with a {wb[0]['body_bytes'] if wb else '?'}-byte JSON body; "
              f"SSE: {C['chunks']} events {C['interval_ms']} ms apart; piapi --threads {C['threads']}, "
              f"floor {C['floor_threads']} threads, nginx worker_processes {C['nginx_workers']}; "
              f"load average before/after: {load_before} / {load_after}; run took {elapsed / 60:.1f} min")
    md = (f"# make bench results\n\n{time.strftime('%Y-%m-%d %H:%M:%S %Z')} — "
          f"{machine()}\n\n{build_state()}\n\n{params}\n\n{table}\n"
          f"{passed}/{len(verdicts)} targets met.\n")
    return md, table, passed, len(verdicts)


def report_ab(results, idle, mem):
    """BENCH_PIAPI_B: the two slots side by side: medians over rounds, their
    ratio, and the median (min–max) of the per-round ratios B ÷ A."""
    W = lambda phase, tgt: [r for r in results if r["phase"] == phase and r["target"] == tgt]
    rows = []

    def paired(phase, key):
        a = {(r["round"], r.get("slice", 0)): r.get(key) for r in W(phase, "piapi")}
        b = {(r["round"], r.get("slice", 0)): r.get(key) for r in W(phase, "piapi_b")}
        rs = sorted(b[k] / a[k] for k in a if k in b and a[k] and b[k] is not None)
        if not rs:
            return "—"
        return f"{statistics.median(rs):.3f}× ({rs[0]:.2f}–{rs[-1]:.2f})"

    def pooled(rs, key):
        """Over all turns: Σ requests / Σ time for req/s, Σ CPU / Σ
        requests (or streams) for CPU figures."""
        wt = lambda r: r.get("requests", r.get("n", 0))
        rs = [r for r in rs if r.get(key) and wt(r)]
        if not rs:
            return None
        if key == "rps":
            return sum(wt(r) for r in rs) / sum(wt(r) / r[key] for r in rs)
        return sum(r[key] * wt(r) for r in rs) / sum(wt(r) for r in rs)

    def row(fig, key, phase, scale=1.0, unit="", nd=1, agg=med):
        if agg is med and (key == "rps" or key.startswith("cpu_")):
            agg = pooled
        a, b = agg(W(phase, "piapi"), key), agg(W(phase, "piapi_b"), key)
        if a is None and b is None:
            return
        a = a * scale if a is not None else None
        b = b * scale if b is not None else None
        rb = f"{b / a:.3f}×" if a and b is not None else "—"
        rows.append(f"| {fig} | {fmt(a, unit, nd)} | {fmt(b, unit, nd)} | {rb} | "
                    f"{paired(phase, key) if agg in (med, pooled) else ''} |")

    total = lambda rs, k: sum(r[k] for r in rs) if rs else None
    c = C["conns"]
    row(f"req/s at c{c}", "rps", "wrk64", nd=0)
    row(f"errors at c{c} (all rounds)", "errors", "wrk64", nd=0, agg=total)
    row(f"latency p50 at c{c}", "p50_us", "wrk64", 1e-3, " ms", 2)
    row(f"latency p99 at c{c}", "p99_us", "wrk64", 1e-3, " ms", 2)
    row(f"CPU per request at c{c}: nginx front", "cpu_front_us", "wrk64", unit=" µs")
    row(f"CPU per request at c{c}: piapi", "cpu_backend_us", "wrk64", unit=" µs")
    row(f"CPU per request at c{c}: nginx + piapi", "cpu_total_us", "wrk64", unit=" µs")
    row(f"context switches per request at c{c}", "csw_per_req", "wrk64", nd=2)
    row(f"new upstream connections per 1,000 requests at c{c}", "up_conns_per_1000", "wrk64", nd=2)
    row(f"peak RSS during c{c}", "rss_peak_kb", "wrk64", 1 / 1024, " MiB")
    row("latency p50 at c1", "p50_us", "wrk1", unit=" µs", nd=0)
    row("CPU per request at c1: piapi", "cpu_backend_us", "wrk1", unit=" µs")
    row("unloaded stream: TTFE p50", "ttfe_p50_ms", "unloaded", unit=" ms", nd=2)
    for n in C["streams"]:
        row(f"{n} streams: completed (all rounds)", "ok", f"sse{n}", nd=0, agg=total)
        row(f"{n} streams: TTFE p50", "ttfe_p50_ms", f"sse{n}", unit=" ms")
        row(f"{n} streams: TTFE p99", "ttfe_p99_ms", f"sse{n}", unit=" ms")
        row(f"{n} streams: largest gap", "max_gap_ms", f"sse{n}", unit=" ms")
        row(f"{n} streams: CPU per stream, piapi", "cpu_backend_us", f"sse{n}", 1e-3, " ms", 2)
        row(f"{n} streams: peak RSS", "rss_peak_kb", f"sse{n}", 1 / 1024, " MiB")
    n = mem.get("cold_n")
    if n and mem.get("cold_peak_kb_b"):
        per = [(mem["cold_peak_kb"] - idle["piapi"]) / n, (mem["cold_peak_kb_b"] - idle["piapi_b"]) / n]
        rows.append(f"| memory per stream (first burst of {n}, fresh process) | "
                    f"{fmt(per[0], ' KB')} | {fmt(per[1], ' KB')} | {ratio(per[1], per[0])} | |")
    return ("| figure | slot A | slot B | B ÷ A (medians) | B ÷ A per round: median (min–max) |\n"
            "|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n")


def ab_header():
    def desc(binary, extra):
        return f"`{os.path.relpath(binary, ROOT)}` (sha256 {sha12(binary)})" + (
            f" + config `{os.path.relpath(extra, ROOT)}`" if extra else "")
    return (f"\n## A/B\n\nA: {desc(PIAPI, A_EXTRA)}; B: {desc(PIAPI_B, B_EXTRA)}. Same run, "
            f"{C['rounds']} rounds; each slot has its own server block in the same front "
            f"nginx (A :{A_PORT}, B :{B_PORT}); in every phase A and B run back to back, "
            f"in ABBA order ({C['ab_slices']} turns each per wrk phase, the duration split "
            f"among them; {C['ab_repeats']} per stream phase), A first in rounds 1, 3, ..., "
            f"B first in rounds 2, 4, ..., which mirror the round before. req/s and CPU are pooled over all turns (Σ requests "
            f"/ Σ time, Σ CPU / Σ requests); other figures are medians over all turns. The "
            f"last column pairs each turn of B with the adjacent turn of A.\n\n")


def sha12(path):
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def count_lines(path, *needles):
    """Lines of a log file containing every needle."""
    try:
        with open(path, errors="replace") as f:
            return sum(1 for line in f if all(n in line for n in needles))
    except OSError:
        return 0


def run_kc_overload(st):
    """Keep-conn piapi with a small pool (cap = threads + 4 threads) under
    wrk -c64: nginx holds up to 64 + keepalive FastCGI connections, far more
    than piapi's request slots, so requests queue for a slot. Counts what
    that costs: non-2xx answers, nginx's upstream errors for that socket,
    and piapi's 499s (a connection gone under a request) and 503s."""
    elog = os.path.join(RUN, "front-error.log")
    plog = os.path.join(RUN, "piapi_kco.log")
    sock = "piapi_kco.sock"
    before = (count_lines(elog, sock, "prematurely closed"), count_lines(elog, sock),
              count_lines(plog, '"status":499'), count_lines(plog, '"status":503'))
    r = run_wrk(st, "piapi_kco", C["conns"], C["wrk_threads"], C["kc_over_duration"])
    time.sleep(1.2)  # nginx's error log is unbuffered; piapi's lines are written by then
    after = (count_lines(elog, sock, "prematurely closed"), count_lines(elog, sock),
             count_lines(plog, '"status":499'), count_lines(plog, '"status":503'))
    r.update({"nginx_premature": after[0] - before[0], "nginx_upstream_errors": after[1] - before[1],
              "piapi_499": after[2] - before[2], "piapi_503": after[3] - before[3],
              "gauges": scrape_metrics(KCO_PORT), "threads": C["kc_over_threads"]})
    return r


BUSY_G, IDLE_G = 'piapi_pool_threads{state="busy"}', 'piapi_pool_threads{state="idle"}'


def report_kc(results, over):
    """The keep-conn table: the floor and piapi with and without keep-conn,
    against proxy_pass."""
    W = lambda phase, tgt: [r for r in results if r["phase"] == phase and r["target"] == tgt]
    cols = ("base", "floor", "floor_kc", "piapi", "piapi_kc")
    c = C["conns"]
    rows = []

    def add(fig, vals, extra=("", "", "", ""), target="", ok=None):
        rows.append([fig] + list(vals) + list(extra) + [target,
                    "" if ok is None else ("**PASS**" if ok else "**FAIL**")])

    def rat(v):  # floor_kc ÷ base, piapi_kc ÷ base, floor_kc ÷ floor, piapi_kc ÷ piapi
        return (ratio(v[2], v[0]), ratio(v[4], v[0]), ratio(v[2], v[1]), ratio(v[4], v[3]))

    w64 = [W("wrk64", t) for t in cols]
    w1 = [W("wrk1", t) for t in cols]
    rps = [med(x, "rps") for x in w64]
    errs = [sum(r["errors"] for r in x) if x else None for x in w64]
    ok = rps[4] is not None and rps[0] and rps[4] >= 0.5 * rps[0] and errs[4] == 0
    add(f"req/s, wrk -t{C['wrk_threads']} -c{c}", [fmt(v) for v in rps], rat(rps),
        "piapi keep-conn ≥ 0.5× proxy_pass, 0 errors", ok)
    add(f"errors at c{c} (all rounds)", [fmt(e, "", 0) for e in errs])
    for key, lab in (("p50_us", "p50"), ("p99_us", "p99")):
        v = [med(x, key) for x in w64]
        add(f"latency {lab} at c{c}", [fmt(x and x / 1000, " ms", 2) for x in v], rat(v))
    v = [med(x, "p50_us") for x in w1]
    add("latency p50 at c1", [fmt(x, " µs", 0) for x in v], rat(v))
    add("added latency p50 at c1 (vs proxy_pass)",
        [fmt(x - v[0], " µs", 0) if None not in (x, v[0]) else None for x in v])
    v = [med(x, "rps") for x in w1]
    add("req/s at c1", [fmt(x) for x in v], rat(v))
    for key, lab in (("cpu_front_us", "nginx front"), ("cpu_backend_us", "responder"),
                     ("cpu_total_us", "nginx + responder")):
        v = [med(x, key) for x in w64]
        if key == "cpu_backend_us":
            v[0] = None
        add(f"CPU per request at c{c}: {lab}", [fmt(x, " µs", 1) for x in v], rat(v))
    v = [med(x, "cpu_backend_us") for x in w1]
    v[0] = None
    add("CPU per request at c1: responder", [fmt(x, " µs", 1) for x in v], rat(v))
    v = [med(x, "csw_per_req") for x in w64]
    add(f"context switches per request at c{c} (responder threads)",
        [fmt(x, "", 2) for x in v], rat(v))
    v = [med(x, "rss_peak_kb") for x in w64]
    v[0] = None
    add(f"responder peak RSS during c{c}", [fmt(x and x / 1024, " MiB", 1) for x in v])
    head = ("| figure | proxy_pass | floor | floor keep-conn | piapi | piapi keep-conn "
            "| floor kc ÷ proxy_pass | piapi kc ÷ proxy_pass | floor kc ÷ floor "
            "| piapi kc ÷ piapi | target | result |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n")
    table = head + "".join("| " + " | ".join(x if isinstance(x, str) else fmt(x) for x in r)
                           + " |\n" for r in rows)
    text = (f"\n## keep-conn (`fastcgi_keep_conn on`, upstream `keepalive {C['kc_keepalive']}`)"
            f"\n\nSame rounds, interleaved. floor keep-conn: {C['floor_kc_threads']} threads "
            f"(keepalive x workers + c{c}); piapi keep-conn: --threads {C['threads']}.\n\n"
            + table)
    if over:
        g = over.get("gauges") or {}
        text += (f"\nOverload at the pool's cap: piapi keep-conn --threads {over['threads']} "
                 f"(at most {over['threads'] + 4} threads), wrk -c{c} for "
                 f"{C['kc_over_duration']:g} s: {over['requests']:,} requests, "
                 f"{over['rps']:,.0f} req/s, p99 {over['p99_us'] / 1000:.1f} ms, max "
                 f"{over['max_us'] / 1000:.0f} ms; wrk errors {over['errors']} "
                 f"({over['err_detail']}); nginx 'upstream prematurely closed' "
                 f"{over['nginx_premature']} (all upstream errors for the socket "
                 f"{over['nginx_upstream_errors']}); piapi 499 (connection gone under a "
                 f"request) {over['piapi_499']}, 503 (no slot in time) {over['piapi_503']}; "
                 f"pool gauges after: busy {g.get(BUSY_G)}, idle {g.get(IDLE_G)}.\n")
    return text, ok


def report_tls(results):
    """Phase tls: proxy_pass and piapi against the mocks behind TLS."""
    W = lambda phase, tgt: [r for r in results if r["phase"] == phase and r["target"] == tgt]
    cols = ("base_tls", "piapi_tls1", "piapi_tls2")
    c = C["conns"]
    w64 = [W("tls64", t) for t in cols]
    fe = [W("tlsfe", t) for t in cols]
    rows = []

    def add(fig, vals, target="", ok=None):  # vals: strings, one per column
        rows.append([fig] + list(vals) + ["", "", target,
                                          "" if ok is None else ("**PASS**" if ok else "**FAIL**")])

    def num(vals, unit="", nd=None, scale=1.0):
        return [fmt(v * scale if v is not None else None, unit, nd) for v in vals]

    def row(fig, key, rs, unit="", nd=None, scale=1.0):
        v = [med(x, key) for x in rs]
        rows.append([fig] + num(v, unit, nd, scale) + [ratio(v[1], v[0]), ratio(v[2], v[0]), "", ""])
        return v

    protos = []
    for x in w64:
        seen = {}
        for r in x:
            for k, n in r["tls_protocols"].items():
                seen[k] = seen.get(k, 0) + n
        protos.append(", ".join(k.replace(" ", " over ") for k in sorted(seen)) or "—")
    add("protocol to the upstream (as the TLS nginx logged it)", protos)
    row(f"req/s, wrk -t{C['wrk_threads']} -c{c}", "rps", w64)
    errs = [sum(r["errors"] for r in x) if x else None for x in w64]
    add(f"errors at c{c} (all rounds)", [fmt(e, "", 0) for e in errs])
    row(f"latency p50 at c{c}", "p50_us", w64, " ms", 2, 1e-3)
    row(f"latency p99 at c{c}", "p99_us", w64, " ms", 2, 1e-3)
    row(f"CPU per request at c{c}: nginx front", "cpu_front_us", w64, " µs", 1)
    v = [med(x, "cpu_backend_us") for x in w64]
    v[0] = None
    rows.append([f"CPU per request at c{c}: piapi"] + num(v, " µs", 1) + ["", "", "", ""])
    row(f"CPU per request at c{c}: nginx front + piapi", "cpu_total_us", w64, " µs", 1)
    row(f"CPU per request at c{c}: the TLS nginx (upstream side)", "cpu_tls_us", w64, " µs", 1)

    # Over all rounds together, not a median (as for plain HTTP).
    def per_1000(rs):
        n = sum(r["requests"] for r in rs)
        return sum(r["tls_new"] for r in rs) / n * 1000 if n else None
    hs = [per_1000(x) for x in w64]
    worst = [max((r["tls_new_per_1000"] for r in x), default=None) for x in w64]
    ok = None if None in hs[1:] else max(hs[1:]) <= 2
    add(f"new TLS handshakes per 1,000 requests, c{c} (all rounds; worst round)",
        [fmt(h, "", 2) + (f" ({w:.2f})" if w is not None else "") for h, w in zip(hs, worst)],
        target="≤ 2 (piapi)", ok=ok)
    add(f"TLS handshakes at c{c}, all rounds: full / resumed",
        [f"{sum(r['tls_new'] - r['tls_resumed'] for r in x)} / {sum(r['tls_resumed'] for r in x)}"
         if x else "—" for x in w64])
    add(f"requests cut off by wrk's stop at the end of a c{c} phase (499 in the front's "
        f"log, all rounds)", [str(sum(r["cut_off"] for r in x)) if x else "—" for x in w64])
    add(f"TLS connections carrying the requests of a c{c} phase (median)",
        [fmt(med(x, "tls_conns"), "", 0) for x in w64])
    v = [med(x, "ttfe_p50_ms") for x in fe]
    rows.append([f"unloaded stream: time to first event (p50 of {C['unloaded']}, median of rounds)"]
                + num(v, " ms", 2)
                + [f"+{v[1] - v[0]:.2f} ms" if None not in (v[0], v[1]) else "—",
                   f"+{v[2] - v[0]:.2f} ms" if None not in (v[0], v[2]) else "—", "", ""])
    ok_fe = [f"{sum(r['ok'] for r in x)}/{sum(r['n'] for r in x)}" if x else "—" for x in fe]
    add("unloaded streams completed (all rounds)", ok_fe)
    add("new TLS handshakes during the unloaded streams (all rounds)",
        [str(sum(r["tls_new"] for r in x)) if x else "—" for x in fe])
    head = ("| figure | proxy_pass (HTTP/1.1 upstream: all proxy_pass speaks) "
            "| piapi, HTTP/1.1 port | piapi, HTTP/2 port (h2 by ALPN) "
            "| piapi h1 ÷ proxy_pass | piapi h2 ÷ proxy_pass | target | result |\n"
            "|---|---:|---:|---:|---:|---:|---|---|\n")
    table = head + "".join("| " + " | ".join("—" if x is None else x for x in r) + " |\n"
                           for r in rows)
    text = (f"\n## TLS upstream (phase tls)\n\nThe same mocks behind a TLS nginx (throw-away "
            f"CA, TLSv1.2/1.3, session cache and tickets) on two ports: HTTP/1.1 only "
            f"({TLS1_PORT}) and HTTP/2 offered by ALPN ({TLS2_PORT}). proxy_pass: https "
            f"upstream, keepalive 128, proxy_ssl_session_reuse on, proxy_ssl_verify with the "
            f"CA. piapi: https baseUrl, settings.caFile = the CA. Same rounds, interleaved; "
            f"wrk {C['duration']:g} s at c{c}, then {C['unloaded']} unloaded streams one "
            f"after another per target. A new TLS handshake is a connection number the TLS "
            f"nginx had not logged before (full, or resumed when its first request has "
            f"$ssl_session_reused = r).\n\n" + table)
    return text, ok


def build_state():
    """Which piapi was measured: the tree changes under the bench."""
    def git(*args):
        r = subprocess.run(["git", "-C", ROOT] + list(args), capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""
    head = git("rev-parse", "--short", "HEAD") or "?"
    dirty = git("status", "--porcelain", "--", "src", "include")
    with open(PIAPI, "rb") as f:
        import hashlib
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    return (f"piapi binary {os.path.relpath(PIAPI, ROOT)} (sha256 {digest}, built "
            f"{time.strftime('%H:%M', time.localtime(os.path.getmtime(PIAPI)))}) from git {head}"
            + (" with uncommitted changes in src/ or include/" if dirty else ""))


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# -------------------------------------------------------------------- main

def ab_order(xs, rnd):
    """The targets of one phase in round rnd, rotated by the round. In A/B
    mode piapi_b is kept next to piapi and the rotation moves every second
    round only: round 2m+1 is round 2m with A and B swapped (expand_ab
    turns the order round), so whatever runs before a turn of A (another
    target, a phase of other work) runs before the same turn of B in the
    mirror round."""
    if "piapi_b" not in xs:
        return xs[rnd % len(xs):] + xs[:rnd % len(xs)]
    rest = [x for x in xs if x != "piapi_b"]
    r = (rnd // 2) % len(rest)
    rest = rest[r:] + rest[:r]
    pair = ["piapi", "piapi_b"] if rnd % 2 == 0 else ["piapi_b", "piapi"]
    i = rest.index("piapi")
    return rest[:i] + pair + rest[i + 1:]


def expand_ab(phase, ts, rnd, k, mk):
    """(phase, target, slice, fn) entries of one phase in round rnd. In A/B
    mode the pair piapi/piapi_b becomes k turns each in ABBA order (A B B A
    A B B A ...; B A A B ... in odd rounds), so that slow spells of the
    machine fall on both slots alike: the wrk phases split their duration
    into k slices (BENCH_AB_SLICES), the stream phases repeat k times
    (BENCH_AB_REPEATS). mk(target, k) gives the phase's function."""
    out = []
    for t in ts:
        if t == "piapi_b":
            continue
        if t == "piapi" and PIAPI_B:
            first, second = ("piapi", "piapi_b") if rnd % 2 == 0 else ("piapi_b", "piapi")
            for j in range(k):
                for u in ((first, second) if j % 2 == 0 else (second, first)):
                    out.append((phase, u, mk(u, k), j))
        else:
            out.append((phase, t, mk(t, 1)))
    return out


def bench():
    t_start = time.monotonic()
    st = Stack()
    load_before = loadavg()
    last = A_PORT if PIAPI_B else TLS2_PORT if TLS else KCO_PORT if C["keepconn"] else SSE_PORT
    log(f"starting the stack in {RUN} (ports {FRONT_PORT}-{last}, "
        f"upstream connections counted with {st.count_mode})")
    st.start()
    sanity(st)
    time.sleep(0.5)
    idle_rss = rss_kb(st.groups["piapi"])
    idle = {t: rss_kb(st.groups[t]) for t in ("piapi", "piapi_b") if t in st.groups}
    log(f"piapi idle RSS {idle} KB; pool gauges {scrape_metrics()}")

    # Memory per stream is measured on a fresh process: the first burst of
    # the largest stream count, right after the idle reading. (Later rounds
    # run on a pool whose threads and heap already exist.)
    # A/B: slot B gets the same cold burst, so both pools start alike.
    mem, cold = {}, set()
    if C["streams"] and "sse" in C["phases"]:
        n = max(C["streams"])
        for t in ("piapi", "piapi_b") if PIAPI_B else ("piapi",):
            r = run_sse(st, t, n)
            cold.add(t)
            if t == "piapi":
                mem = {"cold_n": n, "cold_peak_kb": r["rss_peak_kb"], "cold_ok": r["ok"]}
            else:
                mem["cold_peak_kb_b"] = r["rss_peak_kb"]
            log(f"first burst of {n} streams, {t}: ok {r['ok']}, RSS {idle[t]} → "
                f"{r['rss_peak_kb']} KB ({(r['rss_peak_kb'] - idle[t]) / n:.1f} KB per stream)")
    if C["warmup"]:
        log("warm-up (not recorded)")
        want = set(C["phases"])
        for t in TARGET_PATHS if want & {"wrk64", "wrk1"} else []:
            run_wrk(st, t, C["conns"], C["wrk_threads"], 2)
        for t in SSE_PATHS if want & {"sse", "unloaded"} else []:
            if t not in cold:
                run_sse(st, t, max(C["streams"]) if C["streams"] else 1)
        # phase tls: the connections (and TLS sessions) a steady load keeps
        for t in TLS_PATHS:
            run_wrk(st, t, C["conns"], C["wrk_threads"], 2)
            run_sse(st, t, 1)
    if TLS:
        time.sleep(TLS_FLUSH)
        st.handshakes.consume()

    results = []
    targets, sse_targets, tls_targets = list(TARGET_PATHS), list(SSE_PATHS), list(TLS_PATHS)
    over = None
    for rnd in range(C["rounds"]):
        rot = lambda xs: ab_order(xs, rnd)
        phases = []
        want = C["phases"]
        slices = lambda d: max(1, round(d / C["ab_slices"]))
        if "wrk64" in want:
            phases += expand_ab("wrk64", rot(targets), rnd, C["ab_slices"], lambda t, k: (
                lambda: run_wrk(st, t, C["conns"], C["wrk_threads"],
                                slices(C["duration"]) if k > 1 else C["duration"])))
        if "wrk1" in want:
            phases += expand_ab("wrk1", rot(targets), rnd, C["ab_slices"], lambda t, k: (
                lambda: run_wrk(st, t, 1, 1, slices(C["lat_duration"]) if k > 1
                                else C["lat_duration"])))
        for n in C["streams"] if "sse" in want else []:
            phases += expand_ab(f"sse{n}", rot(sse_targets), rnd, C["ab_repeats"],
                                lambda t, k, n=n: (lambda: run_sse(st, t, n)))
        if "unloaded" in want:
            phases += expand_ab("unloaded", rot(sse_targets), rnd, C["ab_repeats"],
                                lambda t, k: (lambda: run_sse(st, t, C["unloaded"], 1)))
        for t in rot(tls_targets) if TLS else []:
            phases.append(("tls64", t, lambda t=t: tls_counted(st, wrk_path(t), lambda: run_wrk(
                st, t, C["conns"], C["wrk_threads"], C["duration"]))))
        for t in rot(tls_targets) if TLS else []:
            phases.append(("tlsfe", t, lambda t=t: tls_counted(
                st, sse_path(t), lambda: run_sse(st, t, C["unloaded"], 1))))
        for entry in phases:
            phase, t, fn = entry[:3]
            st.check_alive()
            st.trim_log()
            time.sleep(C["settle"])
            r = fn()
            r["phase"], r["round"] = phase, rnd + 1
            r["slice"] = entry[3] if len(entry) > 3 else 0
            results.append(r)
            if phase.startswith("tls"):
                log(f"round {rnd + 1} {phase:8} {t:10}: "
                    + (f"{r['rps']:9.0f} req/s  p50 {r['p50_us']:6.0f} µs  err {r['errors']}  "
                       f"cpu {r['cpu_total_us']:5.1f} µs/req  TLS nginx {r['cpu_tls_us']:5.1f} µs/req"
                       if phase == "tls64" else
                       f"ok {r['ok']}/{r['n']}  TTFE p50 {r['ttfe_p50_ms']:.2f} ms")
                    + f"  TLS handshakes {r['tls_new']} ({r['tls_resumed']} resumed) over "
                    f"{r['tls_conns']} connections  {r['tls_protocols']}  cut off at the end "
                    f"{r['cut_off']}")
            elif phase.startswith("wrk"):
                log(f"round {rnd + 1} {phase:8} {t:8}: {r['rps']:9.0f} req/s  p50 {r['p50_us']:6.0f} µs"
                    f"  p99 {r['p99_us']:7.0f} µs  err {r['errors']}  cpu {r['cpu_total_us']:5.1f} µs/req"
                    + (f"  new up conns {r['up_conns']}" if not is_floor(t) else ""))
            else:
                log(f"round {rnd + 1} {phase:8} {t:8}: ok {r['ok']}/{r['n']}  TTFE p50 "
                    f"{r['ttfe_p50_ms']:.2f} p99 {r['ttfe_p99_ms']:.2f} ms  total p99 "
                    f"{r['total_p99_ms']:.0f} ms  gap {r['max_gap_ms']:.1f} ms  live {r['peak_live']}"
                    + (f"  gauges {r['gauges']}" if r.get("gauges") else ""))
    st.check_alive()
    if C["keepconn"] and "kcover" in C["phases"]:
        time.sleep(C["settle"])
        over = run_kc_overload(st)
        over["phase"], over["round"] = "kcover", 0
        results.append(over)
        log(f"keep-conn overload, --threads {over['threads']}: {over['requests']} requests "
            f"{over['rps']:.0f} req/s, wrk errors {over['errors']} {over['err_detail']}, nginx "
            f"'prematurely closed' {over['nginx_premature']}, piapi 499 {over['piapi_499']} "
            f"503 {over['piapi_503']}, gauges {over['gauges']}")
        st.check_alive()
    time.sleep(1.0)
    end_idle = rss_kb(st.groups["piapi"])
    hwm = status_kb(st.piapi.pid, "VmHWM")
    load_after = loadavg()
    md, table, passed, total = report(results, idle_rss, mem, end_idle, hwm, load_before,
                                      load_after, time.monotonic() - t_start)
    if C["keepconn"] and any(r["phase"].startswith("wrk") or r["phase"] == "kcover"
                             for r in results):
        kc_md, kc_ok = report_kc(results, over)
        md += kc_md
        log(f"keep-conn target (piapi keep-conn ≥ 0.5× proxy_pass): {'met' if kc_ok else 'missed'}")
    if TLS:
        tls_md, tls_ok = report_tls(results)
        md += tls_md
        log(f"TLS target (piapi ≤ 2 new TLS handshakes per 1,000 requests): "
            f"{'met' if tls_ok else 'missed'}")
    if PIAPI_B:
        md += ab_header() + report_ab(results, idle, mem)
    with open(os.path.join(OUT, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump({"config": C, "idle_rss_kb": idle_rss, "first_burst": mem,
                   "end_idle_rss_kb": end_idle,
                   "vmhwm_kb": hwm, "results": results}, f, indent=1)
    print()
    print(md)
    log(f"wrote {os.path.join(OUT, 'results.md')} and results.json "
        f"({passed}/{total} targets met)")


def profile():
    """perf (cpu-clock, call graphs) on piapi under the wrk -c64 load, plus
    a system-wide profile of the same load; callgrind when perf cannot
    sample here."""
    prof = os.path.join(OUT, "profile")
    if os.path.isdir(prof):
        shutil.rmtree(prof)  # perf would keep every old recording as *.old
    os.makedirs(prof)
    st = Stack()
    st.start()
    sanity(st)
    log("warm-up")
    run_wrk(st, "piapi", C["conns"], C["wrk_threads"], 2)
    dur = C["duration"]
    perf_ok = os.environ.get("BENCH_PROFILER", "perf") == "perf" and shutil.which("perf") and subprocess.run(
        ["perf", "record", "-e", "cpu-clock", "-o", os.path.join(prof, "probe.data"), "true"],
        capture_output=True).returncode == 0
    summary = {}
    if perf_ok:
        # piapi alone with DWARF call graphs (Debian's libraries have no
        # frame pointers), then the whole machine with frame pointers only.
        for scope, extra in (("piapi", ["-p", str(st.piapi.pid), "-F", "999",
                                        "--call-graph", "dwarf,16384"]),
                             ("system", ["-a", "-F", "2999", "-g"])):
            data = os.path.join(prof, f"perf-{scope}.data")
            rec = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-o", data] + extra,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
            time.sleep(0.5)
            r = run_wrk(st, "piapi", C["conns"], C["wrk_threads"],
                        min(dur, 4) if scope == "piapi" else dur)
            rec.send_signal(signal.SIGINT)
            rec.wait(60)
            summary[scope] = r
            log(f"perf {scope}: {r['rps']:.0f} req/s, piapi {r['cpu_backend_us']:.1f} µs/req, "
                f"front {r['cpu_front_us']:.1f} µs/req")
            sort = "dso" if scope == "piapi" else "comm,dso"
            reports = [(f"{scope}-by-dso.txt", ["--no-children", "--sort", sort, "-g", "none"]),
                       (f"{scope}-by-symbol.txt", ["--no-children", "--sort", "dso,sym", "-g", "none"])]
            if scope == "piapi":
                # inclusive time per function: where a request's time goes
                reports.append(("piapi-inclusive.txt", ["--children", "--sort", "dso,sym",
                                                        "-g", "none"]))
            for name, args in reports:
                with open(os.path.join(prof, name), "w") as f:
                    subprocess.run(["perf", "report", "-i", data, "--stdio",
                                    "--percent-limit", "0.3"] + args,
                                   stdout=f, stderr=subprocess.DEVNULL, timeout=600)
    else:
        log("perf cannot sample here: callgrind on a fixed request count instead")
        st.piapi.stop()
        out = os.path.join(prof, "callgrind.out")
        st.piapi = Proc("piapi-callgrind", ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                                            PIAPI, "--config", os.path.join(RUN, "piapi.yaml"),
                                            "--socket", os.path.join(RUN, "piapi.sock"),
                                            "--socket-mode", "0666", "--threads", "64",
                                            "--log-file", st.piapi_log])
        wait_unix(os.path.join(RUN, "piapi.sock"), st.piapi, 60)
        w = subprocess.run(["wrk", "-t1", "-c8", "-d10s", "-s", os.path.join(HERE, "post.lua"),
                            f"http://127.0.0.1:{FRONT_PORT}{TARGET_PATHS['piapi']}"],
                           capture_output=True, text=True)
        m = re.search(r"^BENCHJSON (\{.*\})$", w.stdout, re.M)
        nreq = json.loads(m.group(1))["requests"] if m else 0
        st.piapi.stop(30)
        with open(os.path.join(prof, "callgrind.txt"), "w") as f:
            subprocess.run(["callgrind_annotate", "--inclusive=no", out], stdout=f)
        # user-space instructions per request, by object (no kernel here)
        by_obj = {}
        with open(os.path.join(prof, "callgrind.txt")) as f:
            for line in f:
                m = re.match(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+\S+ \[(.+)\]\s*$", line)
                if m:
                    obj = os.path.basename(m.group(2))
                    by_obj[obj] = by_obj.get(obj, 0) + int(m.group(1).replace(",", ""))
        summary["callgrind"] = {"requests": nreq, "instructions_per_request_by_object": {
            k: round(v / max(nreq, 1)) for k, v in sorted(by_obj.items(), key=lambda kv: -kv[1])}}
        log(f"callgrind: {nreq} requests; user-space instructions per request by object: "
            f"{summary['callgrind']['instructions_per_request_by_object']}")
    # Exact syscall counts per request (strace slows everything down, so
    # only counts are taken from it, never times).
    if shutil.which("strace"):
        for target in ("floor", "piapi"):
            proc = st.piapi if target == "piapi" else st.floor
            if not proc.alive():
                continue
            out = os.path.join(prof, f"strace-{target}.txt")
            tr = subprocess.Popen(["strace", "-f", "-c", "-o", out, "-p", str(proc.pid)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
            time.sleep(1.0)
            r = run_wrk(st, target, 8, 1, 3)
            tr.send_signal(signal.SIGINT)
            tr.wait(60)
            summary[f"strace-{target}"] = {"requests": r["requests"]}
            with open(out) as f:
                text = f.read()
            calls = {}
            for line in text.splitlines():
                parts = line.split()
                if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                    calls[parts[-1]] = int(parts[3])
            per = {k: round(v / max(r["requests"], 1), 2) for k, v in
                   sorted(calls.items(), key=lambda kv: -kv[1])}
            summary[f"strace-{target}"]["per_request"] = per
            summary[f"strace-{target}"]["total_per_request"] = round(
                sum(calls.values()) / max(r["requests"], 1), 1)
            log(f"syscalls per request, {target}: {summary[f'strace-{target}']['total_per_request']} "
                f"{dict(list(per.items())[:12])}")
    with open(os.path.join(prof, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(f"profile written to {prof}")


def serve():
    """Starts the stack and keeps it up for manual experiments."""
    st = Stack()
    st.start()
    sanity(st)
    secs = min(env_num("BENCH_SERVE_SECONDS", 600.0), 3600.0)
    with open(os.path.join(RUN, "pids.json"), "w") as f:
        json.dump(st.groups, f)
    log(f"serving for {secs:g} s (Ctrl-C stops): " + ", ".join(
        f"http://127.0.0.1:{FRONT_PORT}{p}" for p in list(TARGET_PATHS.values()) +
        list(SSE_PATHS.values()) + list(TLS_PATHS.values()) + list(TLS_SSE_PATHS.values()))
        + f"; pids in {RUN}/pids.json")
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        st.check_alive()
        time.sleep(1)


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "bench"
    for need in (PIAPI, os.path.join(BIN, "sse_server"), os.path.join(BIN, "sse_client"),
                 os.path.join(BIN, "floor")):
        if not os.access(need, os.X_OK):
            sys.exit(f"bench: {need} is missing (run `make bench`)")
    os.makedirs(OUT, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit("bench: terminated"))
    signal.signal(signal.SIGINT, lambda *a: sys.exit("bench: interrupted"))
    try:
        if mode == "profile":
            profile()
        elif mode == "serve":
            serve()
        elif mode == "bench":
            bench()
        else:
            sys.exit(f"bench: unknown mode {mode!r} (bench, profile or serve)")
    finally:
        stop_all()


if __name__ == "__main__":
    main()
