"""Usage accounting against a hostile member and a broken or malicious
upstream: keys must not leak through model names cut short, a stream cut
after its usage is still incomplete, a usageDb that is no regular file
must not hang piapi or `piapi usage`, and what held under attack (request
bodies injection must not break, the model-label cap) stays held.

The upstream here is a raw socket server so each answer is exactly the
bytes a test wants (resets, echoed keys), not the shared mock's.
"""
import json
import os
import socket
import sqlite3
import struct
import subprocess
import threading
import time
import unittest

import harness

ALICE = "piapi-user-alice-Hs7lU5aG3eQx"     # openai: cx
BOB = "piapi-user-bob-Hs7lU5aG3eQy"         # anthropic: cc
OPENAI_KEY = "sk-openai-main-Hs7lU5aG3eQz0123456789"
ANTHROPIC_KEY = "sk-ant-main-Hs7lU5aG3eQw0123456789"
HA = [("Authorization", "Bearer " + ALICE), ("Content-Type", "application/json")]
HB = [("x-api-key", BOB), ("Content-Type", "application/json")]


def reset(conn):
    """Ends the connection with a TCP RST: a cut, not a clean end."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def json_answer(obj):
    body = json.dumps(obj).encode()

    def answer(conn, _head, _body):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    return answer


def sse_answer(parts, then=None):
    def answer(conn, _head, _body):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Connection: close\r\n\r\n")
        for p in parts:
            conn.sendall(p)
            time.sleep(0.02)
        if then:
            then(conn)
    return answer


def named(name, obj):
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(obj).encode() + b"\n\n"


def unnamed(obj):
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def config(up_port, settings=None):
    def build(_stack):
        base = f"http://127.0.0.1:{up_port}"
        return {
            "providers": [
                {"name": "openai", "apiKeys": {"main": OPENAI_KEY},
                 "services": [{"type": "cx", "baseUrl": base + "/v1"}]},
                {"name": "anthropic", "apiKeys": {"main": ANTHROPIC_KEY},
                 "services": [{"type": "cc", "baseUrl": base,
                               "auth": {"mode": "header", "name": "x-api-key"}}]},
            ],
            "users": [
                {"name": "alice", "apiKey": ALICE, "providerName": "openai",
                 "providerKeyName": "main"},
                {"name": "bob", "apiKey": BOB, "providerName": "anthropic",
                 "providerKeyName": "main"},
            ],
            "pricing": [{"model": "claude*", "input": 3, "output": 15},
                        {"model": "gpt*", "input": 1, "output": 2}],
            "settings": dict(settings or {"usageDb": "usage.db"}),
        }
    return build


def ledger_rows(stack):
    db = sqlite3.connect(stack.tmp / "usage.db")
    try:
        return db.execute("SELECT request_id, model, input, output, complete FROM requests"
                          " ORDER BY id").fetchall()
    finally:
        db.close()


class UsageHostile(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.up = harness.RawUpstream()
        cls.addClassCleanup(cls.up.stop)
        cls.stack = harness.Stack("nginx", config(cls.up.port))
        cls.addClassCleanup(cls.stack.stop)
        cls.stack.start()

    def completed(self, request_id):
        rec = self.stack.wait_log(lambda r: r.get("msg") == "request completed"
                                  and r.get("request_id") == request_id, timeout=5.0)
        self.assertIsNotNone(rec, f"no log line for {request_id}")
        return rec

    def ledger_row(self, request_id):
        def find():
            for row in ledger_rows(self.stack):
                if row[0] == request_id:
                    return row
            return None
        row = harness.wait_until(find, 5.0, 0.1)
        self.assertIsNotNone(row, f"no ledger row for {request_id}")
        return row

    def metric(self, name_and_labels):
        text = self.stack.request("GET", "/metrics").body.decode()
        for line in text.splitlines():
            if line.startswith(name_and_labels + " "):
                return float(line.split()[-1])
        return 0.0

    def done_lines(self):
        return [x for x in self.stack.piapi_log() if x.get("msg") == "request completed"
                and x.get("path", "").startswith("/piapi/")]

    def request(self, path, headers, body):
        """The request's id; a cut stream's comes from its log line."""
        n = len(self.done_lines())
        try:
            r = self.stack.request("POST", path, headers, body, timeout=20)
            rid = r.header("X-Request-ID")
        except Exception:   # http.client.IncompleteRead and the like
            rid = None
        if rid is None:
            self.assertTrue(harness.wait_until(lambda: len(self.done_lines()) > n, 5.0))
            rid = self.done_lines()[-1]["request_id"]
        return rid

    # ---- keys cut into model names ----

    def test_answer_model_cut_before_provider_key_end_is_dropped(self):
        """An upstream naming a model that is padding then the provider key:
        cut to 127 bytes it would end in most of the key, which the check
        for whole keys misses; a name that long is none at all."""
        model = "m" * 110 + OPENAI_KEY
        self.up.answer = json_answer({"model": model, "usage": {"prompt_tokens": 3,
                                                                "completion_tokens": 4}})
        rid = self.request("/piapi/cx/chat/completions", HA, b'{"model":"gpt-4o"}')
        rec = self.completed(rid)
        self.assertEqual(rec.get("model"), "gpt-4o")
        self.assertEqual(rec.get("input_tokens"), 3)
        row = self.ledger_row(rid)
        self.assertEqual(row[1], "gpt-4o")
        prefix = OPENAI_KEY[:14]
        self.assertNotIn(prefix, self.stack.piapi_log_text())
        self.assertNotIn(prefix, self.stack.request("GET", "/metrics").body.decode())

    def test_request_model_cut_before_member_key_end_is_dropped(self):
        """A member's own key after 110 bytes of padding in "model": never
        a part of it in the log or the ledger."""
        self.up.answer = json_answer({"usage": {"prompt_tokens": 5, "completion_tokens": 6}})
        body = json.dumps({"model": "x" * 110 + ALICE}).encode()
        rid = self.request("/piapi/cx/chat/completions", HA, body)
        rec = self.completed(rid)
        self.assertNotIn("model", rec)
        self.assertEqual(rec.get("output_tokens"), 6)
        row = self.ledger_row(rid)
        self.assertEqual(row[1], "")
        self.assertNotIn(ALICE[:14], self.stack.piapi_log_text())

    # ---- cut streams ----

    def test_anthropic_cut_after_message_delta_is_incomplete(self):
        """Reset after a message_delta (more may follow: it is cumulative)
        and before message_stop: the counts seen are kept, the answer is
        incomplete everywhere."""
        start = named("message_start", {"type": "message_start", "message": {
            "model": "claude-cut", "usage": {"input_tokens": 100, "output_tokens": 1}}})
        delta = named("message_delta", {"type": "message_delta",
                                         "usage": {"output_tokens": 7}})
        self.up.answer = sse_answer([start, delta], then=reset)
        before = self.metric('piapi_usage_incomplete_total{service_type="cc"}')
        rid = self.request("/piapi/cc/v1/messages", HB, b'{"model":"claude-cut","stream":true}')
        rec = self.completed(rid)
        self.assertEqual(rec.get("error"), "reset", rec)
        self.assertIs(rec.get("usage_complete"), False)
        self.assertEqual(rec.get("input_tokens"), 100)
        self.assertEqual(rec.get("output_tokens"), 7)
        self.assertEqual(self.ledger_row(rid)[4], 0)
        self.assertEqual(self.metric('piapi_usage_incomplete_total{service_type="cc"}'),
                         before + 1)

    def test_chat_cut_after_usage_chunk_is_incomplete(self):
        """A Chat stream reset after its usage chunk, before [DONE]."""
        chunk = unnamed({"model": "gpt-4o", "choices": [{"delta": {"content": "hi"}}]})
        usage = unnamed({"model": "gpt-4o", "choices": [],
                         "usage": {"prompt_tokens": 10, "completion_tokens": 5}})
        self.up.answer = sse_answer([chunk, usage], then=reset)
        rid = self.request("/piapi/cx/chat/completions", HA,
                           b'{"model":"gpt-4o","stream":true}')
        rec = self.completed(rid)
        self.assertEqual(rec.get("error"), "reset")
        self.assertIs(rec.get("usage_complete"), False)
        self.assertEqual(self.ledger_row(rid)[4], 0)

    def test_clean_stream_stays_complete(self):
        chunk = unnamed({"model": "gpt-4o", "choices": [{"delta": {"content": "hi"}}]})
        usage = unnamed({"model": "gpt-4o", "choices": [],
                         "usage": {"prompt_tokens": 10, "completion_tokens": 5}})
        self.up.answer = sse_answer([chunk, usage, b"data: [DONE]\n\n"])
        r = self.stack.request("POST", "/piapi/cx/chat/completions", HA,
                               b'{"model":"gpt-4o","stream":true}', timeout=20)
        self.assertEqual(r.body, chunk + b"data: [DONE]\n\n")
        rec = self.completed(r.header("X-Request-ID"))
        self.assertIs(rec.get("usage_complete"), True)
        self.assertEqual(rec.get("input_tokens"), 10)

    # ---- what held ----

    def test_injection_keeps_the_body_valid_json(self):
        """Duplicate keys, escaped key names, null and false values: the
        forwarded body is valid JSON, and usage is asked exactly when the
        key the upstream reads (the last) did not ask already."""
        chunk = unnamed({"model": "gpt-4o", "choices": [{"delta": {"content": "hi"}}]})
        usage = unnamed({"model": "gpt-4o", "choices": [],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
        self.up.answer = sse_answer([chunk, usage, b"data: [DONE]\n\n"])
        cases = [   # body, the client asked itself (gets the usage chunk)
            (b'{"model":"gpt-4o","stream":true,"stream_options":null}', False),
            (b'{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":false},'
             b'"stream_options":{"a":1}}', False),
            (b'{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true,'
             b'"include_usage":false}}', False),
            (b'{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":false,'
             b'"include_usage":true}}', True),
            (b'{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}', True),
            (b'{"model":"gpt-4o","stream":true,"x":"\\\\"} ', False),
        ]
        for body, asked in cases:
            with self.subTest(body=body):
                n = len(self.up.bodies)
                r = self.stack.request("POST", "/piapi/cx/chat/completions", HA, body,
                                       timeout=20)
                sent = self.up.bodies[n]
                pairs = json.loads(sent, object_pairs_hook=lambda p: p)
                last = [v for k, v in pairs if k == "stream_options"][-1]
                self.assertEqual([v for k, v in last if k == "include_usage"][-1], True)
                if asked:
                    self.assertEqual(sent, body)
                self.assertEqual(b'"usage"' in r.body, asked)

    def test_model_labels_are_capped(self):
        """An upstream naming a new model in every answer fills at most 64
        label values; the rest are `other`."""
        for i in range(70):
            self.up.answer = json_answer({"model": f"gpt-flood-{i}",
                                          "usage": {"prompt_tokens": 1,
                                                    "completion_tokens": 1}})
            self.stack.request("POST", "/piapi/cx/chat/completions", HA, b'{"model":"x"}')
        text = self.stack.request("GET", "/metrics").body.decode()
        models = {line.split('model="')[1].split('"')[0] for line in text.splitlines()
                  if line.startswith("piapi_tokens_total{")}
        self.assertLessEqual(len(models - {"other"}), 64)
        self.assertIn("other", models)


class UsageDbNotAFile(unittest.TestCase):
    """settings.usageDb naming a FIFO: SQLite would block opening it for
    good, so start-up (restoring the members' tallies) hung before piapi
    served anything, deaf to SIGTERM, and `piapi usage` never returned."""

    @classmethod
    def setUpClass(cls):
        cls.up = harness.RawUpstream()
        cls.addClassCleanup(cls.up.stop)
        cls.up.answer = json_answer({"model": "gpt-4o", "usage": {"prompt_tokens": 1,
                                                                  "completion_tokens": 2}})
        cls.stack = harness.Stack("nginx", cls.build)
        cls.addClassCleanup(cls.stack.stop)
        cls.stack.start()

    @classmethod
    def build(cls, stack):
        os.mkfifo(stack.tmp / "usage.db")
        return config(cls.up.port)(stack)

    def test_piapi_serves_and_logs_why(self):
        r = self.stack.request("POST", "/piapi/cx/chat/completions", HA, b'{"model":"gpt-4o"}')
        self.assertEqual(r.status, 200)
        self.assertIsNotNone(self.stack.wait_log(
            lambda x: x.get("msg", "").startswith("usage db cannot be opened")
            and x.get("error") == "not a regular file"))
        self.assertEqual(self.stack.request("GET", "/usage", HA).status, 200)

    def test_usage_command_refuses_it(self):
        p = subprocess.run([str(harness.piapi_bin()), "usage", "--config",
                            str(self.stack.config_path)],
                           capture_output=True, text=True, timeout=10)
        self.assertEqual(p.returncode, 1)
        self.assertIn("not a regular file", p.stderr)


if __name__ == "__main__":
    unittest.main()
