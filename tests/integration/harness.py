"""Starts the real thing for piapi's integration tests: the mock upstream,
piapi in one of its launch forms, and nginx or lighttpd rendered from the
deploy/ configs into a private temp dir. Standard library only.

Launch forms (FORMS):
  nginx             piapi --socket DIR/piapi.sock --socket-mode 0666,
                    nginx with deploy/nginx/nginx.conf + piapi.conf
  lighttpd-socket   same piapi, lighttpd with deploy/lighttpd/piapi-socket.conf
  lighttpd-binpath  lighttpd with deploy/lighttpd/piapi-bin-path.conf spawning
                    piapi itself (socket DIR/piapi.sock-0, piapi's stderr is
                    lighttpd's stderr)
  spawn-fcgi        spawn-fcgi -s DIR/piapi.sock -M 0660 -G www-data -n -- piapi,
                    fronted by nginx

Typical use in a test module:

    class Checks:
        FORM = None
        @classmethod
        def setUpClass(cls):
            cls.stack = harness.Stack(cls.FORM, my_config)   # my_config(stack) -> dict
            cls.addClassCleanup(cls.stack.stop)
            cls.stack.start()
    class TestNginx(Checks, unittest.TestCase): FORM = "nginx"

Stack(..., mock_tls=True) serves the mock over HTTPS with a certificate from
a throw-away CA (stack.tls["ca"], for the config's settings.caFile).

Environment: BUILD (default "build", relative to the repo root) names the
directory holding the piapi binary; PIAPI_KEEP_TMP=1 keeps the temp dirs;
PIAPI_LOG_LEVEL (default "debug") is passed as --log-level.
"""
import atexit
import base64
import http.client
import json
import os
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEPLOY = REPO / "deploy"
FORMS = ("nginx", "lighttpd-socket", "lighttpd-binpath", "spawn-fcgi")
KEEP_TMP = os.environ.get("PIAPI_KEEP_TMP") == "1"
READY_TIMEOUT = 5.0


class HarnessError(Exception):
    pass


def build_dir():
    b = Path(os.environ.get("BUILD", "build"))
    return b if b.is_absolute() else REPO / b


def piapi_bin():
    return build_dir() / "piapi"


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port():
    """A port with (very probably) nothing listening: connect gets ECONNREFUSED."""
    return free_port()


def listen_local():
    """A listening TCP socket on 127.0.0.1 and a free port: (sock, port)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock, sock.getsockname()[1]


def serve_connections(sock, handle):
    """handle(conn) in a thread of its own for every connection accepted on
    sock, until sock is closed (test servers)."""
    def accept_loop():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()
    threading.Thread(target=accept_loop, daemon=True).start()


class RawUpstream:
    """A raw HTTP/1.1 upstream on loopback for answers no well-behaved
    server gives (cut streams, split events, odd heads): every request is
    answered by self.answer(conn, head, body), and (head, body) of each is
    kept in self.seen."""

    def __init__(self):
        self.sock, self.port = listen_local()
        self.seen = []
        self.answer = None
        serve_connections(self.sock, self._handle)

    def _handle(self, conn):
        try:
            conn.settimeout(15)
            data = read_head(conn)
            if data is None:
                return
            head, _, body = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(body) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                body += chunk
            self.seen.append((head, body))
            answer = self.answer
            if answer:
                answer(conn, head, body)
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self):
        self.sock.close()

    @property
    def bodies(self):
        """The request bodies received, in order."""
        return [body for _, body in self.seen]


def redis_ping(port):
    """Whether a Redis answers PING on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def redis_cli(port, *args, db=0):
    """redis-cli's answer to one command, as text."""
    return subprocess.run(["redis-cli", "-p", str(port), "-n", str(db)] + list(args),
                          capture_output=True, text=True, timeout=10).stdout


class RedisPair(unittest.TestCase):
    """Two piapi instances, each behind its own nginx, on one throw-away
    redis-server: NAME names them, config(port) gives their config
    callable."""
    NAME = "redis-pair"

    @classmethod
    def config(cls, port):
        raise NotImplementedError

    @classmethod
    def setUpClass(cls):
        cls.port = free_port()
        cls.redis = start_redis(cls.port)
        cfg = cls.config(cls.port)
        cls.a = Stack("nginx", cfg, name=f"{cls.NAME}-a").start()
        cls.b = Stack("nginx", cfg, name=f"{cls.NAME}-b").start()
        for s in (cls.a, cls.b):
            assert wait_until(lambda: s.request("GET", "/healthz").body == b"ok\n", 5.0, 0.05)

    @classmethod
    def tearDownClass(cls):
        for s in (cls.a, cls.b):
            s.stop()
        cls.redis.stop()

    def cli(self, *args):
        return redis_cli(self.port, *args).strip()


def start_redis(port, *extra):
    """A throw-away redis-server on 127.0.0.1:port (no persistence), once
    it answers PING; the caller stops the Proc."""
    proc = Proc("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no", *extra],
                stderr_path="/dev/null")
    if not wait_until(lambda: redis_ping(port), 5.0, 0.05):
        proc.stop()
        raise HarnessError(f"redis-server did not start on port {port}")
    return proc


def read_head(conn):
    """Bytes from conn up to and including the blank line that ends an HTTP
    head (with whatever followed in the same reads); None if it closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    return data


def wait_until(pred, timeout, interval=0.02):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            return v
        time.sleep(interval)


# ---------------------------------------------------------------- YAML ----

def _yaml_scalar(v):
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, (int, float)):
        return repr(v)
    # JSON string escapes are valid in YAML double-quoted scalars
    return json.dumps(str(v), ensure_ascii=False)


def to_yaml(obj, indent=0):
    """Block-style YAML for dicts / lists / scalars (keys are plain words)."""
    pad = "  " * indent
    lines = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{pad}{k}:")
                lines.append(to_yaml(v, indent + 1))
            elif isinstance(v, (dict, list)):
                lines.append(f"{pad}{k}: {'{}' if isinstance(v, dict) else '[]'}")
            else:
                lines.append(f"{pad}{k}: {_yaml_scalar(v)}")
    elif isinstance(obj, list):
        for item in obj:
            if isinstance(item, (dict, list)) and item:
                sub = to_yaml(item, indent + 1).split("\n")
                lines.append(f"{pad}- {sub[0].lstrip()}")
                lines.extend(sub[1:])
            else:
                lines.append(f"{pad}- {_yaml_scalar(item)}")
    else:
        lines.append(pad + _yaml_scalar(obj))
    return "\n".join(lines)


def write_config(path, config):
    """config: dict (rendered as YAML) or str (written as is). Mode 0600."""
    text = config if isinstance(config, str) else to_yaml(config) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


# ----------------------------------------------------------- processes ----

_LIVE = []  # every Proc started and not yet stopped

try:
    import ctypes
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover
    _libc = None


def _die_with_parent():
    """preexec_fn: SIGTERM this child if the test runner dies (even by
    SIGKILL), so nginx/lighttpd/piapi shut down their own children too."""
    if _libc is not None:
        _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Proc:
    """A child in its own session (process group), stopped reliably."""

    def __init__(self, name, argv, stderr_path, stdout=subprocess.DEVNULL, cwd=None,
                 env=None, stdin=subprocess.DEVNULL, pass_fds=()):
        self.name, self.argv, self.stderr_path = name, [str(a) for a in argv], stderr_path
        self._err = open(stderr_path, "ab")
        self.popen = subprocess.Popen(self.argv, stdin=stdin, stdout=stdout, stderr=self._err,
                                      cwd=cwd, env=env, start_new_session=True,
                                      pass_fds=pass_fds, preexec_fn=_die_with_parent)
        self.pid = self.popen.pid
        self.needed_kill = False
        self.exit_code = None
        self.group_leftovers = []
        _LIVE.append(self)

    def alive(self):
        return self.popen.poll() is None

    def stop(self, timeout=5.0, sig=signal.SIGTERM):
        """SIGTERM, wait up to timeout, then SIGKILL (the whole process group)."""
        if self.alive():
            try:
                self.popen.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.needed_kill = True
                self._killpg()
                self.popen.wait(5)
        self.exit_code = self.popen.returncode
        # children left in the group (lighttpd's bin-path spawns): give them
        # a moment to finish their own shutdown, note them, then kill them
        wait_until(lambda: not pids_in_group(self.pid), 3.0, 0.05)
        self.group_leftovers = pids_in_group(self.pid)
        if self.group_leftovers:
            self._killpg()
        self._err.close()
        if self in _LIVE:
            _LIVE.remove(self)
        return self.exit_code

    def _killpg(self):
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def stderr_text(self):
        try:
            return Path(self.stderr_path).read_text(errors="replace")
        except OSError:
            return ""


_STACKS = []  # every Stack not yet stopped


def stop_all():
    """Stops every Stack and Proc still running (the run.py watchdog)."""
    for st in list(_STACKS):
        try:
            st.stop()
        except Exception:  # noqa: BLE001 - best effort
            pass
    _stop_all_live()


def _stop_all_live():
    for p in list(_LIVE):
        try:
            p.stop(timeout=2)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


atexit.register(lambda: stop_all())


def pids_in_group(pgid):
    """PIDs (other than zombies) whose process group is pgid."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(d))
    return out


def pids_mentioning(text):
    """PIDs whose command line contains `text` (our unique temp dir)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and int(d) != os.getpid():
            out.append(int(d))
    return out


# --------------------------------------------------------------- mock -----

def make_test_pki(d):
    """A throw-away CA and a server certificate it signed for 127.0.0.1 (not
    for localhost), made with the openssl tool in d: {"ca", "cert", "key"}."""
    d = Path(d)
    ca_key, ca, key, csr, cert = (d / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem"))
    ext = d / "srv.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n"
                   "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    steps = [
        ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=piapi test CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key,
         "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext],
    ]
    for argv in steps:
        r = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
        if r.returncode != 0:
            raise HarnessError(f"{' '.join(map(str, argv[:3]))} failed: {r.stderr}")
    return {"ca": ca, "cert": cert, "key": key}


class Mock:
    """tests/integration/mock_upstream.py in a child process; with tls (from
    make_test_pki) it serves HTTPS."""

    def __init__(self, tmp, tls=None):
        self.record = Path(tmp) / "mock-requests.jsonl"
        argv = [sys.executable, HERE / "mock_upstream.py", "--port", "0", "--record", self.record]
        if tls:
            argv += ["--tls", tls["cert"], tls["key"]]
        self.proc = Proc("mock", argv, stderr_path=Path(tmp) / "mock.stderr",
                         stdout=subprocess.PIPE)
        line = self._readline(5.0)
        if not line.startswith("PORT "):
            raise HarnessError(f"mock did not start: {line!r} {self.proc.stderr_text()}")
        self.port = int(line.split()[1])
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._ssl = ssl.create_default_context(cafile=str(tls["ca"])) if tls else None

    def _readline(self, timeout):
        r, _, _ = select.select([self.proc.popen.stdout], [], [], timeout)
        return self.proc.popen.stdout.readline().decode().strip() if r else ""

    def _call(self, method, what):
        req = urllib.request.Request(f"{self.base}/__mock/{what}", method=method,
                                     data=b"" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=5, context=self._ssl) as r:
            return json.loads(r.read())

    def requests(self):
        """Recorded requests, each with `body` (bytes) decoded."""
        reqs = self._call("GET", "requests")
        for r in reqs:
            r["body"] = base64.b64decode(r["body_b64"])
        return reqs

    def events(self):
        return self._call("GET", "events")

    def stats(self):
        return self._call("GET", "stats")

    def reset(self):
        return self._call("POST", "reset")

    def stop(self):
        self.proc.stop(timeout=2)


def header_values(pairs, name):
    """All values of header `name` (case-insensitive) in a [[k, v], ...] list."""
    n = name.lower()
    return [v for k, v in pairs if k.lower() == n]


# ------------------------------------------------------------ HTTP ------

class Response:
    def __init__(self, status, reason, headers, body):
        self.status, self.reason, self.headers, self.body = status, reason, headers, body

    def header(self, name):
        vals = header_values(self.headers, name)
        return vals[0] if vals else None

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Response {self.status} {self.headers!r} {self.body[:300]!r}>"


def http_request(port, method, path, headers=(), body=None, timeout=10.0,
                 host="127.0.0.1", source=None):
    """One request on a fresh connection; `headers` is a list of (name, value)
    sent exactly (no automatic Accept-Encoding; Host is added unless given)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        names = {k.lower() for k, _ in headers}
        conn.putrequest(method, path, skip_host="host" in names, skip_accept_encoding=True)
        for k, v in headers:
            conn.putheader(k, v)
        if body is not None and "content-length" not in names and \
                "transfer-encoding" not in names:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, resp.reason, resp.getheaders(), data)
    finally:
        conn.close()


class RawExchange:
    """A raw HTTP exchange with the arrival time of every recv()."""

    def __init__(self, t0, chunks, closed):
        self.t0, self.chunks, self.closed = t0, chunks, closed  # chunks: [(t, bytes)]
        raw = b"".join(c for _, c in chunks)
        self.raw = raw
        head, sep, _ = raw.partition(b"\r\n\r\n")
        self.head_end = len(head) + len(sep) if sep else None
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1]) if sep and len(lines[0].split()) > 1 else None
        self.headers = [tuple(x.strip() for x in l.split(":", 1)) for l in lines[1:] if ":" in l]
        self.headers_at = self.time_of(self.head_end - 1) if sep else None

    def header(self, name):
        vals = header_values(self.headers, name)
        return vals[0] if vals else None

    def time_of(self, raw_offset):
        """Seconds after the request was sent when byte raw_offset arrived."""
        n = 0
        for t, c in self.chunks:
            n += len(c)
            if raw_offset < n:
                return t - self.t0
        return None

    def body_segments(self):
        """[(raw_offset_of_segment_start, data)] of the body, de-chunked if needed."""
        if self.head_end is None:
            return []
        raw, off = self.raw, self.head_end
        if (self.header("Transfer-Encoding") or "").lower() != "chunked":
            return [(off, raw[off:])]
        segs = []
        while True:
            eol = raw.find(b"\r\n", off)
            if eol < 0:
                break
            try:
                size = int(raw[off:eol].split(b";")[0], 16)
            except ValueError:
                break
            if size == 0:
                break
            start = eol + 2
            segs.append((start, raw[start:start + size]))
            off = start + size + 2
        return segs

    def body(self):
        return b"".join(d for _, d in self.body_segments())

    def arrival_of(self, needle):
        """Seconds after sending at which the last byte of `needle` (in the
        de-chunked body) arrived, or None."""
        segs = self.body_segments()
        body = b"".join(d for _, d in segs)
        i = body.find(needle)
        if i < 0:
            return None
        last = i + len(needle) - 1
        pos = 0
        for raw_off, d in segs:
            if last < pos + len(d):
                return self.time_of(raw_off + (last - pos))
            pos += len(d)
        return None


def raw_exchange(port, request_bytes, timeout=10.0, close_after=None, rst=False,
                 host="127.0.0.1", then=(), gap=0.05):
    """Sends request_bytes (then each of `then`, `gap` seconds apart: a slow
    upload), records (time, data) of every recv until the peer closes or
    `timeout`. With close_after=(needle, delay): once needle has been
    received, wait delay seconds and close (RST if rst) instead."""
    s = socket.create_connection((host, port), timeout=timeout)
    chunks, closed = [], False
    t0 = time.monotonic()
    deadline = t0 + timeout
    try:
        s.sendall(request_bytes)
        for part in then:
            time.sleep(gap)
            try:
                s.sendall(part)
            except OSError:  # the server answered early and closed
                break
        got = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            s.settimeout(left)
            try:
                data = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                closed = True
                break
            if not data:
                closed = True
                break
            chunks.append((time.monotonic(), data))
            got += data
            if close_after and close_after[0] in got:
                time.sleep(close_after[1])
                break
    finally:
        if rst:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    ex = RawExchange(t0, chunks, closed)
    ex.closed_at = time.monotonic() - t0
    ex.closed_wall = time.time()
    return ex


def read_answer(sock, timeout=20.0):
    """Reads an HTTP answer from sock until the peer closes: (head, body),
    the body de-chunked when it came chunked."""
    got = bytearray()
    sock.settimeout(timeout)
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        got += chunk
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head.lower():
        return head, body
    out, i = bytearray(), 0
    while True:
        j = body.index(b"\r\n", i)
        n = int(body[i:j].split(b";")[0], 16)
        if n == 0:
            return head, bytes(out)
        out += body[j + 2:j + 2 + n]
        i = j + 2 + n + 2


def build_request(method, path, headers=(), body=b"", host="127.0.0.1"):
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# ------------------------------------------------------------- stack ------

DEBIAN_LIGHTTPD_PARSEOPTS = '''\
# Debian's stock /etc/lighttpd/lighttpd.conf parse options, so the snippet is
# exercised the way Debian users run it.
server.http-parseopts = (
  "header-strict"           => "enable",
  "host-strict"             => "enable",
  "host-normalize"          => "enable",
  "url-normalize-unreserved"=> "enable",
  "url-normalize-required"  => "enable",
  "url-ctrls-reject"        => "enable",
  "url-path-2f-decode"      => "enable",
  "url-path-dotseg-remove"  => "enable",
)
'''


class Stack:
    """mock upstream + piapi + front end, for one test class."""

    def __init__(self, form, config, piapi_args=(), piapi_bin_path=None, name=None,
                 spawn_user=None, mock_tls=False, piapi_env=None):
        if form not in FORMS:
            raise ValueError(f"unknown launch form {form!r}; one of {FORMS}")
        if piapi_env and form == "lighttpd-binpath":
            raise ValueError("lighttpd starts piapi itself: piapi_env cannot reach it")
        self.form = form
        self.spawn_user = spawn_user    # spawn-fcgi -u: run piapi as this user
        self.mock_tls = mock_tls        # HTTPS mock; self.tls["ca"] is its CA
        # extra environment of piapi (not in the lighttpd-binpath form)
        self.piapi_env = {**os.environ, **piapi_env} if piapi_env else None
        self.tls = None
        self.config_src = config        # dict, str, or callable(stack) -> dict/str
        self.piapi_args = list(piapi_args)
        self.bin = Path(piapi_bin_path) if piapi_bin_path else piapi_bin()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"piapi-it-{name or form}-", dir="/tmp"))
        os.chmod(self.tmp, 0o711)       # nginx workers (www-data) reach the socket
        self.config_path = self.tmp / "config.yaml"
        self.piapi = self.front = self.mock = None
        self.front_kind = "lighttpd" if form.startswith("lighttpd") else "nginx"
        self.port = None
        self.dead_port = closed_port()
        self.orphans = []
        self.stopped = False
        _STACKS.append(self)

    # -- start --

    def start(self):
        try:
            if not self.bin.exists():
                raise HarnessError(f"piapi binary not found: {self.bin} (run make; BUILD={build_dir()})")
            if self.mock_tls:
                self.tls = make_test_pki(self.tmp)
            self.mock = Mock(self.tmp, self.tls)
            cfg = self.config_src(self) if callable(self.config_src) else self.config_src
            write_config(self.config_path, cfg)
            self.port = free_port()
            log_level = os.environ.get("PIAPI_LOG_LEVEL", "debug")
            common = ["--config", self.config_path, "--log-level", log_level] + self.piapi_args
            if self.form in ("nginx", "lighttpd-socket"):
                self.socket_path = self.tmp / "piapi.sock"
                self._piapi_argv = [self.bin] + common + ["--socket", self.socket_path,
                                                          "--socket-mode", "0666"]
                self.piapi = Proc("piapi", self._piapi_argv,
                                  stderr_path=self.tmp / "piapi.stderr", env=self.piapi_env)
                self._wait_socket()
            elif self.form == "spawn-fcgi":
                self.socket_path = self.tmp / "piapi.sock"
                spawn = ["spawn-fcgi", "-s", self.socket_path, "-M", "0660", "-G", "www-data"]
                binary = self.bin
                if self.spawn_user:
                    # The service user must read the config (and list its
                    # directory, for the watcher) and run the binary from a
                    # path it can reach, wherever the checkout lives.
                    binary = self.tmp / "piapi-bin"
                    shutil.copy2(self.bin, binary)
                    os.chmod(binary, 0o755)
                    shutil.chown(self.config_path, user=self.spawn_user)
                    os.chmod(self.tmp, 0o755)
                    spawn += ["-u", self.spawn_user]
                self.piapi = Proc("piapi", spawn + ["-n", "--", binary] + common,
                                  stderr_path=self.tmp / "piapi.stderr", env=self.piapi_env)
                self._wait_socket()
            else:
                self.socket_path = self.tmp / "piapi.sock"   # lighttpd adds -0
            if self.front_kind == "nginx":
                self._start_nginx()
            else:
                self._start_lighttpd(bin_path=self.form == "lighttpd-binpath")
            self._wait_ready()
            return self
        except BaseException:
            self.stop()
            raise

    def restart_piapi(self, sig=signal.SIGTERM):
        """nginx and lighttpd-socket forms: stops piapi with sig (SIGKILL:
        no clean-up at all, as in a crash) and starts it again with the
        same arguments; its log goes on in the same file."""
        self.piapi.stop(timeout=10.0, sig=sig)
        if self.socket_path.exists():
            self.socket_path.unlink()   # a killed piapi leaves it behind
        self.piapi = Proc("piapi", self._piapi_argv,
                          stderr_path=self.tmp / "piapi.stderr", env=self.piapi_env)
        self._wait_socket()
        self._wait_ready()

    def _wait_socket(self):
        ok = wait_until(lambda: self.socket_path.exists() or not self.piapi.alive(), READY_TIMEOUT)
        if not self.piapi.alive() or not ok:
            raise HarnessError(f"piapi did not create {self.socket_path} "
                               f"(exit {self.piapi.popen.poll()}):\n{self.piapi.stderr_text()[-3000:]}")

    def _render(self, src, subs):
        text = Path(src).read_text()
        for old, new in subs:
            if old not in text:
                raise HarnessError(f"{src}: expected to find {old!r} to substitute")
            text = text.replace(old, str(new))
        return text

    def _start_nginx(self):
        d = self.tmp / "nginx"
        (d / "logs").mkdir(parents=True)
        (d / "tmp").mkdir()
        sock = str(self.socket_path)
        (d / "piapi.conf").write_text(self._render(DEPLOY / "nginx" / "piapi.conf",
                                                   [("/run/piapi/piapi.sock", sock)]))
        (d / "nginx.conf").write_text(self._render(DEPLOY / "nginx" / "nginx.conf", [
            ("listen 9200;", f"listen 127.0.0.1:{self.port};"),
            ("listen [::]:9200;", f"listen [::1]:{self.port};"),
            ("/run/piapi-nginx.pid", d / "nginx.pid"),
            ("/var/log/nginx/", f"{d}/logs/"),
            ("/var/lib/nginx/", f"{d}/tmp/"),
        ]))
        shutil.copy("/etc/nginx/fastcgi_params", d / "fastcgi_params")
        argv = ["nginx", "-p", f"{d}/", "-c", d / "nginx.conf"]
        t = subprocess.run(argv + ["-t", "-q"], capture_output=True, text=True, timeout=10)
        if t.returncode != 0:
            raise HarnessError(f"nginx -t failed:\n{t.stderr}")
        self.front = Proc("nginx", argv + ["-g", "daemon off;"], stderr_path=d / "stderr.log")
        self.front_error_log = d / "logs" / "piapi-error.log"

    def _start_lighttpd(self, bin_path):
        d = self.tmp / "lighttpd"
        for sub in ("htdocs", "uploads"):
            (d / sub).mkdir(parents=True)
        if bin_path:
            cmd = " ".join([str(self.bin), "--config", str(self.config_path), "--log-level",
                            os.environ.get("PIAPI_LOG_LEVEL", "debug")] +
                           [str(a) for a in self.piapi_args])
            if any(" " in str(a) for a in [self.bin, self.config_path] + self.piapi_args):
                raise HarnessError("bin-path arguments cannot contain spaces (no shell)")
            snippet = self._render(DEPLOY / "lighttpd" / "piapi-bin-path.conf", [
                ("/usr/local/bin/piapi --config /etc/piapi/config.yaml", cmd),
                ("/run/piapi/piapi.sock", self.socket_path)])
            name = "piapi-bin-path.conf"
        else:
            snippet = self._render(DEPLOY / "lighttpd" / "piapi-socket.conf",
                                   [("/run/piapi/piapi.sock", self.socket_path)])
            name = "piapi-socket.conf"
        (d / name).write_text(snippet)
        (d / "lighttpd.conf").write_text(
            "# generated by tests/integration/harness.py: a minimal server around the\n"
            "# deploy snippet, which is included unchanged except for paths.\n"
            f'server.document-root = "{d}/htdocs"\n'
            f'server.bind = "127.0.0.1"\n'
            f"server.port = {self.port}\n"
            f'server.errorlog = "{d}/error.log"\n'
            f'server.pid-file = "{d}/lighttpd.pid"\n'
            f'server.upload-dirs = ( "{d}/uploads" )\n'
            + DEBIAN_LIGHTTPD_PARSEOPTS +
            f'include "{d}/{name}"\n')
        argv = ["lighttpd", "-f", d / "lighttpd.conf"]
        t = subprocess.run(argv + ["-tt"], capture_output=True, text=True, timeout=10)
        if t.returncode != 0:
            raise HarnessError(f"lighttpd -tt failed:\n{t.stdout}{t.stderr}")
        self.front = Proc("lighttpd", argv + ["-D"], stderr_path=d / "stderr.log")
        self.front_error_log = d / "error.log"

    def _wait_ready(self):
        last = None

        def ready():
            nonlocal last
            if not self.front.alive() or (self.piapi and not self.piapi.alive()):
                return "dead"
            try:
                r = http_request(self.port, "GET", "/healthz", timeout=1)
                last = r
                return r.status == 200
            except OSError as e:
                last = e
                return False

        res = wait_until(ready, READY_TIMEOUT, 0.05)
        if res is not True:
            raise HarnessError(
                f"{self.form}: not ready after {READY_TIMEOUT}s (last: {last!r})\n"
                f"--- piapi log ---\n{self.piapi_log_text()[-3000:]}\n"
                f"--- front end ({self.front_kind}) ---\n{self.front_log_text()[-3000:]}")

    # -- stop --

    def stop_processes(self):
        """Stops everything but keeps the temp dir (logs stay readable)."""
        if self.front:
            self.front.stop()
        if self.piapi:
            self.piapi.stop()
        if self.mock:
            self.mock.stop()
        # Anything still naming our temp dir on its command line is ours
        # and escaped its process group: kill it by pid and say so.
        self.orphans = pids_mentioning(str(self.tmp))
        for pid in self.orphans:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.orphans:
            sys.stderr.write(f"harness: killed leftover processes {self.orphans} of {self.tmp}\n")

    def stop(self):
        if self.stopped:
            return
        self.stopped = True
        if self in _STACKS:
            _STACKS.remove(self)
        try:
            self.stop_processes()
        finally:
            if not KEEP_TMP:
                shutil.rmtree(self.tmp, ignore_errors=True)
            else:
                sys.stderr.write(f"harness: kept {self.tmp}\n")

    # -- use --

    def request(self, method, path, headers=(), body=None, timeout=10.0, source=None):
        return http_request(self.port, method, path, headers, body, timeout, source=source)

    def raw(self, request_bytes, **kw):
        return raw_exchange(self.port, request_bytes, **kw)

    def piapi_log_text(self):
        """piapi's stderr (for bin-path: lighttpd's stderr, which piapi inherits)."""
        if self.piapi:
            return self.piapi.stderr_text()
        return self.front.stderr_text() if self.front else ""

    def front_log_text(self):
        parts = []
        for p in (getattr(self, "front_error_log", None),
                  self.front.stderr_path if self.front else None):
            if p and Path(p).exists():
                parts.append(Path(p).read_text(errors="replace"))
        return "\n".join(parts)

    def piapi_log(self):
        """piapi's JSON log lines, parsed (non-JSON lines are skipped)."""
        out = []
        for line in self.piapi_log_text().splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def completed_line(self, response, timeout=5.0):
        """The `request completed` log line of a response (by its
        X-Request-ID), or None."""
        rid = response.header("X-Request-ID")
        return self.wait_log(lambda l: l.get("msg") == "request completed" and
                             l.get("request_id") == rid, timeout)

    def wait_log(self, pred, timeout=2.0):
        """First parsed log line matching pred, waiting up to timeout."""
        def find():
            for rec in self.piapi_log():
                if pred(rec):
                    return rec
            return None
        return wait_until(find, timeout, 0.05)
