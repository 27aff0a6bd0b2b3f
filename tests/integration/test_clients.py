"""Real coding assistants and SDKs, end to end through nginx + piapi to the
mock provider (tests/integration/mock_upstream.py):

  - Claude Code (`claude -p`), with ANTHROPIC_API_KEY (sends x-api-key) and
    with ANTHROPIC_AUTH_TOKEN (sends Authorization: Bearer)
  - Codex CLI (`codex exec`) with a custom model provider in CODEX_HOME
  - the `openai` SDK: chat completion (plain, streamed), Responses (plain, streamed)
  - the `@anthropic-ai/sdk` SDK: message (plain, streamed), apiKey and
    authToken (SDK 1.x sends both as Authorization: Bearer)

Each must print the mock's answer, and every request the mock recorded must
carry the provider key, never the member's key (path, headers and body).

The clients come from the npm registry at the versions pinned in
tests/clients/package.json + package-lock.json; setUpClass runs
`npm ci --no-audit --no-fund --cache build/npm-cache` when
tests/clients/node_modules is missing or was installed from another lock
file. No node/npm, or a registry it cannot reach (with a cache that cannot
satisfy the lock file): the whole class is SKIPPED with the reason.

PIAPI_CLIENTS_VERBOSE=1 prints what each client sent (member key redacted).
"""
import fcntl
import gzip
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

import harness
from harness import header_values
from mock_upstream import ANSWER

CLIENTS = harness.REPO / "tests" / "clients"
NODE_MODULES = CLIENTS / "node_modules"
NPM_CACHE = harness.REPO / "build" / "npm-cache"
STAMP = NODE_MODULES / ".piapi-installed-from"
VERBOSE = os.environ.get("PIAPI_CLIENTS_VERBOSE") == "1"

MEMBER = "piapi-member-clients-Vq3Lr8Zt1x"        # what the tools are given
OTHER_MEMBER = "piapi-member-other-Ye6Kd0Sb4n"    # bound to another provider key
PROVIDER_KEY = "sk-mock-provider-main-Jc5Hn2Wp7k"
OTHER_PROVIDER_KEY = "sk-mock-provider-other-Tg9Mx1Qa3c"
# Failover (routes): each client has a member whose first candidate, a
# provider of its own, answers 529; the second is mockai.
FAILOVER = {c: f"piapi-member-fo-{c}-Hs8Wq2Lm5v" for c in ("claude", "codex", "openai",
                                                           "anthropic")}
MEMBER_KEYS = (MEMBER, OTHER_MEMBER) + tuple(FAILOVER.values())

NPM_CI_TIMEOUT = 300      # a cold cache downloads ~250 MB
CLIENT_TIMEOUT = 90       # one client run


def clients_config(stack):
    mock = f"http://127.0.0.1:{stack.mock.port}"
    return {
        "providers": [
            {"name": "mockai",
             "apiKeys": {"main": PROVIDER_KEY, "other": OTHER_PROVIDER_KEY},
             "services": [
                 # Anthropic style: the key in x-api-key; clients append /v1/messages
                 {"type": "claude_code", "baseUrl": mock,
                  "auth": {"mode": "header", "name": "x-api-key"}},
                 # OpenAI style (default auth: Authorization: Bearer); the
                 # baseUrl holds /v1, clients append /responses, /chat/completions
                 {"type": "codex", "baseUrl": mock + "/v1"},
             ]},
        ] + [down_provider(mock, c) for c in FAILOVER],
        "users": [
            {"name": "member", "apiKey": MEMBER, "providerName": "mockai",
             "providerKeyName": "main"},
            {"name": "other", "apiKey": OTHER_MEMBER, "providerName": "mockai",
             "providerKeyName": "other"},
        ] + [failover_member(c) for c in FAILOVER],
        "routes": {f"fo-{c}": {"candidates": [
            {"providerName": f"down-{c}", "providerKeyName": "main"},
            {"providerName": "mockai", "providerKeyName": "main"}]} for c in FAILOVER},
    }


def failover_member(client):
    return {"name": f"fo-{client}", "apiKey": FAILOVER[client], "providerName": "mockai",
            "providerKeyName": "main",
            "services": {"claude_code": {"route": f"fo-{client}"},
                         "codex": {"route": f"fo-{client}"}}}


def down_provider(mock, client):
    """Answers every request 529 (mock_upstream.py's mock_fail)."""
    return {"name": f"down-{client}", "apiKeys": {"main": PROVIDER_KEY},
            "services": [{"type": "claude_code", "baseUrl": mock + "?mock_fail=529",
                          "auth": {"mode": "header", "name": "x-api-key"}},
                         {"type": "codex", "baseUrl": mock + "/v1?mock_fail=529"}]}


# ------------------------------------------------------------ npm ci ------

def _lock_digest():
    h = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        h.update((CLIENTS / name).read_bytes())
    return h.hexdigest()


def _tail(text, n=1500):
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


def _run(argv, timeout, **kw):
    """subprocess.run in a new session; on timeout the whole process group
    is killed (codex.js and npm start children of their own) and
    TimeoutExpired raised with the output so far."""
    p = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         errors="replace", start_new_session=True, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = p.communicate()
        raise subprocess.TimeoutExpired(p.args, timeout, out, err) from None
    finally:
        if p.poll() is None:   # an exception other than the timeout
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def ensure_clients():
    """node_modules installed from the committed lock file, or SkipTest."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        raise unittest.SkipTest(f"node/npm not installed (node={node}, npm={npm}); "
                                "the client tests need Node 20+ and npm")
    NPM_CACHE.mkdir(parents=True, exist_ok=True)
    with open(NPM_CACHE.parent / "npm-cache.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)       # another run installing right now
        want = _lock_digest()
        if STAMP.exists() and STAMP.read_text().strip() == want:
            return
        base = ["npm", "ci", "--no-audit", "--no-fund", "--cache", NPM_CACHE,
                "--fetch-timeout", "60000", "--fetch-retries", "1"]
        try:
            ping = _run(["npm", "ping", "--cache", NPM_CACHE, "--fetch-retries", "0",
                         "--fetch-timeout", "20000"],
                        30, cwd=CLIENTS)
            ping_err = None if ping.returncode == 0 else _tail(ping.stderr + ping.stdout, 400)
        except subprocess.TimeoutExpired:
            ping_err = "npm ping timed out after 30 s"
        t0 = time.monotonic()
        argv = base + (["--prefer-offline"] if ping_err is None else ["--offline"])
        try:
            r = _run(argv, NPM_CI_TIMEOUT, cwd=CLIENTS)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`{' '.join(map(str, argv))}` still running after "
                                 f"{NPM_CI_TIMEOUT} s") from None
        if r.returncode != 0:
            out = _tail(r.stderr + r.stdout)
            if ping_err is not None:
                raise unittest.SkipTest(
                    "npm registry unreachable and the npm cache cannot satisfy "
                    f"tests/clients/package-lock.json.\nnpm ping: {ping_err}\nnpm ci: {out}")
            raise AssertionError(f"npm ci failed (exit {r.returncode}):\n{out}")
        STAMP.write_text(want + "\n")
        sys.stderr.write(f"test_clients: npm ci took {time.monotonic() - t0:.1f}s\n")


def claude_binary():
    """The native Claude Code binary: bin/claude.exe once the package's
    postinstall has put the platform binary there, else the platform
    package's binary itself (what the package's wrapper would exec)."""
    exe = NODE_MODULES / "@anthropic-ai" / "claude-code" / "bin" / "claude.exe"
    try:
        with open(exe, "rb") as f:
            if f.read(4) == b"\x7fELF":
                return exe
    except OSError:
        pass
    arch = {"x86_64": "x64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    native = NODE_MODULES / "@anthropic-ai" / f"claude-code-linux-{arch}" / "claude"
    if not native.exists():
        raise AssertionError(f"no Claude Code binary: neither {exe} is native nor {native} exists")
    return native


# ------------------------------------------------------------- tests ------

class ClientsThroughNginx(unittest.TestCase):
    FORM = "nginx"
    maxDiff = None

    @classmethod
    def setUpClass(cls):
        ensure_clients()
        cls.stack = harness.Stack(cls.FORM, clients_config, name="clients")
        cls.addClassCleanup(cls.stack.stop)
        cls.stack.start()
        cls.stack.mock._call("POST", "strict?on=1")   # unknown paths: JSON 404
        cls.base = f"http://127.0.0.1:{cls.stack.port}/piapi"
        cls.sent = {}                                  # test -> what the client sent

    def setUp(self):
        self.stack.mock.reset()
        self.home = Path(tempfile.mkdtemp(prefix="piapi-client-home-", dir=self.stack.tmp))

    def env(self, **extra):
        """A clean environment: nothing of the caller's keys, proxies or config."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home),
               "LANG": "C.UTF-8", "TERM": "dumb", "NO_COLOR": "1",
               "TMPDIR": str(self.home)}
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run_client(self, argv, env, cwd=None):
        t0 = time.monotonic()
        try:
            r = _run(argv, CLIENT_TIMEOUT, env=env, cwd=cwd or self.home)
        except subprocess.TimeoutExpired as e:
            self.fail(f"{argv[0]} still running after {CLIENT_TIMEOUT} s\n"
                      f"stdout: {_tail(e.stdout or '')}\nstderr: {_tail(e.stderr or '')}"
                      + self.context())
        ctx = (f"\nexit {r.returncode} after {time.monotonic() - t0:.1f}s"
               f"\nstdout: {_tail(r.stdout)}\nstderr: {_tail(r.stderr)}" + self.context())
        self.assertEqual(r.returncode, 0, ctx)
        self.assertIn(ANSWER, r.stdout, "the mock's answer was not printed" + ctx)
        return r

    def context(self):
        reqs = self.stack.mock.requests()
        lines = [f"  {q['method']} {q['path']}" for q in reqs]
        log = self.stack.piapi_log_text()[-1500:]
        return ("\nmock got:\n" + ("\n".join(lines) or "  (nothing)") +
                "\npiapi log tail:\n" + redact(log))

    def check_upstream(self, service, expect):
        """Every recorded request carries the provider key the way `service`
        injects it and no member key; `expect` = (method, path prefix) that
        must be among them. Returns the requests."""
        reqs = self.stack.mock.requests()
        self.assertTrue(any(q["method"] == expect[0] and q["path"].startswith(expect[1])
                            for q in reqs),
                        f"no {expect[0]} {expect[1]}... reached the mock" + self.context())
        for q in reqs:
            what = f"{q['method']} {q['path']}"
            body = q["body"]
            if "gzip" in [v.lower() for v in header_values(q["headers"], "Content-Encoding")]:
                body = gzip.decompress(body)
            blob = (q["path"] + "\n" + json.dumps(q["headers"])).encode() + b"\n" + body
            for key in MEMBER_KEYS:
                self.assertNotIn(key.encode(), blob, f"a member key reached the mock: {what}")
            self.assertNotIn(OTHER_PROVIDER_KEY.encode(), blob, f"wrong provider key: {what}")
            if service == "claude_code":
                self.assertEqual(header_values(q["headers"], "x-api-key"), [PROVIDER_KEY], what)
                self.assertEqual(header_values(q["headers"], "Authorization"), [], what)
            else:
                self.assertEqual(header_values(q["headers"], "Authorization"),
                                 ["Bearer " + PROVIDER_KEY], what)
                self.assertEqual(header_values(q["headers"], "x-api-key"), [], what)
        self.note(reqs)
        return reqs

    def note(self, reqs):
        summary = []
        for q in reqs:
            auth = [f"{k}: {redact(v)}" for k, v in q["headers"]
                    if k.lower() in ("authorization", "x-api-key")]
            ua = header_values(q["headers"], "User-Agent")
            summary.append(f"{q['method']} {q['path']} [{'; '.join(auth)}] "
                           f"ua={ua[0] if ua else '-'} body={q['body_len']}B")
        type(self).sent[self.id().rsplit(".", 1)[-1]] = summary
        if VERBOSE:
            sys.stderr.write("\n  " + "\n  ".join(summary) + "\n")

    def recorded_json(self, q):
        try:
            return json.loads(q["body"])
        except ValueError:
            return {}

    # ---- how each client is started (base = piapi's /piapi or the mock) ----

    def claude(self, base, model=None, **auth):
        """Claude Code, `claude -p`; auth: ANTHROPIC_API_KEY= or ANTHROPIC_AUTH_TOKEN=."""
        argv = [claude_binary(), "-p", "say hi"] + (["--model", model] if model else [])
        env = self.env(ANTHROPIC_BASE_URL=base, DISABLE_TELEMETRY=1,
                       CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1, DISABLE_AUTOUPDATER=1,
                       DISABLE_ERROR_REPORTING=1, **auth)
        return self.run_client(argv, env)

    def codex(self, base_url, member=MEMBER):
        """Codex CLI, `codex exec`, with a custom model provider in CODEX_HOME."""
        codex_home = Path(tempfile.mkdtemp(prefix="codex-home-", dir=self.home))
        (codex_home / "config.toml").write_text(
            'model = "gpt-5"\n'
            'model_provider = "piapi"\n'
            'check_for_update_on_startup = false\n'
            '\n[analytics]\nenabled = false\n'
            '\n[model_providers.piapi]\n'
            'name = "piapi"\n'
            f'base_url = "{base_url}"\n'
            'env_key = "PIAPI_KEY"\n'
            'wire_api = "responses"\n'
            'request_max_retries = 0\n'
            'stream_max_retries = 0\n')
        work = Path(tempfile.mkdtemp(prefix="codex-work-", dir=self.home))
        r = self.run_client(
            ["node", NODE_MODULES / "@openai" / "codex" / "bin" / "codex.js",
             "exec", "--skip-git-repo-check", "say hi"],
            self.env(CODEX_HOME=codex_home, PIAPI_KEY=member), cwd=work)
        # `codex exec` prints the final message alone on stdout
        self.assertEqual(r.stdout.strip().splitlines()[-1], ANSWER, r.stdout)
        return r

    def sdk(self, script, mode, base, auth=None, member=MEMBER):
        """tests/clients/<script> <mode>; prints the text, then usage=<json>."""
        env = self.env(PIAPI_BASE_URL=base, PIAPI_KEY=member)
        if auth:
            env["PIAPI_AUTH"] = auth
        r = self.run_client(["node", CLIENTS / script, mode], env, cwd=CLIENTS)
        lines = r.stdout.splitlines()
        self.assertEqual(lines[0], ANSWER, r.stdout)
        self.assertTrue(len(lines) > 1 and json.loads(lines[1].partition("=")[2]),
                        f"no usage parsed: {r.stdout}")
        return r

    # ---- Claude Code ----

    def test_claude_code_api_key(self):
        """ANTHROPIC_API_KEY (sent as x-api-key)."""
        self.claude(f"{self.base}/claude_code", ANTHROPIC_API_KEY=MEMBER)
        reqs = self.check_upstream("claude_code", ("POST", "/v1/messages"))
        streamed = [self.recorded_json(q).get("stream") for q in reqs
                    if q["path"].startswith("/v1/messages")]
        self.assertIn(True, streamed, "Claude Code did not ask for a streamed answer")

    def test_claude_code_auth_token(self):
        """ANTHROPIC_AUTH_TOKEN (sent as Authorization: Bearer), --model."""
        self.claude(f"{self.base}/claude_code", model="claude-haiku-4-5",
                    ANTHROPIC_AUTH_TOKEN=MEMBER)
        reqs = self.check_upstream("claude_code", ("POST", "/v1/messages"))
        models = {self.recorded_json(q).get("model") for q in reqs
                  if q["path"].startswith("/v1/messages")}
        self.assertIn("claude-haiku-4-5", models)

    # ---- Codex CLI ----

    def test_codex_exec(self):
        self.codex(f"{self.base}/codex")
        reqs = self.check_upstream("codex", ("POST", "/v1/responses"))
        self.assertTrue(all(self.recorded_json(q).get("stream") is True for q in reqs
                            if q["path"] == "/v1/responses"))

    # ---- SDKs ----

    def sdk_via_piapi(self, script, mode, service, expect, auth=None):
        self.sdk(script, mode, f"{self.base}/{service}", auth)
        reqs = self.check_upstream(service, expect)
        self.assertEqual(len(reqs), 1, [q["path"] for q in reqs])
        return reqs[0]

    def test_openai_chat(self):
        q = self.sdk_via_piapi("openai_client.mjs", "chat", "codex",
                               ("POST", "/v1/chat/completions"))
        self.assertIsNone(self.recorded_json(q).get("stream"))

    def test_openai_chat_stream(self):
        q = self.sdk_via_piapi("openai_client.mjs", "chat-stream", "codex",
                               ("POST", "/v1/chat/completions"))
        self.assertIs(self.recorded_json(q).get("stream"), True)

    def test_openai_responses(self):
        self.sdk_via_piapi("openai_client.mjs", "responses", "codex", ("POST", "/v1/responses"))

    def test_openai_responses_stream(self):
        q = self.sdk_via_piapi("openai_client.mjs", "responses-stream", "codex",
                               ("POST", "/v1/responses"))
        self.assertIs(self.recorded_json(q).get("stream"), True)

    def test_anthropic_message(self):
        q = self.sdk_via_piapi("anthropic_client.mjs", "message", "claude_code",
                               ("POST", "/v1/messages"))
        self.assertIsNone(self.recorded_json(q).get("stream"))

    def test_anthropic_message_stream(self):
        q = self.sdk_via_piapi("anthropic_client.mjs", "message-stream", "claude_code",
                               ("POST", "/v1/messages"))
        self.assertIs(self.recorded_json(q).get("stream"), True)

    def test_anthropic_message_stream_auth_token(self):
        self.sdk_via_piapi("anthropic_client.mjs", "message-stream", "claude_code",
                           ("POST", "/v1/messages"), auth="auth-token")

    # ---- through a failover: the first candidate answers 529 ----

    def failed_over(self, service, expect):
        """The first request went to the 529 candidate, and the client still
        got the answer: from the second, with the same provider key rules."""
        reqs = self.check_upstream(service, expect)
        down = [q for q in reqs if "mock_fail=529" in q["path"]]
        up = [q for q in reqs if "mock_fail" not in q["path"]]
        self.assertTrue(down, "the first candidate got nothing" + self.context())
        self.assertTrue(up, "the second candidate got nothing" + self.context())
        bare = down[0]["path"].split("?")[0]
        again = [q for q in up if q["path"].split("?")[0] == bare]
        self.assertTrue(again, f"{bare} never reached the second candidate" + self.context())
        self.assertEqual(down[0]["body"], again[0]["body"])   # sent again as it was

    def test_failover_claude_code(self):
        self.claude(f"{self.base}/claude_code", ANTHROPIC_API_KEY=FAILOVER["claude"])
        self.failed_over("claude_code", ("POST", "/v1/messages"))

    def test_failover_codex_exec(self):
        self.codex(f"{self.base}/codex", member=FAILOVER["codex"])
        self.failed_over("codex", ("POST", "/v1/responses"))

    def test_failover_openai_sdk_stream(self):
        self.sdk("openai_client.mjs", "chat-stream", f"{self.base}/codex",
                 member=FAILOVER["openai"])
        self.failed_over("codex", ("POST", "/v1/chat/completions"))

    def test_failover_anthropic_sdk_stream(self):
        self.sdk("anthropic_client.mjs", "message-stream", f"{self.base}/claude_code",
                 member=FAILOVER["anthropic"])
        self.failed_over("claude_code", ("POST", "/v1/messages"))

    # ---- what the clients themselves send (straight to the mock) ----

    def test_clients_send_the_member_key_as_expected(self):
        """Without piapi in between: which key header each client sends, so
        the runs above are known to cover both x-api-key (Claude Code with
        ANTHROPIC_API_KEY) and Authorization: Bearer (everything else)."""
        mock = self.stack.mock.base
        runs = [
            ("claude ANTHROPIC_API_KEY", "x-api-key", MEMBER,
             lambda: self.claude(mock, ANTHROPIC_API_KEY=MEMBER)),
            ("claude ANTHROPIC_AUTH_TOKEN", "Authorization", "Bearer " + MEMBER,
             lambda: self.claude(mock, ANTHROPIC_AUTH_TOKEN=MEMBER)),
            ("codex exec", "Authorization", "Bearer " + MEMBER,
             lambda: self.codex(mock + "/v1")),
            ("openai sdk", "Authorization", "Bearer " + MEMBER,
             lambda: self.sdk("openai_client.mjs", "chat", mock + "/v1")),
            # @anthropic-ai/sdk 1.x sends an apiKey as a Bearer token too
            ("anthropic sdk apiKey", "Authorization", "Bearer " + MEMBER,
             lambda: self.sdk("anthropic_client.mjs", "message", mock)),
            ("anthropic sdk authToken", "Authorization", "Bearer " + MEMBER,
             lambda: self.sdk("anthropic_client.mjs", "message", mock, auth="auth-token")),
        ]
        seen = []
        for name, header, value, run in runs:
            with self.subTest(client=name):
                self.stack.mock.reset()
                run()
                reqs = self.stack.mock.requests()
                self.assertTrue(reqs, name)
                other = "Authorization" if header == "x-api-key" else "x-api-key"
                for q in reqs:
                    what = f"{name}: {q['method']} {q['path']}"
                    self.assertEqual(header_values(q["headers"], header), [value], what)
                    self.assertEqual(header_values(q["headers"], other), [], what)
                    seen.append(f"{what} [{header}: {redact(value)}]")
        type(self).sent["direct"] = seen
        if VERBOSE:
            sys.stderr.write("\n  " + "\n  ".join(seen) + "\n")

    # ---- and nothing leaked into piapi's log ----

    def test_zz_piapi_log_has_no_keys(self):
        # runs last (alphabetical order): the log then holds every client's requests
        log = self.stack.piapi_log_text()
        self.assertIn('"service_type":"claude_code"', log)
        self.assertIn('"service_type":"codex"', log)
        for key in MEMBER_KEYS + (PROVIDER_KEY, OTHER_PROVIDER_KEY):
            self.assertNotIn(key, log, "a key in piapi's log")


def redact(text):
    for key in MEMBER_KEYS:
        text = text.replace(key, "<member key>")
    return text.replace(PROVIDER_KEY, "<provider key>").replace(OTHER_PROVIDER_KEY,
                                                                 "<other provider key>")


if __name__ == "__main__":
    unittest.main()
