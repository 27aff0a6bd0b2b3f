#!/usr/bin/env python3
"""A tiny FastCGI responder that stands in for piapi when checking the
front-end configs on their own (test_deploy.py), so a broken nginx/lighttpd
config and a piapi bug are told apart.

    fcgi_stub.py [--socket PATH]   # without --socket: listening socket on fd 0
                                   # (spawn-fcgi -n, lighttpd bin-path)

Answers:
  /healthz          200 "ok"
  .../cut           head and 100 body bytes, then close without END_REQUEST
  .../cut-poison    head and 100 body bytes, 8 zero bytes, then END_REQUEST
  .../cut-both      head and 100 body bytes, 8 zero bytes, close without END_REQUEST
  .../sse?n=N&interval=S
                    text/event-stream, N events S seconds apart, each flushed
                    as its own FCGI_STDOUT record
  anything else     200 JSON {"params": {...}, "params_list": [[k, v], ...],
                    "body_len": n, "body_sha256": hex}
SIGTERM exits and removes the socket it created. Standard library only.
"""
import argparse
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
import urllib.parse

FCGI_BEGIN_REQUEST, FCGI_END_REQUEST, FCGI_PARAMS, FCGI_STDIN, FCGI_STDOUT = 1, 3, 4, 5, 6
HEADER = struct.Struct("!BBHHBx")


def read_exact(conn, n):
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = conn.recv_into(view[got:], n - got)
        if not k:
            raise EOFError
        got += k
    return bytes(buf)


def read_record(conn):
    _ver, rtype, rid, clen, plen = HEADER.unpack(read_exact(conn, 8))
    content = read_exact(conn, clen) if clen else b""
    if plen:
        read_exact(conn, plen)
    return rtype, rid, content


def decode_params(data):
    out, i = [], 0
    while i < len(data):
        lens = []
        for _ in range(2):
            if data[i] & 0x80:
                lens.append(struct.unpack("!I", data[i:i + 4])[0] & 0x7FFFFFFF)
                i += 4
            else:
                lens.append(data[i])
                i += 1
        name = data[i:i + lens[0]].decode("latin-1")
        i += lens[0]
        value = data[i:i + lens[1]].decode("latin-1")
        i += lens[1]
        out.append((name, value))
    return out


def record(rtype, rid, content):
    pad = (-len(content)) % 8
    return HEADER.pack(1, rtype, rid, len(content), pad) + content + b"\0" * pad


def serve(conn):
    try:
        params_raw, parts, rid = b"", [], 1
        while True:
            rtype, rid, content = read_record(conn)
            if rtype == FCGI_PARAMS:
                params_raw += content
            elif rtype == FCGI_STDIN:
                if not content:
                    break
                parts.append(content)
        body = b"".join(parts)
        plist = decode_params(params_raw)
        params = dict(reversed(plist))  # first occurrence wins, like FCGX_GetParam
        uri = params.get("REQUEST_URI", "")
        path, _, query = uri.partition("?")
        out = lambda data: conn.sendall(record(FCGI_STDOUT, rid, data))
        if path == "/healthz":
            out(b"Status: 200 OK\r\nContent-Type: text/plain\r\n\r\nok\n")
        elif path.endswith("/sse"):
            q = dict(urllib.parse.parse_qsl(query))
            n, interval = int(q.get("n", "5")), float(q.get("interval", "0.1"))
            out(b"Status: 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"X-Accel-Buffering: no\r\n\r\n: ok\n\n")
            for k in range(n):
                time.sleep(interval)
                out(b'data: {"i":%d}\n\n' % k)
        elif path.endswith(("/cut", "/cut-poison", "/cut-both")):
            # head + 100 of 1000 promised bytes, then an abnormal end: either
            # the connection closes without FCGI_END_REQUEST (/cut), or 8 zero
            # bytes outside any record precede a normal END_REQUEST (/cut-poison)
            out(b"Status: 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"X-Accel-Buffering: no\r\n\r\n" + b"x" * 100)
            if path.endswith("/cut"):
                return
            time.sleep(0.05)
            conn.sendall(b"\0" * 8)
            if path.endswith("/cut-both"):
                return
        else:
            doc = {"params": params, "params_list": plist, "body_len": len(body),
                   "body_sha256": hashlib.sha256(body).hexdigest()}
            data = json.dumps(doc).encode()
            out(b"Status: 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(data) + data)
        out(b"")
        conn.sendall(record(FCGI_END_REQUEST, rid, struct.pack("!IB3x", 0, 0)))
    except (EOFError, OSError):
        pass
    finally:
        conn.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket")
    ap.add_argument("--socket-mode", default="0666")
    args, _ = ap.parse_known_args()
    if args.socket:
        if os.path.exists(args.socket):
            os.unlink(args.socket)
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(args.socket)
        os.chmod(args.socket, int(args.socket_mode, 8))
        lsock.listen(128)
    else:
        lsock = socket.socket(fileno=0)

    def stop(_sig, _frm):
        if args.socket:
            try:
                os.unlink(args.socket)
            except OSError:
                pass
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(json.dumps({"level": "info", "msg": "fcgi_stub listening"}), file=sys.stderr, flush=True)
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
