"""The deploy forms that cannot run on this machine, checked as far as this
machine allows: the Dockerfile (no Docker engine), docker-compose.yml,
deploy/k8s/piapi.yaml, deploy/systemd/* (systemd is not PID 1), plus the
web-server configs and `make run` (scripts/run.sh).

What is real here: package names are resolved with apt-cache/dpkg against
this Debian bookworm; nginx -t / lighttpd -tt / systemd-analyze verify /
docker-compose config run when installed; every piapi command line these
files contain (Dockerfile CMD, compose command, Kubernetes args, systemd
ExecStart) is run against build/piapi with its paths moved into a temp dir,
as the uid the container would use, and the health checks they declare
(HEALTHCHECK, the liveness exec probe) are run verbatim against it.
"""
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest
from pathlib import Path
from unittest import mock

import harness

REPO = harness.REPO
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "docker-compose.yml"
K8S = REPO / "deploy" / "k8s" / "piapi.yaml"
SYSTEMD = REPO / "deploy" / "systemd"
NGINX_SNIPPET = REPO / "deploy" / "nginx" / "piapi.conf"
COMPOSE_NGINX = REPO / "deploy" / "compose" / "nginx-default.conf"
RUN_SH = REPO / "scripts" / "run.sh"

CONTAINER_UID = 10001      # the Dockerfile's USER (checked below)
IS_ROOT = os.geteuid() == 0

try:
    import yaml
except ImportError:        # python3-yaml not installed
    yaml = None


def need_yaml(tc):
    if yaml is None:
        tc.skipTest("python3-yaml not importable (apt-get install python3-yaml)")


def run(argv, timeout=10, **kw):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, **kw)


def snippet_socket_path():
    """The socket path deploy/nginx/piapi.conf passes to (all locations agree)."""
    paths = set(re.findall(r"^\s*fastcgi_pass\s+unix:(\S+);", NGINX_SNIPPET.read_text(), re.M))
    assert len(paths) == 1, f"{NGINX_SNIPPET}: expected one fastcgi_pass socket, got {paths}"
    return paths.pop()


def opt_value(argv, name):
    """Value of `--name VALUE` in an argv list, or None."""
    for i, a in enumerate(argv[:-1]):
        if a == name:
            return argv[i + 1]
    return None


# ------------------------------------------------------------ Dockerfile --

def dockerfile_instructions(text=None):
    """[(INSTRUCTION, args)] with continuation lines joined and comments dropped."""
    text = DOCKERFILE.read_text() if text is None else text
    out, cur = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if cur and s.startswith("#"):
            continue            # comment inside a continued instruction
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        cur += s
        word, _, rest = cur.partition(" ")
        out.append((word.upper(), rest.strip()))
        cur = ""
    return out


def dockerfile_stages():
    """[{"from": image, "name": alias, "ins": [(INSTR, args)]}]"""
    stages = []
    for ins, args in dockerfile_instructions():
        if ins == "FROM":
            parts = args.split()
            stages.append({"from": parts[0],
                           "name": parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None,
                           "ins": []})
        elif stages:
            stages[-1]["ins"].append((ins, args))
    return stages


def apt_packages(stage):
    """Package names every `apt-get install` in the stage's RUN lines installs."""
    pkgs = []
    for ins, args in stage["ins"]:
        if ins != "RUN":
            continue
        for cmd in re.split(r"&&|;|\|\|", args):
            words = shlex.split(cmd)
            while words and "=" in words[0]:     # VAR=value prefixes
                words.pop(0)
            if words[:2] in (["apt-get", "install"], ["apt", "install"]):
                pkgs += [w for w in words[2:] if not w.startswith("-")]
    return pkgs


def json_array(args):
    v = json.loads(args)
    assert isinstance(v, list) and all(isinstance(x, str) for x in v), args
    return v


def dpkg_owner(path):
    """Debian package owning `path` (tries the /usr-merged spelling too), or None."""
    cands = [str(path), os.path.realpath(path)]
    for c in list(cands):
        if c.startswith("/lib"):
            cands.append("/usr" + c)
    for c in cands:
        r = run(["dpkg", "-S", c])
        if r.returncode == 0:
            return r.stdout.split(":", 1)[0].strip()
    return None


def needed_libs(binary):
    """{soname: resolved path} of the binary's own DT_NEEDED entries."""
    try:
        r = run(["readelf", "-d", binary])
    except FileNotFoundError:
        raise AssertionError("readelf not installed (package binutils, which "
                             "build-essential pulls in: scripts/install-deps.sh)") from None
    assert r.returncode == 0, f"readelf -d {binary}: {r.stderr}"
    sonames = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", r.stdout)
    # piapi links libfcgi, libcurl, libyaml, libcjson: none found = not read
    assert sonames, f"readelf -d {binary} lists no NEEDED library:\n{r.stdout[:2000]}"
    resolved = {}
    for line in run(["ldd", binary]).stdout.splitlines():
        m = re.match(r"\s*(\S+) => (/\S+)", line)
        if m:
            resolved[m.group(1)] = m.group(2)
    return {s: resolved.get(s) for s in sonames}


def makefile_pkgconfig_modules():
    m = re.search(r"^PKGS\s*:?=\s*(.+)$", (REPO / "Makefile").read_text(), re.M)
    assert m, "Makefile: no PKGS line"
    return m.group(1).split()


def package_depends(pkg):
    r = run(["dpkg-query", "-W", "-f=${Depends}", pkg])
    names = []
    for alt in r.stdout.split(","):
        name = alt.split("|")[0].strip().split(" ")[0].split(":")[0]
        if name:
            names.append(name)
    return names


def apt_lists_present():
    lists = Path("/var/lib/apt/lists")
    return lists.is_dir() and any("Packages" in p.name for p in lists.iterdir())


def dockerignore_excluded(relpath, patterns):
    """Docker's rule, enough for simple patterns: the last pattern matching
    the path or one of its parent directories decides; `!` re-includes."""
    import fnmatch
    parts = relpath.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.strip("/")
        if any(fnmatch.fnmatchcase(pre, p) for pre in prefixes):
            excluded = not neg
    return excluded


# ------------------------------------------------------- running piapi ---

CONFIG = """\
providers:
  - name: dead
    apiKeys:
      only: sk-dead-000
    services:
      - type: cx
        baseUrl: http://127.0.0.1:{port}/v1
users:
  - name: alice
    apiKey: piapi-user-alice-deployfiles
    providerName: dead
    providerKeyName: only
"""
ALICE = "piapi-user-alice-deployfiles"


class Sandbox:
    """A temp dir standing in for a container's / : <tmp>/run/piapi,
    <tmp>/etc/piapi/config.yaml and a copy of build/piapi every uid can run."""

    def __init__(self, name):
        self.tmp = Path(tempfile.mkdtemp(prefix=f"piapi-it-deployfiles-{name}-", dir="/tmp"))
        os.chmod(self.tmp, 0o711)
        self.run_dir = self.tmp / "run" / "piapi"
        self.etc = self.tmp / "etc" / "piapi"
        self.run_dir.mkdir(parents=True)
        self.etc.mkdir(parents=True)
        os.chmod(self.tmp / "run", 0o755)
        os.chmod(self.tmp / "etc", 0o755)
        os.chmod(self.etc, 0o755)
        self.bin = self.tmp / "piapi"
        shutil.copy(harness.piapi_bin(), self.bin)
        os.chmod(self.bin, 0o755)
        self.config = self.etc / "config.yaml"
        harness.write_config(self.config, CONFIG.format(port=harness.closed_port()))
        self.procs = []

    def subs(self, s):
        """Moves an in-container path into the sandbox."""
        s = s.replace("/usr/local/bin/piapi", str(self.bin))
        s = s.replace("/run/piapi", str(self.run_dir))
        s = s.replace("/etc/piapi", str(self.etc))
        return s

    def own(self, uid, gid, dir_group=None, dir_mode=0o755):
        """Config readable by uid only (0600); socket dir owned by uid."""
        os.chown(self.config, uid, gid)
        os.chown(self.run_dir, uid, gid if dir_group is None else dir_group)
        os.chmod(self.run_dir, dir_mode)

    def spawn(self, argv, uid=None, gid=None, stdin=subprocess.DEVNULL, log="piapi.log"):
        kw = {}
        if uid is not None:
            kw.update(user=uid, group=gid, extra_groups=[])
        f = open(self.tmp / log, "ab")
        p = subprocess.Popen([str(a) for a in argv], stdin=stdin, stdout=f, stderr=f,
                             start_new_session=True, **kw)
        f.close()
        self.procs.append(p)
        return p

    def log_text(self, log="piapi.log"):
        try:
            return (self.tmp / log).read_text(errors="replace")
        except OSError:
            return ""

    def wait_socket(self, proc, path):
        ok = harness.wait_until(lambda: Path(path).is_socket() or proc.poll() is not None,
                                harness.READY_TIMEOUT)
        if proc.poll() is not None or not ok:
            raise AssertionError(f"piapi did not create {path} (exit {proc.poll()}):\n"
                                 f"{self.log_text()[-3000:]}")

    def cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                p.wait(5)
        for pid in harness.pids_mentioning(str(self.tmp)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not harness.KEEP_TMP:
            shutil.rmtree(self.tmp, ignore_errors=True)


def stop_gracefully(tc, proc, sig=signal.SIGTERM, timeout=10):
    proc.send_signal(sig)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        tc.fail(f"piapi still running {timeout}s after {sig.name}")
    tc.assertEqual(rc, 0, f"piapi exit status after {sig.name}")


# debian:bookworm's PATH, the one a container's HEALTHCHECK and exec probe
# get. Not ours: run as uid 10001, a PATH with directories that uid cannot
# search (a pyenv under /root) turns a missing program into sh's
# "Permission denied".
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def require_programs(shell_cmd):
    """Fails, naming the Debian package, when a program of the (simple,
    pipeline-only) shell command is not installed: else the command fails
    with sh's message alone, which hides the cause."""
    from test_tools import TOOLS
    for part in shell_cmd.split("|"):
        words = [w for w in shlex.split(part) if not re.match(r"^[A-Za-z_]\w*=", w)]
        if words and not shutil.which(words[0], path=CONTAINER_PATH):
            pkg = TOOLS.get(os.path.basename(words[0]))
            how = (f"Debian package {pkg}; scripts/install-deps.sh test installs it" if pkg
                   else "no package known for it: add it to test_tools.TOOLS")
            raise AssertionError(f"{words[0]} is not installed ({how}); "
                                 f"the health check needs it: {shell_cmd}")


def run_health_command(shell_cmd, uid=None, gid=None):
    require_programs(shell_cmd)
    kw = {"user": uid, "group": gid, "extra_groups": []} if uid is not None else {}
    return subprocess.run(["/bin/sh", "-c", shell_cmd], capture_output=True, text=True,
                          timeout=10, stdin=subprocess.DEVNULL, env={"PATH": CONTAINER_PATH},
                          **kw)


def healthcheck_shell_command():
    """The Dockerfile's HEALTHCHECK ... CMD <shell command>."""
    for ins, args in dockerfile_instructions():
        if ins == "HEALTHCHECK":
            m = re.search(r"(?:^|\s)CMD\s+(.*)$", args)
            assert m, f"HEALTHCHECK without CMD: {args}"
            cmd = m.group(1).strip()
            if cmd.startswith("["):
                return shlex.join(json_array(cmd))
            return cmd
    return None


# ================================================================ tests ===

class TestDockerfile(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.stages = dockerfile_stages()
        cls.build_pkgs = set(apt_packages(cls.stages[0])) if cls.stages else set()
        cls.runtime_pkgs = set(apt_packages(cls.stages[-1])) if cls.stages else set()

    def test_two_bookworm_stages_build_then_runtime(self):
        self.assertEqual(len(self.stages), 2, [s["from"] for s in self.stages])
        args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", DOCKERFILE.read_text(), re.M))
        for s in self.stages:
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), s["from"])
            self.assertEqual(image, "debian:bookworm-slim")
        self.assertTrue(self.stages[0]["name"], "the build stage needs a name for COPY --from")
        copies = [a for i, a in self.stages[-1]["ins"] if i == "COPY"]
        self.assertTrue(any(f"--from={self.stages[0]['name']}" in c for c in copies), copies)
        runs = " ".join(a for i, a in self.stages[0]["ins"] if i == "RUN")
        self.assertRegex(runs, r"\bmake\b")

    def test_apt_package_names_resolve_on_bookworm(self):
        if not apt_lists_present():
            self.skipTest("apt lists are empty (run apt-get update): cannot resolve names")
        self.assertTrue(self.build_pkgs and self.runtime_pkgs)
        wanted = sorted(self.build_pkgs | self.runtime_pkgs)
        r = run(["apt-cache", "--no-all-versions", "show"] + wanted, timeout=30)
        found = set(re.findall(r"^Package: (\S+)$", r.stdout, re.M))
        missing = [p for p in wanted if p not in found]
        self.assertEqual(missing, [], f"apt-cache show found no such package\n{r.stderr}")

    def test_build_stage_has_the_dev_package_of_every_pkgconfig_module(self):
        for mod in makefile_pkgconfig_modules():
            r = run(["pkg-config", "--variable=pcfiledir", mod])
            if r.returncode != 0:
                self.skipTest(f"pkg-config module {mod} not installed here (make deps)")
            owner = dpkg_owner(Path(r.stdout.strip()) / f"{mod}.pc")
            self.assertIsNotNone(owner, f"{mod}.pc belongs to no package")
            self.assertIn(owner, self.build_pkgs, f"pkg-config {mod} comes from {owner}")
        self.assertIn("build-essential", self.build_pkgs)
        self.assertIn("pkg-config", self.build_pkgs)

    def test_runtime_stage_has_the_libraries_the_dev_packages_link(self):
        for mod in makefile_pkgconfig_modules():
            r = run(["pkg-config", "--variable=pcfiledir", mod])
            if r.returncode != 0:
                self.skipTest(f"pkg-config module {mod} not installed here (make deps)")
            dev = dpkg_owner(Path(r.stdout.strip()) / f"{mod}.pc")
            libs = [d for d in package_depends(dev) if d.startswith("lib") and not d.endswith("-dev")]
            self.assertTrue(libs, f"{dev}: no runtime library in its Depends")
            for lib in libs:
                self.assertIn(lib, self.runtime_pkgs, f"{dev} links against {lib}")

    def test_runtime_stage_has_every_library_build_piapi_needs(self):
        binary = harness.piapi_bin()
        if not binary.exists():
            self.skipTest(f"{binary} not built")
        base = {"libc6"}   # in debian:bookworm-slim already
        for soname, path in needed_libs(binary).items():
            if re.match(r"lib(a|ub|l|t|hwa)san\.so", soname):
                continue       # BUILD=build/asan: sanitizer runtimes, not in the image
            self.assertIsNotNone(path, f"ldd could not resolve {soname}")
            pkg = dpkg_owner(path)
            self.assertIsNotNone(pkg, f"{path} belongs to no package")
            if pkg not in base:
                self.assertIn(pkg, self.runtime_pkgs, f"build/piapi needs {soname} from {pkg}")

    def test_runtime_stage_is_lean_and_has_what_it_uses(self):
        dev = sorted(p for p in self.runtime_pkgs if p.endswith("-dev")
                     or p in ("build-essential", "pkg-config", "gcc", "make"))
        self.assertEqual(dev, [], "build tools in the runtime stage")
        self.assertIn("ca-certificates", self.runtime_pkgs, "TLS to the providers")
        cmd = healthcheck_shell_command()
        self.assertIsNotNone(cmd, "no HEALTHCHECK")
        tool = shlex.split(cmd.split("|")[0])
        tool = [w for w in tool if "=" not in w][0]
        path = shutil.which(tool)
        if path is None:
            self.skipTest(f"{tool} not installed here: cannot map it to its package")
        self.assertIn(dpkg_owner(path), self.runtime_pkgs, f"HEALTHCHECK runs {tool}")

    def test_user_volume_entrypoint_cmd(self):
        ins = self.stages[-1]["ins"]
        users = [a for i, a in ins if i == "USER"]
        self.assertEqual(users, [f"{CONTAINER_UID}:{CONTAINER_UID}"],
                         "a numeric non-root USER (Kubernetes runAsNonRoot can verify it)")
        self.assertIn("/run/piapi", " ".join(a for i, a in ins if i == "VOLUME"))
        ep = [json_array(a) for i, a in ins if i == "ENTRYPOINT"]
        self.assertEqual(ep, [["/usr/local/bin/piapi"]])
        cmd = [json_array(a) for i, a in ins if i == "CMD"][-1]
        self.assertEqual(opt_value(cmd, "--config"), "/etc/piapi/config.yaml")
        self.assertEqual(opt_value(cmd, "--socket"), snippet_socket_path())
        runs = " ".join(a for i, a in ins if i == "RUN")
        self.assertRegex(runs, rf"useradd\b.*--uid {CONTAINER_UID}\b")

    def test_dockerignore_keeps_secrets_and_build_out_and_sources_in(self):
        pats = [l.strip() for l in DOCKERIGNORE.read_text().splitlines()
                if l.strip() and not l.strip().startswith("#")]
        for p in ("config.yaml", "config/config.yaml", "build/piapi", "build/obj/main.o",
                  ".git/config", "tests/integration/harness.py"):
            self.assertTrue(dockerignore_excluded(p, pats), f"{p} would be in the build context")
        copied = []
        for ins, args in self.stages[0]["ins"]:
            if ins == "COPY" and "--from" not in args:
                copied += args.split()[:-1]
        self.assertTrue(copied)
        for src in copied:
            self.assertTrue((REPO / src).exists(), f"COPY {src}: not in the repo")
            self.assertFalse(dockerignore_excluded(src, pats), f"COPY {src}: excluded by .dockerignore")
        for src in sorted((REPO / "src").glob("*.c"))[:3] + [REPO / "Makefile"]:
            rel = str(src.relative_to(REPO))
            self.assertFalse(dockerignore_excluded(rel, pats), rel)

    def test_cmd_runs_and_healthcheck_passes_as_the_container_user(self):
        """ENTRYPOINT + CMD as uid 10001 with the image's paths moved into a
        temp dir; the HEALTHCHECK command run verbatim (same path moves)."""
        sb = Sandbox("docker")
        self.addCleanup(sb.cleanup)
        ins = self.stages[-1]["ins"]
        argv = [json_array(a) for i, a in ins if i == "ENTRYPOINT"][-1] + \
            [json_array(a) for i, a in ins if i == "CMD"][-1]
        argv = [sb.subs(a) for a in argv]
        uid = gid = CONTAINER_UID if IS_ROOT else None
        if IS_ROOT:
            sb.own(CONTAINER_UID, CONTAINER_UID)
        p = sb.spawn(argv, uid, gid)
        sock = opt_value(argv, "--socket")
        sb.wait_socket(p, sock)
        mode = opt_value(argv, "--socket-mode")
        self.assertEqual(oct(os.stat(sock).st_mode & 0o777), oct(int(mode, 8)))
        hc = sb.subs(healthcheck_shell_command())
        r = run_health_command(hc, uid, gid)
        self.assertEqual(r.returncode, 0, f"HEALTHCHECK failed: {hc}\n{r.stdout}{r.stderr}\n"
                                          f"{sb.log_text()[-2000:]}")
        stop_gracefully(self, p)
        self.assertFalse(Path(sock).exists(), "piapi left its socket behind")
        r = run_health_command(hc, uid, gid)
        self.assertNotEqual(r.returncode, 0, "HEALTHCHECK passes with piapi stopped")


class TestSystemdUnits(unittest.TestCase):

    @staticmethod
    def parse(path):
        """{section: [(key, value)]} (systemd allows repeated keys)."""
        sections, cur = {}, None
        for line in Path(path).read_text().splitlines():
            s = line.strip()
            if not s or s[0] in "#;":
                continue
            if s.startswith("[") and s.endswith("]"):
                cur = sections.setdefault(s[1:-1], [])
                continue
            k, _, v = s.partition("=")
            cur.append((k.strip(), v.strip()))
        return sections

    def values(self, unit, section, key):
        return [v for k, v in self.parse(SYSTEMD / unit).get(section, []) if k == key]

    def one(self, unit, section, key):
        v = self.values(unit, section, key)
        self.assertTrue(v, f"{unit}: [{section}] {key}= missing")
        return v[-1]

    def test_socket_unit(self):
        u = "piapi.socket"
        self.assertEqual(self.one(u, "Socket", "ListenStream"), snippet_socket_path())
        self.assertEqual(self.one(u, "Socket", "Accept"), "no")
        self.assertEqual(self.one(u, "Socket", "SocketGroup"), "www-data")
        self.assertEqual(self.one(u, "Socket", "SocketMode"), "0660")
        self.assertEqual(self.one(u, "Install", "WantedBy"), "sockets.target")

    def test_service_unit(self):
        u = "piapi.service"
        expect = {
            "StandardInput": "socket",
            "StandardOutput": "journal",      # notes §0.11: else the socket, ENOTCONN
            "StandardError": "journal",
            "ExecStart": "/usr/local/bin/piapi --config /etc/piapi/config.yaml",
            "ExecReload": "/bin/kill -HUP $MAINPID",
            "KillSignal": "SIGTERM",
            "TimeoutStopSec": "40",
            "NoNewPrivileges": "yes",
            "CapabilityBoundingSet": "",
            "ProtectSystem": "strict",
            "ProtectHome": "yes",
            "PrivateTmp": "yes",
            "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
            "MemoryDenyWriteExecute": "yes",
            "LockPersonality": "yes",
            "RestrictRealtime": "yes",
            "ProtectKernelTunables": "yes",
            "ProtectKernelModules": "yes",
            "ProtectKernelLogs": "yes",
            "ProtectControlGroups": "yes",
            "RestrictNamespaces": "yes",
            "LimitNOFILE": "65536",
        }
        for k, v in expect.items():
            self.assertEqual(self.one(u, "Service", k), v, k)
        self.assertIn("@system-service", self.values(u, "Service", "SystemCallFilter"))
        self.assertGreaterEqual(int(self.one(u, "Service", "TasksMax")), 2100)
        self.assertIn("piapi.socket", self.one(u, "Unit", "Requires"))
        # a user the config can be made readable to (not root, not DynamicUser)
        self.assertEqual(self.one(u, "Service", "User"), "piapi")
        self.assertNotIn("yes", self.values(u, "Service", "DynamicUser"))
        sysusers = (SYSTEMD / "piapi.sysusers.conf").read_text()
        self.assertRegex(sysusers, r"(?m)^u\s+piapi\s")

    def _verify_dir(self):
        d = Path(tempfile.mkdtemp(prefix="piapi-it-deployfiles-systemd-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, d, True)
        for name in ("piapi.socket", "piapi.service"):
            text = (SYSTEMD / name).read_text().replace("/usr/local/bin/piapi",
                                                        str(harness.piapi_bin()))
            (d / name).write_text(text)
        return d

    def test_systemd_analyze_verify(self):
        if not shutil.which("systemd-analyze"):
            self.skipTest("systemd-analyze not installed")
        if not harness.piapi_bin().exists():
            self.skipTest("build/piapi not built")
        d = self._verify_dir()
        r = run(["systemd-analyze", "verify", "--man=no", d / "piapi.socket", d / "piapi.service"],
                timeout=30, cwd=d)
        # verify exits 0 on some problems (unknown keys, unparsable values) and
        # only prints them: any line naming our units counts as a failure.
        ours = [l for l in (r.stdout + r.stderr).splitlines() if "piapi" in l]
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual(ours, [], "systemd-analyze verify complained")

    def test_systemd_analyze_security_exposure_is_low(self):
        if not shutil.which("systemd-analyze"):
            self.skipTest("systemd-analyze not installed")
        d = self._verify_dir()
        r = run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                 d / "piapi.service"], timeout=30, cwd=d)
        m = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout + r.stderr)
        if not m:
            self.skipTest(f"systemd-analyze security --offline unsupported: {r.stderr[:200]}")
        self.assertLessEqual(float(m.group(1)), 2.5, r.stdout[-3000:])

    def test_socket_activation_launch_emulated(self):
        """What systemd does with these units, done by hand: a listening
        socket (SocketMode) on fd 0, stdout/stderr elsewhere (the journal),
        ExecStart's command line, run (as root) by a non-root uid that reads
        the config only through its group (/etc/piapi 0750 root:piapi,
        config.yaml 0640 root:piapi, as piapi.service documents); then a
        rename-style edit (hot reload), ExecReload's SIGHUP and KillSignal."""
        sb = Sandbox("systemd")
        self.addCleanup(sb.cleanup)
        uid = gid = None
        if IS_ROOT:
            uid = gid = CONTAINER_UID        # stands in for the `piapi` system user
            os.chown(sb.etc, 0, gid)
            os.chmod(sb.etc, 0o750)
            os.chown(sb.config, 0, gid)
            os.chmod(sb.config, 0o640)
        path = sb.run_dir / "piapi.sock"
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(ls.close)
        old = os.umask(0o177)
        try:
            ls.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, int(self.one("piapi.socket", "Socket", "SocketMode"), 8))
        ls.listen(16)
        argv = shlex.split(sb.subs(self.one("piapi.service", "Service", "ExecStart")))
        self.assertIsNone(opt_value(argv, "--socket"), "socket activation: no --socket")
        p = sb.spawn(argv, uid, gid, stdin=ls.fileno(), log="journal.log")
        hc = sb.subs(healthcheck_shell_command())
        ok = harness.wait_until(lambda: run_health_command(hc).returncode == 0, 5, 0.1)
        journal = lambda: sb.log_text("journal.log")   # noqa: E731
        self.assertTrue(ok, f"/healthz over the activated socket failed:\n{journal()}")
        # piapi answers /healthz before its config watcher is up (the pool
        # starts first) and an edit in between is silently missed: wait for
        # "piapi started", which is logged once the watch exists.
        self.assertTrue(harness.wait_until(lambda: '"msg":"piapi started"' in journal(), 5))
        # an admin's `sed -i`-style edit: new file, same owner/mode, renamed over
        tmp = sb.etc / ".config.yaml.new"
        tmp.write_text(sb.config.read_text().replace("name: alice", "name: alice2"))
        st = os.stat(sb.config)
        os.chown(tmp, st.st_uid, st.st_gid)
        os.chmod(tmp, st.st_mode & 0o777)
        os.rename(tmp, sb.config)
        self.assertTrue(harness.wait_until(
            lambda: re.search(r'"msg":"config reloaded"', journal()), 5),
            f"no hot reload after a rename-style edit:\n{journal()[-2000:]}")
        n = len(re.findall(r'"msg":"config (?:reloaded|unchanged)"', journal()))
        p.send_signal(signal.SIGHUP)       # ExecReload
        self.assertTrue(harness.wait_until(
            lambda: len(re.findall(r'"msg":"config (?:reloaded|unchanged)"', journal())) > n, 3),
            f"no reload logged after SIGHUP:\n{journal()[-2000:]}")
        self.assertEqual(run_health_command(hc).returncode, 0)
        t0 = time.monotonic()
        stop_gracefully(self, p, signal.SIGTERM,
                        timeout=int(self.one("piapi.service", "Service", "TimeoutStopSec")))
        self.assertLess(time.monotonic() - t0, 5, "an idle piapi should stop at once")
        self.assertTrue(path.is_socket(), "piapi removed the socket systemd owns")


class TestWebServerConfigs(unittest.TestCase):
    """nginx -t / lighttpd -tt on the deploy configs, rendered exactly as the
    integration harness renders them (its own code, with process start-up
    stubbed out), and the compose/Kubernetes nginx layout served for real."""

    class _NoStart:
        def __init__(self, name, argv, **kw):
            self.name, self.argv = name, argv

        def stop(self, *a, **kw):
            return 0

        def alive(self):
            return False

    def _render_with_harness(self, form):
        st = harness.Stack(form, "", name=f"deployfiles-{form}")
        self.addCleanup(st.stop)
        st.port = harness.free_port()
        st.socket_path = st.tmp / "piapi.sock"
        with mock.patch.object(harness, "Proc", self._NoStart):
            if form == "nginx":
                st._start_nginx()          # renders, runs nginx -t, raises on failure
            else:
                st._start_lighttpd(bin_path=form == "lighttpd-binpath")   # lighttpd -tt
        self.assertEqual(st.front.argv[0], "nginx" if form == "nginx" else "lighttpd")
        return st

    def test_nginx_conf_passes_nginx_t(self):
        if not shutil.which("nginx") and not Path("/usr/sbin/nginx").exists():
            self.skipTest("nginx not installed")
        self._render_with_harness("nginx")

    def test_lighttpd_confs_pass_lighttpd_tt(self):
        if not shutil.which("lighttpd") and not Path("/usr/sbin/lighttpd").exists():
            self.skipTest("lighttpd not installed")
        for form in ("lighttpd-socket", "lighttpd-binpath"):
            with self.subTest(form=form):
                self._render_with_harness(form)

    def test_compose_nginx_layout_serves_piapi(self):
        """deploy/compose/nginx-default.conf in conf.d/ + deploy/nginx/piapi.conf
        in piapi/, under a main conf shaped like the official image's
        (`include conf.d/*.conf` inside http). Socket dir setgid to the
        workers' group, piapi as uid 10001 with the compose --socket-mode:
        the permission scheme compose (tmpfs gid) and Kubernetes (fsGroup) use."""
        if not IS_ROOT:
            self.skipTest("needs root (nginx workers as www-data, piapi as uid 10001)")
        need_yaml(self)
        sb = Sandbox("compose")
        self.addCleanup(sb.cleanup)
        import grp
        www = grp.getgrnam("www-data").gr_gid
        sb.own(CONTAINER_UID, CONTAINER_UID, dir_group=www, dir_mode=0o2750)
        compose = yaml.safe_load(COMPOSE.read_text())
        argv = [str(sb.bin)] + [sb.subs(a) for a in compose["services"]["piapi"]["command"]]
        p = sb.spawn(argv, CONTAINER_UID, CONTAINER_UID)
        sock = opt_value(argv, "--socket")
        sb.wait_socket(p, sock)
        st = os.stat(sock)
        self.assertEqual(st.st_gid, www, "socket did not inherit the setgid directory's group")

        d = sb.tmp / "nginx"
        (d / "conf.d").mkdir(parents=True)
        (d / "piapi").mkdir()
        (d / "tmp").mkdir()
        port = harness.free_port()
        render = harness.Stack._render
        (d / "conf.d" / "default.conf").write_text(render(None, COMPOSE_NGINX, [
            ("listen 9200;", f"listen 127.0.0.1:{port};"),
            ("/etc/nginx/piapi/piapi.conf", d / "piapi" / "piapi.conf")]))
        (d / "piapi" / "piapi.conf").write_text(render(None, NGINX_SNIPPET, [
            (snippet_socket_path(), sock)]))
        shutil.copy("/etc/nginx/fastcgi_params", d / "fastcgi_params")
        (d / "nginx.conf").write_text(
            "# stand-in for the official image's nginx.conf\n"
            "user www-data;\nworker_processes 1;\n"
            f"pid {d}/nginx.pid;\nerror_log {d}/error.log notice;\n"
            "events { worker_connections 64; }\n"
            "http {\n    default_type application/octet-stream;\n"
            f"    access_log {d}/access.log;\n"
            f"    client_body_temp_path {d}/tmp/body;\n    fastcgi_temp_path {d}/tmp/fastcgi;\n"
            f"    include {d}/conf.d/*.conf;\n}}\n")
        ng = ["nginx", "-p", f"{d}/", "-c", d / "nginx.conf"]
        r = run(ng + ["-t", "-q"])
        self.assertEqual(r.returncode, 0, r.stderr)
        front = sb.spawn(ng + ["-g", "daemon off;"], log="nginx.log")
        ok = harness.wait_until(lambda: self._healthz(port), 5, 0.05)
        self.assertTrue(ok, f"/healthz via nginx failed: {(d / 'error.log').read_text()[-2000:]}"
                            f"\n{sb.log_text()[-2000:]}")
        resp = harness.http_request(port, "POST", "/piapi/cx/chat/completions",
                                    [("Authorization", f"Bearer {ALICE}"),
                                     ("Content-Type", "application/json")], b"{}")
        self.assertEqual(resp.status, 502, resp)
        self.assertEqual(resp.json()["type"], "error")
        resp = harness.http_request(port, "GET", "/metrics")
        self.assertEqual(resp.status, 200)
        self.assertIn(b"piapi_requests_total", resp.body)
        # the compose piapi healthcheck (the image's) as the container user
        r = run_health_command(sb.subs(healthcheck_shell_command()), CONTAINER_UID, CONTAINER_UID)
        self.assertEqual(r.returncode, 0, r.stderr)
        front.send_signal(signal.SIGQUIT)      # the image's STOPSIGNAL
        front.wait(10)
        stop_gracefully(self, p)

    @staticmethod
    def _healthz(port):
        try:
            r = harness.http_request(port, "GET", "/healthz", timeout=1)
            return r.status == 200 and r.body.startswith(b"ok")
        except OSError:
            return False


class TestCompose(unittest.TestCase):

    def setUp(self):
        need_yaml(self)
        self.c = yaml.safe_load(COMPOSE.read_text())
        self.piapi = self.c["services"]["piapi"]
        self.nginx = self.c["services"]["nginx"]

    @staticmethod
    def mounts(svc):
        """{target: (source, [flags])} from short ("src:dst:ro") and long syntax."""
        out = {}
        for v in svc.get("volumes", []):
            if isinstance(v, dict):
                flags = ["ro"] if v.get("read_only") else []
                if v.get("volume", {}).get("nocopy"):
                    flags.append("nocopy")
                out[v["target"]] = (v["source"], flags)
            else:
                parts = v.split(":")
                out[parts[1]] = (parts[0], parts[2:] if len(parts) > 2 else [])
        return out

    def test_services_images_ports_restart(self):
        self.assertEqual(self.piapi["build"], ".")
        self.assertRegex(self.nginx["image"], r"^nginx:1\.2\d.*bookworm")
        self.assertIn("9200:9200", [str(p) for p in self.nginx["ports"]])
        for s in (self.piapi, self.nginx):
            self.assertIn(s.get("restart"), ("unless-stopped", "always", "on-failure"))
        self.assertEqual(self.nginx["depends_on"]["piapi"]["condition"], "service_healthy")
        self.assertIn("healthcheck", self.nginx)
        self.assertIn("/healthz", " ".join(self.nginx["healthcheck"]["test"]))
        self.assertIsNotNone(healthcheck_shell_command(), "piapi relies on the image's HEALTHCHECK")

    def test_socket_volume_shared_and_paths_consistent(self):
        pm, nm = self.mounts(self.piapi), self.mounts(self.nginx)
        sock = snippet_socket_path()
        sock_dir = os.path.dirname(sock)
        self.assertIn(sock_dir, pm)
        self.assertIn(sock_dir, nm)
        vol = pm[sock_dir][0]
        self.assertEqual(vol, nm[sock_dir][0], "not the same volume")
        self.assertIn(vol, self.c["volumes"], "a named volume")
        for m in (pm, nm):   # else docker copies the image dir's owner/mode over the volume's
            self.assertIn("nocopy", m[sock_dir][1])
        self.assertEqual(opt_value(self.piapi["command"], "--socket"), sock)
        # 0660 needs the setgid/gid-101 tmpfs (the nginx image's workers' group)
        if opt_value(self.piapi["command"], "--socket-mode") != "0666":
            o = self.c["volumes"][vol]["driver_opts"]["o"]
            opts = dict(kv.split("=", 1) for kv in o.split(","))
            self.assertEqual(opts["gid"], "101")
            self.assertTrue(int(opts["mode"], 8) & 0o2000, "setgid bit")
            self.assertTrue(int(opts["mode"], 8) & 0o050 == 0o050, "group r-x")

    def test_config_is_a_directory_mount(self):
        src, flags = self.mounts(self.piapi)["/etc/piapi"]
        self.assertIn("ro", flags)
        self.assertNotIn(src.rstrip("/"), (".", "./"), "not the whole repo")
        self.assertFalse(src.endswith((".yaml", ".yml")), "single-file mounts break inotify")
        self.assertEqual(opt_value(self.piapi["command"], "--config"), "/etc/piapi/config.yaml")

    def test_nginx_mounts_match_the_server_block(self):
        nm = self.mounts(self.nginx)
        conf = COMPOSE_NGINX.read_text()
        includes = re.findall(r"^\s*include\s+(\S+);", conf, re.M)
        self.assertEqual(len(includes), 1)
        self.assertIn(includes[0], nm, "the snippet the server block includes is mounted")
        self.assertEqual((REPO / nm[includes[0]][0]).resolve(), NGINX_SNIPPET.resolve())
        self.assertEqual((REPO / nm["/etc/nginx/conf.d/default.conf"][0]).resolve(),
                         COMPOSE_NGINX.resolve())
        self.assertIn("listen 9200;", conf)

    def test_docker_compose_config_validates(self):
        exe = shutil.which("docker-compose")
        if not exe:
            self.skipTest("docker-compose not installed (apt-get install docker-compose)")
        r = run([exe, "-f", COMPOSE, "config", "-q"], timeout=30, cwd=REPO)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)


class TestKubernetes(unittest.TestCase):

    def setUp(self):
        need_yaml(self)
        self.docs = [d for d in yaml.safe_load_all(K8S.read_text()) if d]
        self.by = {(d["kind"], d["metadata"]["name"]): d for d in self.docs}
        dep = [d for d in self.docs if d["kind"] == "Deployment"]
        self.assertEqual(len(dep), 1)
        self.pod = dep[0]["spec"]["template"]["spec"]
        self.dep = dep[0]
        self.c = {c["name"]: c for c in self.pod["containers"]}
        self.vols = {v["name"]: v for v in self.pod["volumes"]}

    def mounts(self, cname):
        return {m["mountPath"]: m for m in self.c[cname].get("volumeMounts", [])}

    def test_one_pod_two_containers_socket_on_emptydir(self):
        self.assertEqual(self.dep["spec"]["replicas"], 1)
        self.assertEqual(set(self.c), {"piapi", "nginx"})
        sock_dir = os.path.dirname(snippet_socket_path())
        pm, nm = self.mounts("piapi"), self.mounts("nginx")
        self.assertEqual(pm[sock_dir]["name"], nm[sock_dir]["name"])
        self.assertIn("emptyDir", self.vols[pm[sock_dir]["name"]])
        self.assertEqual(opt_value(self.c["piapi"]["args"], "--socket"), snippet_socket_path())
        sc = self.c["piapi"]["securityContext"]
        self.assertEqual(sc["runAsUser"], CONTAINER_UID)
        if opt_value(self.c["piapi"]["args"], "--socket-mode") != "0666":
            self.assertEqual(self.pod["securityContext"]["fsGroup"], 101,
                             "0660 socket needs the nginx workers' gid on the emptyDir")

    def test_config_directory_mount_no_subpath(self):
        for c in self.c.values():
            for m in c.get("volumeMounts", []):
                self.assertNotIn("subPath", m, f"{c['name']}: subPath mounts never update")
        m = self.mounts("piapi")["/etc/piapi"]
        self.assertTrue(m.get("readOnly"))
        v = self.vols[m["name"]]
        self.assertIn("configMap", v)
        cm = self.by[("ConfigMap", v["configMap"]["name"])]
        self.assertIn("config.yaml", cm["data"])
        self.assertEqual(opt_value(self.c["piapi"]["args"], "--config"), "/etc/piapi/config.yaml")
        text = K8S.read_text()
        self.assertRegex(text, r"kind: Secret", "the Secret alternative is shown")

    def test_embedded_config_passes_check_config(self):
        if not harness.piapi_bin().exists():
            self.skipTest("build/piapi not built")
        v = self.vols[self.mounts("piapi")["/etc/piapi"]["name"]]
        cfg = self.by[("ConfigMap", v["configMap"]["name"])]["data"]["config.yaml"]
        # The keys Secret as the kubelet mounts it: one file per key.
        keys_mount = self.mounts("piapi")["/etc/piapi-keys"]
        self.assertTrue(keys_mount.get("readOnly"))
        secret = self.by[("Secret", self.vols[keys_mount["name"]]["secret"]["secretName"])]
        self.assertIn("file:/etc/piapi-keys/", cfg, "the config names its keys, holds none")
        for value in secret["stringData"].values():
            self.assertNotIn(value, cfg)
        with tempfile.TemporaryDirectory(prefix="piapi-it-deployfiles-k8s-") as d:
            keys = Path(d) / "keys"
            keys.mkdir()
            for name, value in secret["stringData"].items():
                (keys / name).write_text(value)
            path = harness.write_config(Path(d) / "config.yaml",
                                        cfg.replace("/etc/piapi-keys", str(keys)))
            r = run([harness.piapi_bin(), "--check-config", "--config", path])
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_piapi_args_and_liveness_probe_work_with_fsgroup_permissions(self):
        """The piapi container's args as runAsUser/runAsGroup plus fsGroup as a
        supplementary group; the emptyDir as the kubelet leaves it with fsGroup
        (root:fsGroup, 2777), the config as a ConfigMap file with defaultMode
        (root:fsGroup); then the liveness exec command, as that user."""
        if not IS_ROOT:
            self.skipTest("needs root (runs piapi as the pod's uid/gids)")
        sb = Sandbox("k8s")
        self.addCleanup(sb.cleanup)
        sc, fs = self.c["piapi"]["securityContext"], self.pod["securityContext"]["fsGroup"]
        uid, gid = sc["runAsUser"], sc["runAsGroup"]
        os.chown(sb.run_dir, 0, fs)
        os.chmod(sb.run_dir, 0o2777)
        os.chown(sb.config, 0, fs)
        os.chmod(sb.config, self.vols[self.mounts("piapi")["/etc/piapi"]["name"]]
                 ["configMap"]["defaultMode"])
        argv = [str(sb.bin)] + [sb.subs(a) for a in self.c["piapi"]["args"]]
        f = open(sb.tmp / "piapi.log", "ab")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                             start_new_session=True, user=uid, group=gid, extra_groups=[fs])
        f.close()
        sb.procs.append(p)
        sock = opt_value(argv, "--socket")
        sb.wait_socket(p, sock)
        st = os.stat(sock)
        self.assertEqual((st.st_gid, oct(st.st_mode & 0o777)), (fs, "0o660"),
                         "the nginx workers (gid fsGroup) must be able to connect")
        cmd = self.c["piapi"]["livenessProbe"]["exec"]["command"]
        self.assertEqual(cmd[:2], ["/bin/sh", "-c"])
        require_programs(cmd[2])
        r = subprocess.run([sb.subs(a) for a in cmd], capture_output=True, text=True, timeout=10,
                           stdin=subprocess.DEVNULL, user=uid, group=gid, extra_groups=[fs],
                           env={"PATH": CONTAINER_PATH})
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr + sb.log_text()[-2000:])
        stop_gracefully(self, p)

    def test_nginx_configmap_is_the_repo_files_verbatim(self):
        nm = self.mounts("nginx")
        files = {}
        for path, m in nm.items():
            v = self.vols[m["name"]]
            if "configMap" not in v:
                continue
            data = self.by[("ConfigMap", v["configMap"]["name"])]["data"]
            for item in v["configMap"]["items"]:
                files[f"{path}/{item['path']}"] = data[item["key"]]
        self.assertEqual(files.get("/etc/nginx/conf.d/default.conf"), COMPOSE_NGINX.read_text(),
                         "ConfigMap default.conf drifted from deploy/compose/nginx-default.conf")
        include = re.findall(r"^\s*include\s+(\S+);", COMPOSE_NGINX.read_text(), re.M)[0]
        self.assertEqual(files.get(include), NGINX_SNIPPET.read_text(),
                         "ConfigMap piapi.conf drifted from deploy/nginx/piapi.conf")

    def test_probes_and_service(self):
        ng = self.c["nginx"]
        port = {p["name"]: p["containerPort"] for p in ng["ports"]}
        self.assertEqual(port.get("http"), 9200)
        rp = ng["readinessProbe"]["httpGet"]
        self.assertEqual(rp["path"], "/healthz")
        self.assertIn(rp["port"], ("http", 9200))
        self.assertIn("livenessProbe", ng)
        lp = self.c["piapi"]["livenessProbe"]["exec"]["command"]
        self.assertEqual(lp[:2], ["/bin/sh", "-c"])
        self.assertEqual(lp[2], healthcheck_shell_command(), "same check as the image's HEALTHCHECK")
        svc = [d for d in self.docs if d["kind"] == "Service"][0]
        self.assertEqual(svc["spec"]["ports"][0]["port"], 9200)
        self.assertEqual(svc["spec"]["selector"], self.dep["spec"]["selector"]["matchLabels"])
        self.assertGreaterEqual(self.pod["terminationGracePeriodSeconds"], 35)


class TestRunScript(unittest.TestCase):
    """`make run` (scripts/run.sh) in a private RUN_DIR on a free port."""

    def setUp(self):
        if not harness.piapi_bin().exists():
            self.skipTest("build/piapi not built")
        self.tmp = Path(tempfile.mkdtemp(prefix="piapi-it-deployfiles-run-", dir="/tmp"))
        os.chmod(self.tmp, 0o711)
        self.addCleanup(self._cleanup)
        self.port = harness.free_port()
        self.config = harness.write_config(self.tmp / "config.yaml", self.config_text())
        env = dict(os.environ, PORT=str(self.port), CONFIG=str(self.config),
                   RUN_DIR=str(self.tmp / "run"), GRACE="2", BUILD=str(harness.build_dir()))
        env.pop("PIAPI_RUN_REEXEC", None)
        self.err = open(self.tmp / "run.stderr", "wb")
        self.proc = subprocess.Popen([str(RUN_SH)], env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.err,
                                     start_new_session=True)
        ok = harness.wait_until(lambda: self.proc.poll() is not None or
                                TestWebServerConfigs._healthz(self.port), 15, 0.1)
        self.assertTrue(ok and self.proc.poll() is None, f"run.sh did not come up:\n{self.log()}")

    def config_text(self):
        return CONFIG.format(port=harness.closed_port())

    def log(self):
        return (self.tmp / "run.stderr").read_text(errors="replace")

    def demo_pids(self):
        return [p for p in self.leftovers()
                if Path(f"/proc/{p}/comm").read_text().strip() == "demo-provider"]

    def _cleanup(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        for pid in harness.pids_mentioning(str(self.tmp)):
            os.kill(pid, signal.SIGKILL)
        self.err.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def leftovers(self):
        return harness.pids_mentioning(str(self.tmp))

    def test_serves_then_sigint_stops_everything(self):
        r = harness.http_request(self.port, "POST", "/piapi/cx/chat/completions",
                                 [("Authorization", f"Bearer {ALICE}")], b"{}")
        self.assertEqual(r.status, 502, r)
        self.assertEqual(r.json()["type"], "error")
        r = harness.http_request(self.port, "GET", "/piapi/cx/x")
        self.assertEqual(r.status, 401, r)
        self.assertNotIn("demo provider", self.log(), "a real config got the demo provider")
        self.assertEqual(self.demo_pids(), [])
        sock = self.tmp / "run" / "piapi.sock"
        self.assertTrue(sock.is_socket())
        self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.fail(f"run.sh still running 10s after SIGINT:\n{self.log()}")
        self.assertEqual(rc, 0, self.log())
        self.assertEqual(self.leftovers(), [], "processes left running")
        self.assertFalse(sock.exists(), "socket left behind")
        self.assertFalse((self.tmp / "run" / "nginx" / "nginx.pid").exists())

    def test_piapi_dying_stops_nginx_too(self):
        piapi = [p for p in self.leftovers()
                 if Path(f"/proc/{p}/comm").read_text().strip() == "piapi"]
        self.assertEqual(len(piapi), 1, self.leftovers())
        os.kill(piapi[0], signal.SIGKILL)
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.fail(f"run.sh still running after piapi died:\n{self.log()}")
        self.assertNotEqual(rc, 0)
        self.assertEqual(self.leftovers(), [], "nginx left running")
        self.assertFalse((self.tmp / "run" / "piapi.sock").exists(), "stale socket left behind")


EXAMPLE = REPO / "config.yaml.example"


def readme_first_screen_curls():
    """The curl commands of the README's first screen (the block after
    `make run` / `make test`), continuation lines joined."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text.split("\n---\n", 1)[0], re.S)
    cmds = []
    for block in blocks:
        for cmd in re.sub(r"\\\n\s*", " ", block).splitlines():
            if cmd.strip().startswith("curl "):
                cmds.append(cmd.strip())
    return cmds


class TestRunScriptDemo(TestRunScript):
    """`make run` with the untouched example config: the demo provider
    answers behind it, plainly and streamed, the README's first-screen curl
    lines included; SIGINT stops it with the rest."""

    def config_text(self):
        return EXAMPLE.read_text()

    def chat(self):
        return harness.http_request(
            self.port, "POST", "/piapi/cx/chat/completions",
            [("Authorization", "Bearer piapi-user-alice"), ("Content-Type", "application/json")],
            b'{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}]}')

    def test_serves_then_sigint_stops_everything(self):
        self.assertIn("demo provider: config.yaml is the untouched example", self.log())
        self.assertEqual(len(self.demo_pids()), 1, self.log())
        derived = (self.tmp / "run" / "demo-config.yaml").read_text()
        urls = re.findall(r"baseUrl:\s*(\S+)", derived)
        self.assertEqual(len(urls), len(re.findall(r"baseUrl:", EXAMPLE.read_text())))
        for u in urls:
            self.assertRegex(u, r"^http://127\.0\.0\.1:\d+/", "the demo listens on loopback")
        r = self.chat()
        self.assertEqual(r.status, 200, r)
        answer = r.json()["choices"][0]["message"]["content"]
        self.assertIn("demo provider", answer)
        self.assertTrue(r.header("X-Upstream-Request-ID"), "the demo's x-request-id is relayed")
        r = harness.http_request(
            self.port, "POST", "/piapi/cx/responses",
            [("Authorization", "Bearer piapi-user-alice"), ("Content-Type", "application/json")],
            b'{"model":"gpt-4o","input":"Hi"}')
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["output"][0]["content"][0]["text"], answer)
        # Anthropic Messages, streamed: event by event, not in one piece
        events, text, t0 = self.messages_stream()
        names = [e for _, e, _ in events]
        self.assertEqual(names[:2], ["message_start", "content_block_start"])
        self.assertEqual(names[-3:], ["content_block_stop", "message_delta", "message_stop"])
        deltas = [t for t, e, _ in events if e == "content_block_delta"]
        self.assertGreater(len(deltas), 10)
        self.assertLess(deltas[0] - t0, 1.0, "the first event waited for the rest")
        self.assertGreater(deltas[-1] - deltas[0], 0.8, "the events arrived in one piece")
        self.assertEqual(text, answer)
        self.stop_and_check_nothing_left()

    def messages_stream(self):
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        self.addCleanup(conn.close)
        body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": True,
                           "messages": [{"role": "user", "content": "Hi"}]})
        t0 = time.monotonic()
        conn.request("POST", "/piapi/cc/v1/messages", body,
                     {"x-api-key": "piapi-user-alice", "Content-Type": "application/json"})
        resp = conn.getresponse()
        self.assertEqual(resp.status, 200)
        self.assertIn("text/event-stream", resp.getheader("Content-Type", ""))
        events, text, name = [], "", None
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                self.assertEqual(data["type"], name)
                events.append((time.monotonic(), name, data))
                if name == "content_block_delta":
                    text += data["delta"]["text"]
        return events, text, t0

    def stop_and_check_nothing_left(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.fail(f"run.sh still running 10s after SIGINT:\n{self.log()}")
        self.assertEqual(rc, 0, self.log())
        self.assertEqual(self.leftovers(), [], "processes left running (the demo provider?)")

    def test_readme_first_screen_curls_answer(self):
        cmds = readme_first_screen_curls()
        self.assertEqual(len(cmds), 2, cmds)
        out = []
        for cmd in cmds:
            self.assertIn("http://127.0.0.1:9200/", cmd)
            r = subprocess.run(["/bin/sh", "-c", cmd.replace(":9200/", f":{self.port}/")],
                               capture_output=True, text=True, timeout=20)
            self.assertEqual(r.returncode, 0, r.stderr)
            out.append(r.stdout)
        plain, streamed = out
        self.assertIn("demo provider", plain)
        json.loads(plain)
        self.assertIn("event: message_stop", streamed)
        self.assertIn("text_delta", streamed)

    def test_piapi_dying_stops_nginx_too(self):
        super().test_piapi_dying_stops_nginx_too()
        self.assertEqual(self.demo_pids(), [], "the demo provider outlived run.sh")


class TestRunScriptEditedExample(TestRunScript):
    """One byte more than the example: a real config, no demo provider."""

    def config_text(self):
        return EXAMPLE.read_text() + "\n"

    def test_serves_then_sigint_stops_everything(self):
        # (no request upstream: the placeholders are not on loopback)
        r = harness.http_request(self.port, "GET", "/piapi/cx/x")
        self.assertEqual(r.status, 401, r)
        self.assertNotIn("demo provider", self.log())
        self.assertEqual(self.demo_pids(), [])
        self.assertFalse((self.tmp / "run" / "demo-config.yaml").exists())


if __name__ == "__main__":
    unittest.main(verbosity=2)
