"""Routes and failover against broken or malicious providers and a hostile
member: an answer must never reach the client twice nor be judged by words
its model wrote, a body piapi rewrote for one candidate must not go to one
that refuses the rewrite, a compressed stream must not be held to its end,
and what held under attack (held first events sent once, streams cut after
their first event not retried, the first key never reaching the second
candidate, a silent candidate ending within headerTimeoutMs, config
validation) stays held. Through nginx and lighttpd.

Each upstream is a raw socket server, so every answer is exactly the bytes
a test wants. Every test uses a member of its own, whose candidates (two
keys of their own) no other test has put on cooldown.
"""
import gzip
import itertools
import json
import os
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
import unittest

import harness

NMEMBERS = 40


def member_key(i):
    return f"piapi-user-m{i:02d}-Hs7lU5aG3eQx0123"


def key_a(i):
    return f"sk-pa-k{i:02d}-Zq81mVx0oPl2Wn7Rt"


def key_b(i):
    return f"sk-pb-k{i:02d}-Yj3sKd9QwErT5uIo1"


def status_answer(status, extra=b"", body=b'{"type":"error","error":{"type":"overloaded_error"}}'):
    def answer(conn, _head, _body):
        conn.sendall(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n" % status + extra +
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    return answer


def sse_answer(parts, pause=0.05, extra=b""):
    def answer(conn, _head, _body):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + extra +
                     b"Connection: close\r\n\r\n")
        for p in parts:
            time.sleep(pause)
            conn.sendall(p)
    return answer


def ev(name, obj):
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(obj).encode() + b"\n\n"


B_STREAM = [ev("message_start", {"type": "message_start", "message": {"id": "msg_b"}}),
            ev("content_block_delta", {"type": "content_block_delta",
                                       "delta": {"type": "text_delta", "text": "from B"}}),
            ev("message_stop", {"type": "message_stop"})]


def config(a_port, b_port, settings, without_a=()):
    """without_a: members whose routes (default included) name no pa key."""
    def build(_stack):
        a, b = f"http://127.0.0.1:{a_port}", f"http://127.0.0.1:{b_port}"
        users = []
        for i in range(NMEMBERS):
            both = [{"providerName": "pa", "providerKeyName": f"k{i:02d}"},
                    {"providerName": "pb", "providerKeyName": f"k{i:02d}"}]
            if i in without_a:
                both = both[1:]
            users.append({"name": f"m{i:02d}", "apiKey": member_key(i),
                          "providerName": "pb" if i in without_a else "pa",
                          "providerKeyName": f"k{i:02d}",
                          "services": {"cc": {"candidates": both},
                                       "cx": {"candidates": both},
                                       "cs": {"candidates": both, "strategy": "spread"},
                                       "cr": {"candidates": both[::-1]}}})
        hdr = {"mode": "header", "name": "x-api-key"}
        return {
            "providers": [
                {"name": "pa", "apiKeys": {f"k{i:02d}": key_a(i) for i in range(NMEMBERS)},
                 "services": [{"type": "cc", "baseUrl": a, "auth": hdr},
                              {"type": "cs", "baseUrl": a, "auth": hdr},
                              {"type": "cx", "baseUrl": a + "/v1"},
                              {"type": "cr", "baseUrl": a + "/v1"}]},
                {"name": "pb", "apiKeys": {f"k{i:02d}": key_b(i) for i in range(NMEMBERS)},
                 "services": [{"type": "cc", "baseUrl": b, "auth": hdr},
                              {"type": "cs", "baseUrl": b, "auth": hdr},
                              {"type": "cx", "baseUrl": b + "/v1",
                               "usage": {"injectStreamUsage": False}},
                              {"type": "cr", "baseUrl": b + "/v1",
                               "usage": {"injectStreamUsage": False}}]},
            ],
            "users": users,
            "settings": dict(settings),
        }
    return build


class Checks:
    FORM = None
    SETTINGS = {"headerTimeoutMs": 3000, "sseKeepaliveMs": 1000, "usageDb": "usage.db"}

    @classmethod
    def setUpClass(cls):
        cls.a = harness.RawUpstream()
        cls.addClassCleanup(cls.a.stop)
        cls.b = harness.RawUpstream()
        cls.addClassCleanup(cls.b.stop)
        cls.stack = harness.Stack(cls.FORM, config(cls.a.port, cls.b.port, cls.SETTINGS))
        cls.addClassCleanup(cls.stack.stop)
        cls.stack.start()
        cls.members = itertools.count()

    def setUp(self):
        self.i = next(self.members)
        self.assertLess(self.i, NMEMBERS)
        self.a.seen.clear()
        self.b.seen.clear()
        self.a.answer = self.b.answer = None

    def post(self, path, body, extra=(), timeout=15):
        hdrs = [("x-api-key", member_key(self.i)), ("Content-Type", "application/json")]
        return self.stack.request("POST", path, hdrs + list(extra), body, timeout=timeout)

    def completed(self, rid):
        rec = self.stack.wait_log(lambda r: r.get("msg") == "request completed"
                                  and r.get("request_id") == rid, timeout=5.0)
        self.assertIsNotNone(rec, f"no log line for {rid}")
        return rec

    # ---- the first event is judged by its own fields ----

    def test_overload_words_in_a_later_event_are_no_overload(self):
        """A healthy stream whose first chunk carries message_start and a
        delta in which the model writes about `event: error` and
        `overloaded_error`: the answer is the client's, once, and the
        second candidate gets nothing (no double billing, no cooldown)."""
        text = "An SSE line event: error carries type overloaded_error."
        stream = (ev("message_start", {"type": "message_start", "message": {"id": "msg_a"}}) +
                  ev("content_block_delta", {"type": "content_block_delta",
                                             "delta": {"type": "text_delta", "text": text}}) +
                  ev("message_stop", {"type": "message_stop"}))
        self.a.answer = sse_answer([stream])
        self.b.answer = sse_answer(B_STREAM)
        r = self.post("/piapi/cc/v1/messages", b'{"model":"m","stream":true}')
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, stream)
        self.assertEqual(len(self.b.seen), 0)
        rec = self.completed(r.header("X-Request-ID"))
        self.assertEqual(rec.get("attempts"), 1)
        self.assertEqual(rec.get("upstream_provider"), "pa")

    def test_error_event_of_another_type_is_relayed(self):
        """`event: error` of type api_error whose message merely names
        overloaded_error is no overload: relayed as it came."""
        first = ev("error", {"type": "error", "error": {
            "type": "api_error", "message": "internal, not an overloaded_error"}})
        self.a.answer = sse_answer([first])
        self.b.answer = sse_answer(B_STREAM)
        r = self.post("/piapi/cc/v1/messages", b'{"model":"m","stream":true}')
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, first)
        self.assertEqual(len(self.b.seen), 0)

    def test_overloaded_first_event_in_pieces_fails_over_once(self):
        """The overload event arriving a few bytes at a time is still
        judged whole: B answers, byte-exact, nothing of A reaches the
        client, and A's key never reaches B."""
        first = ev("error", {"type": "error", "error": {"type": "overloaded_error",
                                                         "message": "Overloaded"}})
        self.a.answer = sse_answer([first[i:i + 7] for i in range(0, len(first), 7)],
                                   pause=0.01)
        self.b.answer = sse_answer(B_STREAM)
        r = self.post("/piapi/cc/v1/messages", b'{"model":"m","stream":true}')
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, b"".join(B_STREAM))
        self.assertEqual(len(self.b.seen), 1)
        head, body = self.b.seen[0]
        self.assertIn(key_b(self.i).encode(), head)
        self.assertNotIn(key_a(self.i).encode(), head + body)
        self.assertEqual(body, b'{"model":"m","stream":true}')
        rec = self.completed(r.header("X-Request-ID"))
        self.assertEqual(rec.get("candidates"),
                         f"pa/k{self.i:02d}:overloaded,pb/k{self.i:02d}:ok")

    def test_healthy_first_event_in_pieces_is_sent_once(self):
        """A held first event that arrives in pieces, then the rest: every
        byte exactly once, in order; B never asked."""
        parts = [b"event: message_start\n", b"data: {\"type\":\"message_start\"}", b"\n",
                 b"\n", B_STREAM[1], B_STREAM[2]]
        self.a.answer = sse_answer(parts)
        r = self.post("/piapi/cc/v1/messages", b'{"model":"m","stream":true}')
        self.assertEqual(r.body, b"".join(parts))
        self.assertEqual(len(self.b.seen), 0)

    def test_stream_cut_after_first_event_is_not_retried(self):
        def answer(conn, head, body):
            sse_answer([B_STREAM[0]])(conn, head, body)
            time.sleep(0.1)
        self.a.answer = answer
        self.b.answer = sse_answer(B_STREAM)
        try:
            r = self.post("/piapi/cc/v1/messages", b'{"model":"m","stream":true}')
            got = r.body
        except Exception:   # a cut chunked answer
            got = None
        time.sleep(0.3)
        self.assertEqual(len(self.b.seen), 0)
        if got is not None:
            self.assertNotIn(b"from B", got)

    # ---- the body as each candidate wants it ----

    def test_injected_usage_option_not_sent_to_a_candidate_without_it(self):
        """A streamed Chat Completions request: A's service has piapi add
        stream_options.include_usage, B's (injectStreamUsage: false)
        refuses the field. A answers 529: B gets the client's body as the
        client sent it."""
        sent = b'{"model":"gpt-x","stream":true,"messages":[]}'
        self.a.answer = status_answer(529)
        chunks = [b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n', b"data: [DONE]\n\n"]
        self.b.answer = sse_answer(chunks)
        r = self.post("/piapi/cx/chat/completions", sent)
        self.assertEqual(len(self.a.seen), 1)
        self.assertIn(b"include_usage", self.a.seen[0][1])
        self.assertEqual(len(self.b.seen), 1)
        self.assertEqual(self.b.seen[0][1], sent)
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, b"".join(chunks))

    def test_injected_usage_option_sent_to_a_later_candidate_with_it(self):
        """The other way round (cr: B first, without the option; A second,
        with it): B gets the client's body, A the one asking for usage, and
        the client gets A's stream without the usage-only chunk, its usage
        complete in the log."""
        sent = b'{"model":"gpt-x","stream":true,"messages":[]}'
        self.b.answer = status_answer(529)
        chunks = [b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n',
                  b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n',
                  b"data: [DONE]\n\n"]
        self.a.answer = sse_answer(chunks)
        r = self.post("/piapi/cr/chat/completions", sent)
        self.assertEqual(self.b.seen[0][1], sent)
        self.assertIn(b'"include_usage":true', self.a.seen[0][1])
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, chunks[0] + chunks[2])
        rec = self.completed(r.header("X-Request-ID"))
        self.assertEqual((rec.get("input_tokens"), rec.get("output_tokens"),
                          rec.get("usage_complete")), (5, 2, True))

    # ---- what is never held ----

    def test_compressed_event_stream_is_not_held_to_its_end(self):
        """A provider that gzips an event stream anyway: piapi cannot read
        its first event, so it must not hold the head waiting for a blank
        line that never shows in compressed bytes: the first bytes reach
        the client while the upstream is still silent."""
        z = gzip.compress(b"".join(B_STREAM))

        def answer(conn, _head, _body):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Content-Encoding: gzip\r\nConnection: close\r\n\r\n")
            conn.sendall(z[:10])
            time.sleep(2.0)
            conn.sendall(z[10:])
        self.a.answer = answer
        ex = self.stack.raw(harness.build_request(
            "POST", "/piapi/cc/v1/messages",
            [("x-api-key", member_key(self.i)), ("Content-Type", "application/json")],
            b'{"model":"m","stream":true}'), timeout=10)
        self.assertEqual(ex.status, 200)
        self.assertLess(ex.headers_at, 1.5, "head held until the compressed stream ended")
        self.assertEqual(ex.body(), z)

    # ---- timeouts ----

    def test_silent_candidate_ends_within_header_timeout(self):
        """A accepts and never answers: the request ends by its own
        headerTimeoutMs (3 s), not later."""
        def silent(conn, _head, _body):
            time.sleep(6)
        self.a.answer = silent
        self.b.answer = silent
        t0 = time.monotonic()
        r = self.post("/piapi/cc/v1/messages", b'{"model":"m"}', timeout=10)
        took = time.monotonic() - t0
        self.assertEqual(r.status, 504)
        self.assertLess(took, 4.5)

    # ---- cooldowns ----

    def metric(self, name_and_labels):
        text = self.stack.request("GET", "/metrics").body.decode()
        for line in text.splitlines():
            if line.startswith(name_and_labels + " "):
                return float(line.split()[-1])
        return None

    def cooling(self, provider):
        return self.metric(f'piapi_candidate_cooling{{provider="{provider}",'
                           f'key="k{self.i:02d}"}}')

    def test_retry_after_past_date_and_garbage(self):
        """A 429 whose Retry-After is an HTTP date in the past cools the
        candidate for no time (the next request goes to it); one that is
        garbage or negative falls back to 10 s (the next goes to B)."""
        self.a.answer = status_answer(429, b"Retry-After: Wed, 21 Oct 2015 07:28:00 GMT\r\n")
        self.b.answer = status_answer(200, body=b'{"ok":"b"}')
        r = self.post("/piapi/cc/v1/messages", b'{"model":"m"}')
        self.assertEqual(r.body, b'{"ok":"b"}')
        self.a.answer = status_answer(200, body=b'{"ok":"a"}')
        r = self.post("/piapi/cc/v1/messages", b'{"model":"m"}')
        self.assertEqual(r.body, b'{"ok":"a"}')
        self.a.answer = status_answer(429, b"Retry-After: -5\r\n")
        r = self.post("/piapi/cc/v1/messages", b'{"model":"m"}')
        self.assertEqual(r.body, b'{"ok":"b"}')
        self.assertEqual(self.cooling("pa"), 1)
        n = len(self.a.seen)
        r = self.post("/piapi/cc/v1/messages", b'{"model":"m"}')
        self.assertEqual(r.body, b'{"ok":"b"}')
        self.assertEqual(len(self.a.seen), n)

    def test_all_cooling_soonest_tried_then_none_again(self):
        """Both candidates answer 429 with Retry-After 600 and 300: the
        client gets B's 429 with its Retry-After; the next request tries
        only the soonest (B), once, never answering 503 without trying."""
        self.a.answer = status_answer(429, b"Retry-After: 600\r\n")
        self.b.answer = status_answer(429, b"Retry-After: 300\r\n")
        r = self.post("/piapi/cc/v1/messages", b'{"model":"m"}')
        self.assertEqual(r.status, 429)
        self.assertEqual(r.header("Retry-After"), "300")
        self.assertEqual((len(self.a.seen), len(self.b.seen)), (1, 1))
        r = self.post("/piapi/cc/v1/messages", b'{"model":"m"}')
        self.assertEqual(r.status, 429)
        self.assertEqual((len(self.a.seen), len(self.b.seen)), (1, 2))
        rec = self.completed(r.header("X-Request-ID"))
        self.assertEqual(rec.get("candidates"), f"pb/k{self.i:02d}:status_429")

    def test_client_abort_is_no_failure(self):
        """A member whose client gives up while A thinks must not put A on
        cooldown for everyone: the next request still goes to A."""
        def slow(conn, _head, _body):
            time.sleep(1.5)
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 10\r\nConnection: close\r\n\r\n{\"ok\":\"a\"}")
            except OSError:
                pass
        self.a.answer = slow
        self.b.answer = status_answer(200, body=b'{"ok":"b"}')
        self.stack.raw(harness.build_request(
            "POST", "/piapi/cc/v1/messages",
            [("x-api-key", member_key(self.i)), ("Content-Type", "application/json")],
            b'{"model":"m"}'), timeout=0.3, rst=True)
        time.sleep(2.0)
        self.assertEqual(self.cooling("pa"), None)
        self.a.answer = status_answer(200, body=b'{"ok":"a"}')
        r = self.post("/piapi/cc/v1/messages", b'{"model":"m"}')
        self.assertEqual(r.body, b'{"ok":"a"}')
        self.assertEqual(len(self.b.seen), 0)

    # ---- secrets and accounting across candidates ----

    def test_echoed_keys_never_cross(self):
        """A's 429 echoes A's key; B's 429 echoes B's: the client gets B's
        answer with B's key redacted, and neither key is in the log."""
        def echo(status, key):
            return status_answer(status, body=b'{"error":"bad key ' + key.encode() + b'"}')
        self.a.answer = echo(429, key_a(self.i))
        self.b.answer = echo(429, key_b(self.i))
        r = self.post("/piapi/cc/v1/messages", b'{"model":"m"}')
        self.assertEqual(r.status, 429)
        self.assertNotIn(key_a(self.i).encode(), r.body)
        self.assertNotIn(key_b(self.i).encode(), r.body)
        self.assertIn(b"REDACTED", r.body)
        self.assertNotIn(key_a(self.i).encode(), self.b.seen[0][0] + self.b.seen[0][1])
        rec = self.completed(r.header("X-Request-ID"))
        self.assertEqual(rec.get("upstream_key"), f"k{self.i:02d}")
        self.assertEqual(rec.get("upstream_provider"), "pb")
        log = self.stack.piapi_log_text()
        self.assertNotIn(key_a(self.i), log)
        self.assertNotIn(key_b(self.i), log)

    def test_continue_then_overload_status_fails_over(self):
        """A 100 Continue, then 529: the 1xx is nothing to relay, the 529
        fails over; A 200 whose body never comes (closed after the head)
        fails over too, and the client gets B's exact Content-Length."""
        def answer(conn, _head, _body):
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            time.sleep(0.05)
            status_answer(529)(conn, _head, _body)
        self.a.answer = answer
        self.b.answer = status_answer(200, body=b'{"ok":"b"}')
        r = self.post("/piapi/cc/v1/messages", b'{"model":"m"}')
        self.assertEqual((r.status, r.body), (200, b'{"ok":"b"}'))

    def test_head_only_then_close_fails_over(self):
        def answer(conn, _head, _body):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 50\r\n\r\n")
            time.sleep(0.1)
        self.a.answer = answer
        self.b.answer = status_answer(200, body=b'{"ok":"b"}')
        r = self.post("/piapi/cc/v1/messages", b'{"model":"m"}')
        self.assertEqual((r.status, r.body), (200, b'{"ok":"b"}'))
        self.assertEqual(r.header("Content-Length"), "10")
        rec = self.completed(r.header("X-Request-ID"))
        self.assertEqual(rec.get("candidates"),
                         f"pa/k{self.i:02d}:reset,pb/k{self.i:02d}:ok")

    def test_head_request_fails_over(self):
        self.a.answer = status_answer(503)
        self.b.answer = status_answer(200, body=b'{"ok":"b"}')
        hdrs = [("x-api-key", member_key(self.i))]
        r = self.stack.request("HEAD", "/piapi/cc/v1/models", hdrs)
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, b"")
        self.assertEqual(len(self.b.seen), 1)
        self.assertTrue(self.b.seen[0][0].startswith(b"HEAD "))

    # ---- odd first events ----

    def test_huge_first_event_is_sent_once(self):
        """A first event of 300 KiB (no blank line for the first 64 KiB):
        the head goes out, every byte exactly once."""
        big = b"event: message_start\ndata: {\"pad\":\"" + b"x" * 300000 + b"\"}\n\n"
        parts = [big[i:i + 16384] for i in range(0, len(big), 16384)] + B_STREAM[1:]
        self.a.answer = sse_answer(parts, pause=0.002)
        r = self.post("/piapi/cc/v1/messages", b'{"model":"m","stream":true}')
        self.assertEqual(r.body, b"".join(parts))
        self.assertEqual(len(self.b.seen), 0)

    def test_first_event_that_never_ends_is_relayed_at_the_end(self):
        """A stream that ends inside its first event: relayed as it came,
        once, with no failover (nothing failed)."""
        self.a.answer = sse_answer([b"data: {\"partial\":", b" 1}"])
        r = self.post("/piapi/cc/v1/messages", b'{"model":"m","stream":true}')
        self.assertEqual((r.status, r.body), (200, b'data: {"partial": 1}'))
        self.assertEqual(len(self.b.seen), 0)

    def test_data_only_error_is_relayed(self):
        """`data:` alone is a `message` event, not an `error` event: relayed."""
        first = b'data: {"type":"error","error":{"type":"overloaded_error"}}\n\n'
        self.a.answer = sse_answer([first])
        r = self.post("/piapi/cc/v1/messages", b'{"model":"m","stream":true}')
        self.assertEqual(r.body, first)
        self.assertEqual(len(self.b.seen), 0)

    def test_crlf_overloaded_event_fails_over(self):
        first = (b"event: error\r\ndata: {\"type\":\"error\",\"error\":"
                 b"{\"type\":\"overloaded_error\"}}\r\n\r\n")
        self.a.answer = sse_answer([first])
        self.b.answer = sse_answer(B_STREAM)
        r = self.post("/piapi/cc/v1/messages", b'{"model":"m","stream":true}')
        self.assertEqual(r.body, b"".join(B_STREAM))

    # ---- bodies, accounting, metrics ----

    def test_large_body_is_not_retried_and_says_why(self):
        """A 9 MiB body is streamed upstream, so it cannot be sent again:
        A's 529 reaches the client, B gets nothing, the log says why."""
        self.a.answer = status_answer(529)
        self.b.answer = status_answer(200, body=b'{"ok":"b"}')
        body = b'{"model":"m","pad":"' + b"p" * (9 * 1024 * 1024) + b'"}'
        r = self.post("/piapi/cc/v1/messages", body, timeout=30)
        self.assertEqual(r.status, 529)
        self.assertEqual(len(self.b.seen), 0)
        self.assertEqual(len(self.a.seen[0][1]), len(body))
        rec = self.completed(r.header("X-Request-ID"))
        self.assertIn("cannot be sent again", rec.get("failover", ""))

    def test_metrics_and_log_after_overload(self):
        """An overloaded first event then B: attempts by outcome, one
        failover of the service type, A cooling, B not, and the log line
        names B as the upstream."""
        before = self.metric('piapi_failovers_total{service_type="cc"}') or 0
        first = ev("error", {"type": "error", "error": {"type": "overloaded_error"}})
        self.a.answer = sse_answer([first])
        self.b.answer = sse_answer(B_STREAM)
        r = self.post("/piapi/cc/v1/messages", b'{"model":"m","stream":true}')
        self.assertEqual(r.body, b"".join(B_STREAM))
        k = f"k{self.i:02d}"
        self.assertEqual(self.metric(
            f'piapi_upstream_attempts_total{{provider="pa",key="{k}",outcome="overloaded"}}'), 1)
        self.assertEqual(self.metric(
            f'piapi_upstream_attempts_total{{provider="pb",key="{k}",outcome="ok"}}'), 1)
        self.assertEqual(self.metric('piapi_failovers_total{service_type="cc"}'), before + 1)
        self.assertEqual(self.cooling("pa"), 1)
        self.assertIn(self.cooling("pb"), (None, 0))
        rec = self.completed(r.header("X-Request-ID"))
        self.assertEqual((rec.get("upstream_provider"), rec.get("upstream_key"),
                          rec.get("attempts")), ("pb", k, 2))

    # ---- a slow first event ----

    def test_client_leaving_during_a_silent_held_head_is_noticed(self):
        """A 200 event-stream head, then a long silence before the first
        event (a model thinking): a client that leaves meanwhile must end
        the upstream transfer within about two ping intervals, as without
        candidates (behind lighttpd, only a write tells piapi; the held
        head must not stop the probe), and the client that stays gets the
        pings that keep its connection alive."""
        closed = []

        def answer(conn, _head, _body):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Connection: close\r\n\r\n")
            t0 = time.monotonic()
            conn.settimeout(6)
            try:
                if conn.recv(1) == b"":
                    closed.append(time.monotonic() - t0)
            except OSError:
                pass
        self.a.answer = answer
        self.stack.raw(harness.build_request(
            "POST", "/piapi/cc/v1/messages",
            [("x-api-key", member_key(self.i)), ("Content-Type", "application/json")],
            b'{"model":"m","stream":true}'), timeout=0.5)
        self.assertTrue(harness.wait_until(lambda: closed, 7.0), "upstream never closed")
        self.assertLess(closed[0], 3.5)
        self.assertEqual(len(self.b.seen), 0)

        def late(conn, head, body):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Connection: close\r\n\r\n")
            time.sleep(2.5)
            conn.sendall(b"".join(B_STREAM))
        self.a.answer = late
        ex = self.stack.raw(harness.build_request(
            "POST", "/piapi/cc/v1/messages",
            [("x-api-key", member_key(self.i)), ("Content-Type", "application/json")],
            b'{"model":"m","stream":true}'), timeout=8)
        self.assertLess(ex.headers_at, 2.0)
        body = ex.body()
        self.assertTrue(body.startswith(b": ping\n\n"), body[:40])
        self.assertEqual(body.replace(b": ping\n\n", b""), b"".join(B_STREAM))

    # ---- reload ----

    def reload_with(self, without_a):
        def reloads():
            return self.metric('piapi_config_reloads_total{result="success"}') or 0
        n = reloads()
        harness.write_config(self.stack.config_path,
                             config(self.a.port, self.b.port, self.SETTINGS, without_a)(None))
        self.assertTrue(harness.wait_until(lambda: reloads() > n, 5.0), "no reload")

    def test_reload_drops_and_readds_cooling_candidate(self):
        """A cooling for 10 min; a reload that names A no more forgets it
        (no cooling gauge left), and one that names it again finds it
        healthy: the next request goes to A."""
        self.a.answer = status_answer(429, b"Retry-After: 600\r\n")
        self.b.answer = status_answer(200, body=b'{"ok":"b"}')
        self.post("/piapi/cc/v1/messages", b'{"model":"m"}')
        self.assertEqual(self.cooling("pa"), 1)
        try:
            self.reload_with({self.i})
            self.assertIsNone(self.cooling("pa"))
            r = self.post("/piapi/cc/v1/messages", b'{"model":"m"}')
            self.assertEqual(r.body, b'{"ok":"b"}')
        finally:
            self.reload_with(set())
        self.a.answer = status_answer(200, body=b'{"ok":"a"}')
        r = self.post("/piapi/cc/v1/messages", b'{"model":"m"}')
        self.assertEqual(r.body, b'{"ok":"a"}')

    def test_ledger_names_the_candidate_that_answered(self):
        """A's 200 stream overloads at its first event after a
        message_start-like usage would have been read; B answers with its
        own usage: the ledger row is B's, with B's counts only."""
        first = ev("error", {"type": "error", "error": {"type": "overloaded_error"}})
        self.a.answer = sse_answer([first])
        usage = {"id": "msg_b", "model": "claude-b", "type": "message", "role": "assistant",
                 "content": [], "usage": {"input_tokens": 7, "output_tokens": 3}}
        self.b.answer = status_answer(200, body=json.dumps(usage).encode())
        r = self.post("/piapi/cc/v1/messages", b'{"model":"claude-req"}')
        rid = r.header("X-Request-ID")
        rec = self.completed(rid)
        self.assertEqual((rec.get("input_tokens"), rec.get("output_tokens")), (7, 3))

        def row():
            db = sqlite3.connect(self.stack.tmp / "usage.db")
            try:
                return db.execute("SELECT provider, key_name, model, input, output FROM"
                                  " requests WHERE request_id = ?", (rid,)).fetchone()
            finally:
                db.close()
        got = harness.wait_until(row, 5.0, 0.1)
        self.assertEqual(got, ("pb", f"k{self.i:02d}", "claude-b", 7, 3))

    # ---- spread ----

    def test_spread_session_header_odd_shapes(self):
        """Hostile session ids (huge, duplicated, empty) neither break a
        spread route nor move one session between candidates."""
        self.a.answer = status_answer(200, body=b'{"ok":"a"}')
        self.b.answer = status_answer(200, body=b'{"ok":"b"}')
        sid = "S" * 6000
        shapes = [[("X-Claude-Code-Session-Id", sid)],
                  [("X-Claude-Code-Session-Id", "one"), ("X-Claude-Code-Session-Id", "two")],
                  [("X-Claude-Code-Session-Id", "")],
                  []]
        for extra in shapes:
            got = set()
            for _ in range(6):
                r = self.post("/piapi/cs/v1/messages", b'{"model":"m"}', extra)
                self.assertEqual(r.status, 200, extra and extra[0][1][:10])
                got.add(r.body)
            self.assertEqual(len(got), 1, f"one session moved: {extra and extra[0][1][:10]}")
        ids = set()
        for n in range(20):
            r = self.post("/piapi/cs/v1/messages", b'{"model":"m"}',
                          [("X-Claude-Code-Session-Id", f"session-{n}")])
            ids.add(r.body)
        self.assertEqual(ids, {b'{"ok":"a"}', b'{"ok":"b"}'})


class ConfigChecks(unittest.TestCase):
    """`piapi --check-config` on routes a careless or hostile editor wrote."""

    def check(self, text):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "config.yaml")
            with open(path, "w") as f:
                f.write(text)
            os.chmod(path, 0o600)
            r = subprocess.run([str(harness.piapi_bin()), "--config", path, "--check-config"],
                               capture_output=True, text=True, timeout=10)
            return r.returncode, r.stdout + r.stderr

    BASE = """providers:
  - name: pa
    apiKeys: {k1: sk-pa-k1-Zq81mVx0oPl2Wn7Rt, k2: sk-pa-k2-Zq81mVx0oPl2Wn7Rt}
    services: [{type: cc, baseUrl: "http://127.0.0.1:9"}]
%s
users:
  - name: u
    apiKey: piapi-user-u-Hs7lU5aG3eQx0123
    providerName: pa
    providerKeyName: k1
    services:
      cc: %s
"""

    def test_candidate_listed_twice_is_refused(self):
        """The same key twice in one list would let one request go to it
        twice (a Retry-After: 0 leaves it healthy at once): refused, with
        the line and the field."""
        twice = "{candidates: [{providerName: pa, providerKeyName: k1}, " \
                "{providerName: pa, providerKeyName: k2}, {providerName: pa, providerKeyName: k1}]}"
        rc, out = self.check(self.BASE % ("", twice))
        self.assertEqual(rc, 1, out)
        self.assertIn(":12: users[0].services.cc.candidates[2]: repeats candidates[0]", out)
        named = "routes:\n  ha: " + twice
        rc, out = self.check(self.BASE % (named, "{route: ha}"))
        self.assertEqual(rc, 1, out)
        self.assertIn(":6: routes.ha.candidates[2]: repeats candidates[0]", out)

    def test_route_validation_names_line_and_field(self):
        cases = [
            ("{candidates: []}", ":12: users[0].services.cc.candidates: must not be empty"),
            ("{route: nope}", ":12: users[0].services.cc.route: unknown route 'nope'"),
            ("{route: x, candidates: [{providerName: pa, providerKeyName: k1}]}",
             ":12: users[0].services.cc: give one of"),
            ("{candidates: [{providerName: pa, providerKeyName: k9}]}",
             "users[0].services.cc.candidates[0].providerKeyName: key 'k9' not defined"),
            ("{candidates: [{providerName: pa, providerKeyName: k1}], strategy: Failover}",
             "users[0].services.cc.strategy: unknown strategy 'Failover'"),
            ("{providerName: pb, providerKeyName: k1}",
             "users[0].services.cc.providerName: unknown provider 'pb'"),
        ]
        for route, want in cases:
            rc, out = self.check(self.BASE % ("", route))
            self.assertEqual(rc, 1, out)
            self.assertIn(want, out)
        many = ", ".join(["{providerName: pa, providerKeyName: k1}"] * 17)
        rc, out = self.check(self.BASE % ("", "{candidates: [%s]}" % many))
        self.assertIn("at most 16 candidates", out)


class TestNginx(Checks, unittest.TestCase):
    FORM = "nginx"


class TestLighttpd(Checks, unittest.TestCase):
    FORM = "lighttpd-socket"


if __name__ == "__main__":
    unittest.main()
