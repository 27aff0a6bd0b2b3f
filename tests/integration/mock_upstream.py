#!/usr/bin/env python3
"""Mock LLM provider for piapi's integration tests. Standard library only.

    python3 mock_upstream.py --port 0 --record FILE [--host 127.0.0.1]
                             [--tls CERT KEY]

With --tls it speaks HTTPS only (CERT: PEM chain, KEY: its private key), as
every real provider does; the handshake runs in the connection's own thread.

Prints `PORT <n>` on stdout (flushed) once it listens. Every request it gets
(except the control endpoints) is kept in memory and appended to FILE as one
JSON line:
    {"seq", "conn", "t", "method", "path", "headers": [[name, value], ...],
     "body_b64", "body_len"}
`path` is the request target exactly as received (self.path); `conn` numbers
the TCP connection it came on (keep-alive reuse shows as a repeated number).
Events such as {"event": "client_gone", "path", "t"} go to the same file and
to GET /__mock/events.

Control endpoints (call the mock directly, not through piapi):
    GET  /__mock/requests   JSON list of the recorded requests
    GET  /__mock/events     JSON list of events (client_gone, ...)
    GET  /__mock/stats      {"connections", "open_connections", "requests", "accepted"}
    POST /__mock/reset      forget requests, events and counters
    POST /__mock/strict     ?on=1|0: strict mode (below)

Behaviour is chosen by the last segments of the path, whatever comes before
them (`/v1/echo`, `/codex/echo`, `/echo` are the same):
    .../echo                      200 JSON of what was received
    .../sse?n=10&interval=0.2     SSE: n events `data: {"i":k}`, interval apart,
                                  each flushed on its own, then `data: [DONE]`
    .../gzip                      GZIP_TEXT, gzip'd when Accept-Encoding has gzip
    .../status/NNN                status NNN with a small JSON body
    .../slow-headers?delay=S      sleeps S, then 200 JSON
    .../stall?after=N&delay=S     SSE: N events, S seconds of silence, then one
                                  more event and [DONE]; records client_gone
    .../close-mid                 Content-Length 1000, sends 100 bytes, closes
    .../reset                     closes with RST, no answer
    .../garbage                   non-HTTP bytes, then closes
    .../big?bytes=N               200 with big_content(N)
    .../redirect?enc=E            301 to the same path + "/" keeping the query
                                  (nginx's trailing-slash redirect); the URL is
                                  also in Content-Location, Link, Refresh,
                                  X-Debug-Query (the query) and the HTML body.
                                  E re-spells the query's %XX: upper (as sent),
                                  lower, raw (decoded)
    .../key-error?chunked=1&status=N  N (401) JSON error echoing the key the
                                  request carried (query api_key, Bearer,
                                  x-api-key) raw and percent-encoded; chunked=1:
                                  chunked, 3 bytes a chunk
    .../key-echo?status=N&pad=P&chunk=C&cl=F&enc=E&ctype=T&hdr=H
                                  N (401) answer written raw: P bytes of "y",
                                  then the key the request carried (as in
                                  key-error), the request target and its
                                  Authorization header. chunk=C: chunked, C
                                  bytes a chunk (else Content-Length, spelled
                                  per F: plain, tab "\tN", zeros "000N",
                                  comma "N, N"); enc: gzip (always),
                                  auto (gzip when Accept-Encoding has it),
                                  identity, empty (a Content-Encoding line with
                                  no coding); ctype: the Content-Type (default
                                  application/json); hdr=barecr adds
                                  "X-Foo: a<CR>X-Accel-Redirect: /metrics"
    anything else                 like echo (or a JSON 404 in strict mode)

Every recorded request's answer carries `x-request-id: req_mock_<seq>`, as
OpenAI's answers carry an id of their own.

It also speaks enough of the real provider APIs for real clients (Claude
Code, Codex CLI, the openai and @anthropic-ai/sdk SDKs). Every answer's text
is ANSWER ("PIAPI-MOCK-ANSWER-42"), sent as several deltas when streamed:
    POST .../messages               Anthropic Messages; "stream": true gives the
                                    real SSE sequence (message_start,
                                    content_block_start, ping,
                                    content_block_delta..., content_block_stop,
                                    message_delta, message_stop)
    POST .../messages/count_tokens  Anthropic token count {"input_tokens": n}
    A request body's "piapi_mock" object steers the usage in these answers:
    start_usage / delta_usage (Anthropic message_start and message_delta),
    usage (OpenAI), final ("completed", "incomplete", "failed": the
    Responses final event), answer_model (null: the answer names none),
    cut: "after_start" (Anthropic: closes after message_start), interval
    (Anthropic, Chat: seconds before each content delta).
    POST .../chat/completions       OpenAI Chat Completions; streamed as
                                    `data: {chunk}` ... `data: [DONE]` (a usage
                                    chunk when stream_options.include_usage)
    POST .../responses              OpenAI Responses; streamed as response.created,
                                    response.in_progress, output_item.added,
                                    content_part.added, output_text.delta...,
                                    output_text.done, content_part.done,
                                    output_item.done, response.completed
    GET  .../models                 a model list readable by both SDK families
    GET  .../models/<id>            one model
A body that is not a JSON object gets a 400 in the API's error format. Other
methods on these paths (e.g. GET .../chat/completions) behave as before (echo).

Strict mode, for tests driving real clients that may call anything:
    POST /__mock/strict?on=1        unknown paths answer 404
                                    {"type":"error","error":{"type":"not_found_error",...}}
                                    (still recorded); on=0 goes back to echo.
                                    /__mock/reset does not change the mode.
Failing on purpose, whatever the path (a provider's baseUrl may carry the
query, so one mock plays several candidates): a request whose query has
    mock_fail=NNN                 status NNN, an Anthropic-style JSON error
                                  (with Retry-After: S when mock_retry_after=S)
    mock_fail=reset               closes with RST, no answer
    mock_fail=overloaded          200 SSE whose first event is `event: error`
                                  of type overloaded_error (Anthropic's 529
                                  in the middle of a stream)
    mock_fail=cut-after-first     200 SSE: one event, then the connection closes
    mock_delay=S                  waits S seconds first (noticing a client
                                  that leaves), then answers as usual
To add an endpoint: write `def ep_<name>(self, args, query)` on Handler and
add it to ENDPOINTS with the number of path segments it takes after its name.
"""
import argparse
import base64
import gzip
import hashlib
import json
import select
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GZIP_TEXT = ("piapi mock upstream: this text travels gzip-compressed and must reach "
             "the client byte for byte, still compressed.\n") * 20

_PATTERN = bytes((i * 7 + 3) % 256 for i in range(251))


def mock_plan(req):
    """What a test asks of an API answer, in the request body's
    "piapi_mock" member: usage objects to send instead of the computed
    ones, where to cut a stream, which final event or model to use."""
    plan = req.get("piapi_mock")
    return plan if isinstance(plan, dict) else {}


def big_content(n):
    """Deterministic n bytes: a 251-byte pattern repeated (misalignment shows)."""
    reps, rest = divmod(n, len(_PATTERN))
    return _PATTERN * reps + _PATTERN[:rest]


# The text of every LLM answer, and how it is cut into streamed deltas.
ANSWER = "PIAPI-MOCK-ANSWER-42"
ANSWER_DELTAS = ("PIAPI-", "MOCK-", "ANSWER-", "42")
MOCK_MODELS = ("claude-opus-5-5", "claude-haiku-4-5", "gpt-5", "gpt-5-codex")

# name -> number of path segments that follow it (e.g. status/404 takes 1)
ENDPOINTS = {
    "echo": 0, "sse": 0, "gzip": 0, "status": 1, "slow-headers": 0,
    "stall": 0, "close-mid": 0, "reset": 0, "garbage": 0, "big": 0,
    "redirect": 0, "key-error": 0, "key-echo": 0,
}


def respell_query(q, enc):
    """q with its %XX escapes in lower case (enc "lower"), decoded ("raw"),
    or as is."""
    if enc == "lower":
        out, i = [], 0
        while i < len(q):
            if q[i] == "%" and i + 2 < len(q):
                out.append(q[i:i + 3].lower())
                i += 3
            else:
                out.append(q[i])
                i += 1
        return "".join(out)
    if enc == "raw":
        return urllib.parse.unquote(q)
    return q


class State:
    def __init__(self, record_path):
        self.lock = threading.Lock()
        self.record_path = record_path
        self.open_connections = 0      # survive a reset: they are still open
        self.next_conn = 0             # connection ids stay unique across resets
        self.strict = False            # unknown paths: 404 instead of echo
        self.next_id = 0               # ids of generated messages/responses
        self.reset()

    def reset(self):
        with self.lock:
            self.requests = []
            self.events = []
            self.connections = 0       # connections that carried a non-control request
            self.accepted = 0          # every accepted TCP connection

    def write_line(self, obj):
        if self.record_path:
            with open(self.record_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(obj) + "\n")

    def add_request(self, rec):
        with self.lock:
            rec["seq"] = len(self.requests)
            self.requests.append(rec)
            self.write_line(rec)

    def new_id(self, prefix):
        with self.lock:
            self.next_id += 1
            return "%s_piapimock%06d" % (prefix, self.next_id)

    def add_event(self, ev):
        with self.lock:
            self.events.append(ev)
            self.write_line(ev)


class ClientGone(Exception):
    pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def process_request(self, request, client_address):
        with self.state.lock:
            self.state.accepted += 1
        super().process_request(request, client_address)

    def handle_error(self, request, client_address):
        # A TLS handshake the client refused (a certificate it does not
        # trust) is the client's business, not a mock failure.
        if isinstance(sys.exc_info()[1], (ssl.SSLError, ConnectionError)) and not self.verbose:
            return
        super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "piapi-mock/1"
    conn_id = None          # set on the first non-control request
    answer_id = None        # x-request-id of the answer, as OpenAI sends one
    counted_open = False

    def log_message(self, fmt, *args):
        if self.server.verbose:
            sys.stderr.write("mock: " + (fmt % args) + "\n")

    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()
        super().setup()

    # ---- plumbing -------------------------------------------------------

    def finish(self):
        try:
            super().finish()
        finally:
            if self.counted_open:
                with self.server.state.lock:
                    self.server.state.open_connections -= 1
                self.counted_open = False

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except ClientGone:
            self.close_connection = True
        except (ConnectionError, BrokenPipeError, socket.timeout):
            self.close_connection = True

    def read_body(self):
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            parts = []
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    break
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers up to the empty line
                        t = self.rfile.readline(65537)
                        if t in (b"\r\n", b"\n", b""):
                            break
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(parts)
        length = self.headers.get("Content-Length")
        if length:
            return self.rfile.read(int(length))
        return b""

    def send_response(self, code, message=None):
        super().send_response(code, message)
        if self.answer_id and not self.path.startswith("/__mock/"):
            self.send_header("x-request-id", self.answer_id)

    def send_bytes(self, status, body, ctype="application/json", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for k, v in extra:
            self.send_header(k, v)
        no_body = status in (204, 304) or 100 <= status < 200 or self.command == "HEAD"
        if status not in (204, 304) and not 100 <= status < 200:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not no_body:
            self.wfile.write(body)
        self.wfile.flush()

    def send_json(self, status, obj, extra=()):
        self.send_bytes(status, json.dumps(obj).encode(), "application/json", extra)

    def start_chunked(self, status=200, ctype="text/event-stream"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def write_chunk(self, data):
        """One HTTP chunk, flushed; raises ClientGone (and records it) on failure."""
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except OSError:
            self.client_gone("write failed")
            raise ClientGone()

    def client_gone(self, how):
        self.server.state.add_event({"event": "client_gone", "path": self.path,
                                     "t": time.time(), "how": how, "conn": self.conn_id})

    def wait_or_gone(self, seconds):
        """Sleep `seconds`, but notice (and record) the peer closing meanwhile."""
        deadline = time.monotonic() + seconds
        sock = self.connection
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            r, _, _ = select.select([sock], [], [], left)
            if r:
                peek = self.peek_byte(sock)
                if not peek:
                    self.client_gone("closed")
                    raise ClientGone()
                time.sleep(min(left, 0.05))  # pipelined data: not a close

    @staticmethod
    def peek_byte(sock):
        """b"" once the peer has closed. TLS cannot peek: there one byte is
        read, which is harmless as piapi sends nothing more on a connection
        while it waits for the answer."""
        try:
            if not isinstance(sock, ssl.SSLSocket):
                return sock.recv(1, socket.MSG_PEEK)
            sock.settimeout(0.05)
            try:
                return sock.recv(1)
            except socket.timeout:
                return b"?"     # a TLS record without data
            finally:
                sock.settimeout(None)
        except OSError:
            return b""

    def hard_close(self, rst=False):
        self.close_connection = True
        try:
            self.wfile.flush()
        except OSError:
            pass
        if rst:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
        else:
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.connection.close()

    # ---- dispatch -------------------------------------------------------

    def handle_any(self):
        raw_path = self.path
        path, _, query_s = raw_path.partition("?")
        st = self.server.state
        if path.startswith("/__mock/"):
            self.body = self.read_body()
            return self.control(path[len("/__mock/"):])
        if self.conn_id is None:
            with st.lock:
                st.next_conn += 1
                self.conn_id = st.next_conn
                st.connections += 1
                st.open_connections += 1
            self.counted_open = True
        t = time.time()
        self.body = self.read_body()
        rec = {
            "conn": self.conn_id, "t": t, "method": self.command, "path": raw_path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_b64": base64.b64encode(self.body).decode(), "body_len": len(self.body),
        }
        st.add_request(rec)
        self.answer_id = "req_mock_%d" % rec["seq"]
        query = dict(urllib.parse.parse_qsl(query_s, keep_blank_values=True))
        if "mock_delay" in query:
            self.wait_or_gone(float(query["mock_delay"]))
        if "mock_fail" in query:
            return self.fail_on_purpose(query["mock_fail"], query)
        segs = [s for s in path.split("/") if s]
        api = self.api_endpoint(segs)
        if api is not None:
            return api(segs, query)
        for nargs in (0, 1):
            if len(segs) > nargs:
                name = segs[-1 - nargs]
                if ENDPOINTS.get(name) == nargs:
                    fn = getattr(self, "ep_" + name.replace("-", "_"))
                    return fn(segs[len(segs) - nargs:], query)
        if st.strict:
            return self.send_json(404, {"type": "error", "error": {
                "type": "not_found_error",
                "message": "piapi mock: no such endpoint: %s %s" % (self.command, path)}})
        return self.ep_echo([], query)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = handle_any

    def control(self, what):
        st = self.server.state
        if what == "requests":
            with st.lock:
                data = list(st.requests)
            return self.send_json(200, data)
        if what == "events":
            with st.lock:
                data = list(st.events)
            return self.send_json(200, data)
        if what == "stats":
            with st.lock:
                data = {"connections": st.connections, "open_connections": st.open_connections,
                        "requests": len(st.requests), "accepted": st.accepted}
            return self.send_json(200, data)
        if what.startswith("strict") and self.command == "POST":
            q = dict(urllib.parse.parse_qsl(self.path.partition("?")[2]))
            st.strict = q.get("on", "1") not in ("0", "false", "no")
            return self.send_json(200, {"strict": st.strict})
        if what == "reset" and self.command == "POST":
            st.reset()
            # this connection was counted as accepted before the reset
            return self.send_json(200, {"ok": True})
        return self.send_json(404, {"error": "unknown control endpoint"})

    # ---- endpoints ------------------------------------------------------

    def fail_on_purpose(self, how, query):
        if how == "reset":
            return self.hard_close(rst=True)
        if how == "overloaded":
            self.start_chunked()
            self.write_chunk(b'event: error\ndata: {"type":"error","error":'
                             b'{"type":"overloaded_error","message":"Overloaded"}}\n\n')
            return self.write_chunk(b"")
        if how == "cut-after-first":
            self.start_chunked()
            self.write_chunk(b'event: message_start\ndata: {"type":"message_start"}\n\n')
            time.sleep(0.05)
            return self.hard_close()
        code = int(how)
        extra = [("Retry-After", query["mock_retry_after"])] if "mock_retry_after" in query else []
        kind = "overloaded_error" if code == 529 else "rate_limit_error" if code == 429 \
            else "api_error"
        self.send_json(code, {"type": "error", "error": {
            "type": kind, "message": "mock failure %d" % code}}, extra)

    def ep_echo(self, _args, _query):
        self.send_json(200, {
            "method": self.command, "path": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_len": len(self.body),
            "body_sha256": hashlib.sha256(self.body).hexdigest(),
        })

    def ep_sse(self, _args, query):
        n, interval = int(query.get("n", "10")), float(query.get("interval", "0.2"))
        self.start_chunked()
        for k in range(n):
            self.wait_or_gone(interval)
            self.write_chunk(b'data: {"i":%d}\n\n' % k)
        self.write_chunk(b"data: [DONE]\n\n")
        self.write_chunk(b"")

    def ep_gzip(self, _args, _query):
        text = GZIP_TEXT.encode()
        if "gzip" in (self.headers.get("Accept-Encoding") or "").lower():
            self.send_bytes(200, gzip.compress(text, mtime=0), "text/plain; charset=utf-8",
                            [("Content-Encoding", "gzip"), ("Vary", "Accept-Encoding")])
        else:
            self.send_bytes(200, text, "text/plain; charset=utf-8", [("Vary", "Accept-Encoding")])

    def ep_status(self, args, _query):
        code = int(args[0])
        self.send_json(code, {"mock_status": code,
                              "error": {"type": "mock_error", "message": "status %d" % code}})

    def ep_slow_headers(self, _args, query):
        self.wait_or_gone(float(query.get("delay", "1")))
        self.send_json(200, {"slow": True})

    def ep_stall(self, _args, query):
        after, delay = int(query.get("after", "2")), float(query.get("delay", "5"))
        self.start_chunked()
        for k in range(after):
            self.write_chunk(b'data: {"i":%d}\n\n' % k)
        self.wait_or_gone(delay)
        self.write_chunk(b'data: {"i":%d}\n\n' % after)
        self.write_chunk(b"data: [DONE]\n\n")
        self.write_chunk(b"")

    def ep_close_mid(self, _args, _query):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(big_content(100))
        self.hard_close()

    def ep_reset(self, _args, _query):
        self.hard_close(rst=True)

    def ep_garbage(self, _args, _query):
        self.wfile.write(b"\x00\x01garbage, not HTTP at all\r\n\xff\xfe\r\n\r\n")
        self.hard_close()

    def ep_big(self, _args, query):
        n = int(query.get("bytes", "1048576"))
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        off = 0
        while off < n:
            step = min(65536 * 4, n - off)
            # the pattern is periodic, so any window can be cut from a long copy
            start = off % len(_PATTERN)
            self.wfile.write(big_content(start + step)[start:])
            off += step
        self.wfile.flush()


    def ep_redirect(self, _args, query):
        path, _, q = self.path.partition("?")
        q = respell_query(q, query.get("enc", "upper"))
        url = "http://%s%s/?%s" % (self.headers.get("Host"), path, q)
        body = ('<html><body><p>The document has moved <a href="%s">here</a>.</p>'
                '<p>%s</p></body></html>\n' % (url, url)).encode()
        self.send_bytes(301, body, "text/html; charset=utf-8", [
            ("Location", url), ("Content-Location", url),
            ("Link", '<%s>; rel="canonical"' % url), ("Refresh", "0; url=%s" % url),
            ("X-Debug-Query", q)])

    def ep_key_error(self, _args, query):
        key = query.get("api_key")
        auth = self.headers.get("Authorization") or ""
        if key is None and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        if key is None:
            key = self.headers.get("x-api-key") or ""
        enc = urllib.parse.quote(key, safe="")
        msg = "Incorrect API key provided: %s (as sent: %s, %s)" % (
            key, enc, respell_query(enc, "lower"))
        body = json.dumps({"error": {"message": msg, "type": "invalid_request_error",
                                     "code": "invalid_api_key"}}).encode()
        status = int(query.get("status", "401"))
        if query.get("chunked") != "1":
            return self.send_bytes(status, body)
        self.start_chunked(status, "application/json")
        for i in range(0, len(body), 3):
            self.write_chunk(body[i:i + 3])
            if i % 30 == 0:
                time.sleep(0.005)  # some pieces reach piapi on their own
        self.write_chunk(b"")

    def ep_key_echo(self, _args, query):
        key = query.get("api_key")
        auth = self.headers.get("Authorization") or ""
        if key is None and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        if key is None:
            key = self.headers.get("x-api-key") or ""
        body = (b"y" * int(query.get("pad", "0")) +
                json.dumps({"error": {"message": "bad key %s" % key, "target": self.path,
                                      "authorization": auth}}).encode())
        status = int(query.get("status", "401"))
        enc = query.get("enc", "")
        head = [b"HTTP/1.1 %d Mock" % status,
                b"Content-Type: " + query.get("ctype", "application/json").encode()]
        if enc == "gzip" or (enc == "auto" and
                             "gzip" in (self.headers.get("Accept-Encoding") or "").lower()):
            body = gzip.compress(body, mtime=0)
            head.append(b"Content-Encoding: gzip")
        elif enc == "identity":
            head.append(b"Content-Encoding: identity")
        elif enc == "empty":
            head.append(b"Content-Encoding: ")
        if query.get("hdr") == "barecr":
            head.append(b"X-Foo: a\rX-Accel-Redirect: /metrics")
        chunk = int(query.get("chunk", "0"))
        if chunk:
            head.append(b"Transfer-Encoding: chunked")
        else:
            n = len(body)
            head.append({"plain": b"Content-Length: %d" % n, "tab": b"Content-Length:\t%d" % n,
                         "zeros": b"Content-Length: 0000000000000000000000000%d" % n,
                         "comma": b"Content-Length: %d, %d" % (n, n)}[query.get("cl", "plain")])
        self.close_connection = True
        self.wfile.write(b"\r\n".join(head) + b"\r\n\r\n")
        if not chunk:
            self.wfile.write(body)
        else:
            for i in range(0, len(body), chunk):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(body[i:i + chunk]), body[i:i + chunk]))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # ---- LLM provider APIs (Anthropic Messages, OpenAI Chat / Responses) --

    def api_endpoint(self, segs):
        """The provider-API handler for this method + path, or None."""
        m, last = self.command, segs[-1] if segs else ""
        prev = segs[-2] if len(segs) > 1 else ""
        if m == "POST":
            if prev == "messages" and last == "count_tokens":
                return self.api_count_tokens
            if last == "messages":
                return self.api_messages
            if prev == "chat" and last == "completions":
                return self.api_chat_completions
            if last == "responses":
                return self.api_responses
        elif m == "GET":
            if last == "models":
                return self.api_models
            if prev == "models":
                return self.api_model
        return None

    def api_json_body(self, openai_style):
        """The request body as a dict, or None after answering 400."""
        body = self.body
        if (self.headers.get("Content-Encoding") or "").lower() == "gzip":
            try:
                body = gzip.decompress(body)
            except OSError:
                pass
        try:
            doc = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            doc = None
        if isinstance(doc, dict):
            return doc
        msg = "piapi mock: the request body is not a JSON object"
        if openai_style:
            err = {"error": {"message": msg, "type": "invalid_request_error",
                             "param": None, "code": None}}
        else:
            err = {"type": "error", "error": {"type": "invalid_request_error", "message": msg}}
        self.send_json(400, err)
        return None

    def input_tokens(self):
        return max(1, len(self.body) // 4)

    def start_sse(self):
        self.start_chunked(200, "text/event-stream; charset=utf-8")

    def sse_event(self, name, obj):
        """One SSE event (`event:` line when name is given), its own HTTP chunk."""
        data = b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
        if name:
            data = b"event: " + name.encode() + b"\n" + data
        self.write_chunk(data)

    # Anthropic ------------------------------------------------------------

    def api_messages(self, _segs, _query):
        req = self.api_json_body(openai_style=False)
        if req is None:
            return
        model = str(req.get("model") or "claude-opus-5-5")
        mid = self.server.state.new_id("msg")
        n_in, n_out = self.input_tokens(), len(ANSWER_DELTAS)
        plan = mock_plan(req)
        start_usage = plan.get("start_usage") or {
            "input_tokens": n_in, "output_tokens": 1,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        delta_usage = plan.get("delta_usage") or {"output_tokens": n_out}
        model = plan.get("answer_model", model)
        if not req.get("stream"):
            doc = {"id": mid, "type": "message", "role": "assistant", "model": model,
                   "content": [{"type": "text", "text": ANSWER}],
                   "stop_reason": "end_turn", "stop_sequence": None,
                   "usage": dict(start_usage, **delta_usage)}
            if model is None:
                del doc["model"]
            return self.send_json(200, doc)
        self.start_sse()
        message = {"id": mid, "type": "message", "role": "assistant", "model": model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": start_usage}
        if model is None:
            del message["model"]
        self.sse_event("message_start", {"type": "message_start", "message": message})
        if plan.get("cut") == "after_start":
            return self.hard_close()
        self.sse_event("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": {"type": "text", "text": ""}})
        self.sse_event("ping", {"type": "ping"})
        for piece in ANSWER_DELTAS:
            if plan.get("interval"):
                time.sleep(float(plan["interval"]))
            self.sse_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                   "delta": {"type": "text_delta", "text": piece}})
        self.sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
        self.sse_event("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                         "usage": delta_usage})
        self.sse_event("message_stop", {"type": "message_stop"})
        self.write_chunk(b"")

    def api_count_tokens(self, _segs, _query):
        if self.api_json_body(openai_style=False) is not None:
            self.send_json(200, {"input_tokens": self.input_tokens()})

    # OpenAI Chat Completions ----------------------------------------------

    def api_chat_completions(self, _segs, _query):
        req = self.api_json_body(openai_style=True)
        if req is None:
            return
        model = str(req.get("model") or "gpt-5")
        cid, created = self.server.state.new_id("chatcmpl"), int(time.time())
        n_in, n_out = self.input_tokens(), len(ANSWER_DELTAS)
        usage = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
        usage = mock_plan(req).get("usage", usage)
        if not req.get("stream"):
            return self.send_json(200, {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER,
                                                     "refusal": None},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": usage})

        def chunk(delta, finish=None):
            return {"id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish}]}
        self.start_sse()
        interval = float(mock_plan(req).get("interval") or 0)
        self.sse_event(None, chunk({"role": "assistant", "content": ""}))
        for piece in ANSWER_DELTAS:
            time.sleep(interval)
            self.sse_event(None, chunk({"content": piece}))
        self.sse_event(None, chunk({}, "stop"))
        if (req.get("stream_options") or {}).get("include_usage"):
            last = chunk({})
            last["choices"], last["usage"] = [], usage
            self.sse_event(None, last)
        self.write_chunk(b"data: [DONE]\n\n")
        self.write_chunk(b"")

    # OpenAI Responses -----------------------------------------------------

    def api_responses(self, _segs, _query):
        req = self.api_json_body(openai_style=True)
        if req is None:
            return
        st = self.server.state
        model = str(req.get("model") or "gpt-5")
        rid, item_id, created = st.new_id("resp"), st.new_id("msg"), int(time.time())
        n_in, n_out = self.input_tokens(), len(ANSWER_DELTAS)
        part = {"type": "output_text", "text": ANSWER, "annotations": [], "logprobs": []}
        item = {"id": item_id, "type": "message", "status": "completed", "role": "assistant",
                "content": [part]}
        usage = {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": n_in + n_out}
        plan = mock_plan(req)
        usage = plan.get("usage", usage)
        final = plan.get("final", "completed")

        def response(status, output, use):
            return {"id": rid, "object": "response", "created_at": created, "status": status,
                    "error": None, "incomplete_details": None,
                    "instructions": req.get("instructions"), "model": model,
                    "output": output, "parallel_tool_calls": True, "previous_response_id": None,
                    "store": bool(req.get("store", False)), "temperature": 1.0,
                    "tool_choice": "auto", "tools": [], "top_p": 1.0, "truncation": "disabled",
                    "usage": use, "metadata": {}, "text": {"format": {"type": "text"}}}
        if not req.get("stream"):
            doc = response(final, [item], usage)
            doc["output_text"] = ANSWER
            return self.send_json(200, doc)
        seq = iter(range(1 << 30))

        def ev(name, **fields):
            self.sse_event(name, dict({"type": name, "sequence_number": next(seq)}, **fields))
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        self.start_sse()
        ev("response.created", response=response("in_progress", [], None))
        ev("response.in_progress", response=response("in_progress", [], None))
        ev("response.output_item.added", output_index=0,
           item=dict(item, status="in_progress", content=[]))
        ev("response.content_part.added", part=dict(part, text=""), **where)
        for piece in ANSWER_DELTAS:
            ev("response.output_text.delta", delta=piece, logprobs=[], **where)
        ev("response.output_text.done", text=ANSWER, logprobs=[], **where)
        ev("response.content_part.done", part=part, **where)
        ev("response.output_item.done", output_index=0, item=item)
        ev("response." + final, response=response(final, [item], usage))
        self.write_chunk(b"")

    # Models (one shape both SDK families read) ----------------------------

    def model_doc(self, mid):
        return {"id": mid, "object": "model", "type": "model", "created": 1700000000,
                "created_at": "2023-11-14T22:13:20Z", "owned_by": "piapi-mock",
                "display_name": mid}

    def api_models(self, _segs, _query):
        data = [self.model_doc(m) for m in MOCK_MODELS]
        self.send_json(200, {"object": "list", "data": data, "has_more": False,
                             "first_id": data[0]["id"], "last_id": data[-1]["id"]})

    def api_model(self, segs, _query):
        mid = urllib.parse.unquote(segs[-1])
        self.send_json(200, self.model_doc(mid))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--record", help="append one JSON line per request/event here")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"), help="serve HTTPS")
    args = ap.parse_args()
    server = Server((args.host, args.port), Handler)
    if args.tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*args.tls)
        server.socket = ctx.wrap_socket(server.socket, server_side=True,
                                        do_handshake_on_connect=False)
    server.state = State(args.record)
    server.verbose = args.verbose
    print("PORT %d" % server.server_address[1], flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
