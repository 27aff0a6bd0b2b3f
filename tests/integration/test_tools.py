"""Every program the test suites, the scripts and the make targets run comes
from a Debian package that scripts/install-deps.sh installs for that target,
or from Debian 12's base system, so that `make test` (and run, bench, fuzz)
works on a fresh machine and not only on one where the tool happened to be
installed by hand.

"Base system" is decided per owning package, with dpkg: priority `required`
or `Essential: yes` (dpkg-query -W -f='${Priority} ${Essential}'). Those are
what every Debian 12 system has, debootstrap --variant=minbase and the
debian:bookworm image included: coreutils, bash, dash, grep, sed, findutils,
diffutils, util-linux, perl-base, mawk, dpkg, apt... (not procps: it is only
`important`; not perl, python3 or curl). Anything else must be in
install-deps.sh's list for the target that runs it.

TOOLS is the reviewed list: program -> the package that provides it. A scan
of the sources (Makefile recipes, the shell scripts, the Python suites'
argv lists, shutil.which calls and shell strings, the Dockerfile HEALTHCHECK
the deploy tests run) finds the programs they run and which target runs them
(the file they are in); the test fails when a program is missing from TOOLS
(review it, add it), when its package is neither in that target's
install-deps.sh list nor base, when the program is not installed where
`make test` should have installed it (naming the package), or when dpkg says
another package provides it (the list is wrong). The same for the Python
modules the suites import (MODULES), and every make target that runs a
suite or script must depend on the install-deps target of its mode.
"""
import os
import re
import shlex
import shutil
import subprocess
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INSTALL_DEPS = REPO / "scripts" / "install-deps.sh"

# program -> Debian package (reviewed: `dpkg -S $(command -v PROGRAM)`, or a
# package along its symlinks; a tuple: any of them)
TOOLS = {
    # build (make all, unit-bins) and make run
    "cc": "gcc", "make": "make", "pkg-config": "pkgconf", "nginx": "nginx",
    "curl": "curl",
    # the suites
    "python3": "python3-minimal", "lighttpd": "lighttpd", "spawn-fcgi": "spawn-fcgi",
    "valgrind": "valgrind", "promtool": "prometheus", "prometheus": "prometheus",
    "openssl": "openssl",
    "strace": "strace", "cgi-fcgi": "libfcgi-bin", "node": "nodejs",
    "redis-server": "redis-server", "redis-cli": "redis-tools",
    "npm": ("npm", "nodejs"),       # nodejs: NodeSource's package bundles npm
    "readelf": "binutils", "ldd": "libc-bin",
    "apt-cache": "apt", "apt-get": "apt", "dpkg": "dpkg", "dpkg-query": "dpkg",
    # make bench (and tests/bench/run.sh profile)
    "wrk": "wrk", "git": "git", "curl-config": "libcurl4-openssl-dev",
    "perf": "linux-perf", "callgrind_annotate": "valgrind",
    # make fuzz
    "clang": "clang",
    # scripts/monitoring-screenshot.sh
    "pngquant": "pngquant",
    # base system (required / essential): checked like the rest
    "sh": "dash", "bash": "bash", "env": "coreutils", "cat": "coreutils",
    "cp": "coreutils", "mkdir": "coreutils", "rm": "coreutils", "chmod": "coreutils",
    "mktemp": "coreutils", "tee": "coreutils", "head": "coreutils", "tail": "coreutils",
    "sort": "coreutils", "seq": "coreutils", "sleep": "coreutils", "basename": "coreutils",
    "dirname": "coreutils", "realpath": "coreutils", "wc": "coreutils", "id": "coreutils", "nproc": "coreutils",
    "uname": "coreutils", "install": "coreutils", "ls": "coreutils", "grep": "grep", "sed": "sed", "awk": "mawk",
    "find": "findutils", "cmp": "diffutils", "setsid": "util-linux", "perl": "perl-base",
}

# Python modules the suites import beyond the standard library -> package
MODULES = {"yaml": "python3-yaml"}

# Not installed by install-deps.sh on purpose; the tests that use them skip
# (shutil.which) where they are absent.
OPTIONAL = {
    "systemd-analyze": "systemd: checks deploy/systemd/ units; not worth pulling in",
    "docker-compose": "validates docker-compose.yml; no Docker here",
    "chromium": "test_monitoring runs it only for scripts/monitoring-screenshot.sh, "
                "whose install-deps.sh mode (screenshot) installs it",
}

# Programs that `node` may bring from outside Debian: install-deps.sh only
# installs nodejs + npm where no node is present at all.
OUTSIDE_DEBIAN_OK = {"node", "npm"}

# Where a program is scanned decides the install-deps.sh mode that must
# provide it (a mode's list includes the build/run packages).
SOURCES = {
    "run": ["Makefile", "scripts/run.sh", "scripts/install-deps.sh"],
    "test": ["tests/run.sh", ".ci/run", "tests/integration/*.py", "Dockerfile"],
    "bench": ["tests/bench/run.sh", "tests/bench/bench.py"],
    "fuzz": ["tests/fuzz/run.sh"],
    "screenshot": ["scripts/monitoring-screenshot.sh"],
}
# Run through a variable the scan cannot follow ("$NGINX", $CC)
VIA_VARIABLE = {"nginx": {"run": "scripts/run.sh"}, "cc": {"bench": "tests/bench/run.sh"}}
# bench.py runs these only for `tests/bench/run.sh profile`
PROFILE_ONLY = {"perf", "callgrind_annotate", "valgrind"}

SHELL_WORDS = {
    "if", "then", "else", "elif", "fi", "for", "while", "until", "do", "done", "case",
    "esac", "in", "function", "return", "exit", "set", "shift", "export", "local", "read",
    "cd", "trap", "wait", "exec", "eval", "command", "unset", "break", "continue", "echo",
    "test", "[", "[[", "]", "]]", ":", ".", "!", "{", "}", "ulimit", "umask", "source",
    "type", "declare", "readonly", "pwd", "time", "kill", "printf", "true", "false",
}
# wrappers whose first non-option argument is the program that runs
WRAPPERS = {"exec", "env", "setsid", "nohup", "timeout", "command", "sudo", "xargs"}
# (`command -v X` only looks X up)
NAME_RE = re.compile(r"^[a-z][a-z0-9._+-]*$")


# ---------------------------------------------------------------- scanning --

def _strip_comment(line):
    """Drops a shell comment (a # at a word start, outside quotes)."""
    out, q = [], None
    for i, ch in enumerate(line):
        if q:
            if ch == q:
                q = None
        elif ch in "'\"":
            q = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t;"):
            break
        out.append(ch)
    return "".join(out)


def shell_commands(text):
    """First words of the simple commands in a shell text (rough, but the
    scripts here are plain): command substitutions are scanned too, quoted
    strings are not (perl -e '...' is perl's, not ours)."""
    text = re.sub(r"\\\n", " ", text)
    text = "\n".join(_strip_comment(l) for l in text.splitlines())
    text = re.sub(r"\$\(\([^()]*\)\)", " Q ", text)          # arithmetic
    funcs = set(re.findall(r"^\s*([A-Za-z_][\w-]*)\s*\(\)", text, re.M))
    subs = re.findall(r"\$\(([^()]*)\)", text) + re.findall(r"`([^`]*)`", text)
    names = set()
    for chunk in [text] + subs:
        chunk = re.sub(r"'[^']*'", "Q", chunk)
        chunk = re.sub(r'"(?:[^"\\]|\\.)*"', "Q", chunk, flags=re.S)
        chunk = re.sub(r"\$\([^()]*\)", "Q", chunk)
        for line in chunk.splitlines():
            if re.match(r"^\s*[^()=\s]*\)(\s|$)", line):
                line = line.split(")", 1)[1]          # a case pattern
            names |= _first_words(line, funcs)
    return names


def _first_words(line, funcs):
    names = set()
    for cmd in re.split(r"&&|\|\||[|;&(){}`]|\bthen\b|\bdo\b|\belse\b", line):
        words = cmd.split()
        while words and (re.match(r"^[A-Za-z_]\w*=", words[0]) or words[0] in
                         ("if", "elif", "while", "until", "!", "time")):
            words.pop(0)
        if words[:1] == ["command"] and words[1:2] in (["-v"], ["-V"]):
            continue                                # looks a program up, runs nothing
        while words and words[0] in WRAPPERS:
            if words[0] not in SHELL_WORDS:
                names.add(words[0])                 # env, setsid...: programs too
            words.pop(0)
            while words and (words[0].startswith("-") or re.match(r"^[A-Za-z_]\w*=", words[0])
                             or re.match(r"^\d+[smh]?$", words[0])):
                words.pop(0)
        if not words:
            continue
        w = words[0]
        if w.startswith(("/bin/", "/usr/bin/", "/usr/sbin/", "/sbin/")):
            w = os.path.basename(w)
        if NAME_RE.match(w) and w not in SHELL_WORDS and w not in funcs:
            names.add(w)
    return names


def makefile_commands(text):
    recipes = [l[1:] for l in text.splitlines() if l.startswith("\t")]
    body = "\n".join(re.sub(r"\$\(Q\)|^@|^-", "", r) for r in recipes)
    body = body.replace("$(MAKE)", "make").replace("$(CC)", "cc")
    names = shell_commands(re.sub(r"\$\$", "$", body))
    names |= set(re.findall(r"\$\(shell\s+([\w.+-]+)", text))
    return names


# argv lists: the first argument of run/Popen/..., Proc(name, [...]), or a
# list assigned to a name the suites use for command lines
ARGV0_RE = re.compile(r"""(?:\b(?:run|Popen|check_output|check_call|call|_run|run_client)\(\s*"""
                      r"""|\bProc\([^,()]+,\s*|\b(?:argv|cmd|spawn|ng|base|command)\s*=\s*)"""
                      r"""\[\s*["']([^"'\s]+)["']\s*[,\]]""")
WHICH_RE = re.compile(r"""which\(\s*["']([^"']+)["']""")
SHELL_STRING_RE = re.compile(r"""["']exec\s+([a-z][\w.+-]*)\s""")   # "exec valgrind ..."


def python_commands(text):
    """argv[0] of the argv lists passed to calls (run([...]),
    Popen([...]), Proc("name", [...]), argv = [...]), shutil.which names and
    the programs of the wrapper scripts the tests write (exec PROGRAM).
    """
    names = set()
    for m in ARGV0_RE.finditer(text):
        w = m.group(1)
        if w.startswith(("/bin/", "/usr/")):
            w = os.path.basename(w)
        if NAME_RE.match(w):
            names.add(w)
    names |= set(WHICH_RE.findall(text))
    names |= set(SHELL_STRING_RE.findall(text))
    return names


def dockerfile_commands(text):
    """The HEALTHCHECK's shell command (the deploy tests run it verbatim)."""
    m = re.search(r"^HEALTHCHECK\b.*?\bCMD\s+(.*?)(?<!\\)$", re.sub(r"\\\n", " ", text), re.M)
    return shell_commands(m.group(1)) if m else set()


def shebang(text):
    m = re.match(r"#!\s*(\S+)(?:\s+(\S+))?", text)
    if not m:
        return set()
    prog = os.path.basename(m.group(1))
    return {m.group(2)} if prog == "env" and m.group(2) else {prog}


def scan():
    """{program: {mode, ...}} of everything the sources run."""
    found = {}
    for mode, globs in SOURCES.items():
        for g in globs:
            for path in sorted(REPO.glob(g)):
                if path.name == "test_tools.py":
                    continue            # its tables name programs, it runs none but dpkg
                text = path.read_text()
                if path.name == "Makefile":
                    names = makefile_commands(text)
                elif path.name == "Dockerfile":
                    names = dockerfile_commands(text)
                elif path.suffix == ".py":
                    names = python_commands(text)
                else:
                    names = shell_commands(text) | shebang(text)
                for n in names:
                    m = "profile" if mode == "bench" and n in PROFILE_ONLY else mode
                    found.setdefault(n, {}).setdefault(m, set()).add(str(path.relative_to(REPO)))
    for n, modes in VIA_VARIABLE.items():
        for m, f in modes.items():
            found.setdefault(n, {}).setdefault(m, set()).add(f)
    return found


# ------------------------------------------------------------------ dpkg ---

def run(argv):
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def mode_packages(mode):
    r = run([str(INSTALL_DEPS), "--list", mode])
    assert r.returncode == 0, r.stderr
    return set(r.stdout.split())


def depends_closure(pkgs):
    """The packages a plain `apt-get install --no-install-recommends PKGS`
    is sure to install: PKGS and, recursively, their Depends/Pre-Depends
    that have no alternative (an `a | b` may be satisfied by b)."""
    r = run(["dpkg-query", "-W", "-f=${Package}\t${Depends}, ${Pre-Depends}\n"])
    deps = {}
    for line in r.stdout.splitlines():
        name, _, rest = line.partition("\t")
        deps[name] = [d.strip().split(" ")[0].split(":")[0] for d in rest.split(",")
                      if d.strip() and "|" not in d]
    seen, todo = set(), list(pkgs)
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo += deps.get(p, [])
    return seen


def is_base(pkg):
    r = run(["dpkg-query", "-W", "-f=${Priority} ${Essential}", pkg])
    return r.returncode == 0 and bool(re.search(r"^required\b|\byes$", r.stdout.strip()))


SYSTEM_DIRS = ("/usr/bin", "/usr/sbin", "/bin", "/sbin")


def locate(prog):
    path = os.environ.get("PATH", "") + ":" + ":".join(SYSTEM_DIRS)
    return shutil.which(prog, path=path)


def dpkg_owners(path):
    """Packages dpkg says ship `path` (diversion lines skipped)."""
    r = run(["dpkg", "-S", path])
    out = set()
    for line in r.stdout.splitlines():
        if line.startswith("diversion by") or ": " not in line:
            continue
        out |= {p.strip().split(":")[0] for p in line.split(": ", 1)[0].split(",")}
    return out


def owners(path):
    """Packages shipping `path` or any link on the way to its target (also
    under its /usr-merged spelling): /usr/bin/cc -> /etc/alternatives/cc ->
    /usr/bin/gcc (gcc) -> gcc-12 (gcc-12)."""
    out, seen = set(), set()
    p = path
    while p and p not in seen and len(seen) < 20:
        seen.add(p)
        for c in {p, "/usr" + p if p.startswith(("/bin/", "/sbin/")) else p,
                  p[4:] if p.startswith(("/usr/bin/", "/usr/sbin/")) else p}:
            out |= dpkg_owners(c)
        if not os.path.islink(p):
            break
        p = os.path.normpath(os.path.join(os.path.dirname(p), os.readlink(p)))
    return out


# ----------------------------------------------------------------- tests ---

class TestToolProvenance(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.found = scan()
        cls.lists = {m: depends_closure(mode_packages(m))
                     for m in ("run", "test", "bench", "profile", "fuzz", "screenshot")}

    def test_scan_sees_the_known_programs(self):
        # the scanner itself works: these are run by the sources today
        for prog, mode in (("cgi-fcgi", "test"), ("nginx", "test"), ("wrk", "bench"),
                           ("clang", "fuzz"), ("setsid", "run"), ("perl", "run"),
                           ("curl", "run"), ("node", "test"), ("strace", "test"),
                           ("valgrind", "test"), ("lighttpd", "test"), ("cc", "run")):
            self.assertIn(mode, self.found.get(prog, {}), f"scan did not find {prog} ({mode})")

    def test_every_program_run_is_reviewed(self):
        new = {p: sorted(f for fs in m.values() for f in fs) for p, m in self.found.items()
               if p not in TOOLS and p not in OPTIONAL}
        self.assertEqual(new, {}, "programs run by these files are not in TOOLS: add each with "
                         "the package `dpkg -S $(command -v PROGRAM)` names, and that package "
                         "to scripts/install-deps.sh for the make target that runs it")

    def test_every_program_comes_from_install_deps_or_the_base_system(self):
        problems = []
        for prog, modes in sorted(self.found.items()):
            if prog in OPTIONAL or prog not in TOOLS:
                continue
            pkgs = TOOLS[prog] if isinstance(TOOLS[prog], tuple) else (TOOLS[prog],)
            pkg = pkgs[0]
            where = ", ".join(sorted(f for fs in modes.values() for f in fs))
            base = any(is_base(p) for p in pkgs)
            for mode in sorted(modes):
                if not set(pkgs) & self.lists[mode] and not base:
                    problems.append(f"{prog} (package {pkg}, run by {where}): "
                                    f"`scripts/install-deps.sh {mode}` does not install {pkg} "
                                    f"(not even as a dependency) and it is not a "
                                    f"required/essential package")
            path = locate(prog)
            if path is None:
                # what `make test` installs must be here; bench/fuzz install on demand
                if base or {"run", "test"} & set(modes):
                    problems.append(f"{prog} is not installed: apt-get install {pkg} "
                                    f"(scripts/install-deps.sh {'test' if 'test' in modes else 'run'})")
                continue
            got = owners(path)
            if not got:
                # a copy from outside Debian first on PATH (pyenv, nvm): the
                # Debian one must still be there, except for node (see above)
                if prog in OUTSIDE_DEBIAN_OK:
                    continue
                system = shutil.which(prog, path=":".join(SYSTEM_DIRS))
                got = owners(system) if system else set()
                if not got:
                    problems.append(f"{prog} ({path}) belongs to no Debian package: "
                                    f"apt-get install {pkg}")
                    continue
            if not got & set(pkgs):
                problems.append(f"{prog} ({path}) comes from {', '.join(sorted(got))}, "
                                f"TOOLS says {' or '.join(pkgs)}")
        self.assertEqual(problems, [], "\n".join(problems))

    def test_make_targets_install_what_they_run(self):
        """A target that runs a suite or script first runs the install-deps
        target of that mode (whose recipe is install-deps.sh MODE)."""
        text = (REPO / "Makefile").read_text()
        rules = {}
        for m in re.finditer(r"^([\w.-]+):(?!=)([^\n]*)\n((?:\t[^\n]*\n)*)", text, re.M):
            rules[m.group(1)] = (m.group(2).split(), m.group(3))
        needs = {"tests/run.sh": ("test-deps", "test"), "scripts/run.sh": ("deps", ""),
                 "tests/bench/run.sh": ("bench-deps", "bench"),
                 "tests/fuzz/run.sh": ("fuzz-deps", "fuzz")}
        checked = 0
        for target, (prereqs, recipe) in rules.items():
            for script, (deps, mode) in needs.items():
                if re.search(rf"(^|[\s;)]){re.escape(script)}\b", recipe):
                    checked += 1
                    self.assertIn(deps, prereqs, f"make {target} runs {script} "
                                  f"without installing its packages first ({deps})")
                    want = "scripts/install-deps.sh" + (f" {mode}" if mode else "")
                    self.assertRegex(rules[deps][1], rf"{re.escape(want)}\s*$", f"make {deps}")
        self.assertGreaterEqual(checked, 8, "test unit integration asan tsan run bench fuzz")

    def test_python_modules_come_from_install_deps(self):
        """Modules outside the standard library: reviewed in MODULES, their
        package in `install-deps.sh test`, and Debian's python3 imports them
        from that package."""
        import sys
        local = {p.stem for p in (REPO / "tests" / "integration").glob("*.py")}
        used = {}
        for path in list((REPO / "tests" / "integration").glob("*.py")) + \
                [REPO / "tests" / "bench" / "bench.py"]:
            text = path.read_text()
            mods = re.findall(r"^\s*import\s+([A-Za-z_]\w*)(?:\.\w+)*(?:\s+as\s+\w+)?\s*(?:#.*)?$",
                              text, re.M)
            mods += re.findall(r"^\s*from\s+([A-Za-z_]\w*)[\w.]*\s+import\s+[\w(*]", text, re.M)
            for mod in mods:
                if mod not in sys.stdlib_module_names and mod not in local:
                    used.setdefault(mod, set()).add(path.name)
        self.assertIn("yaml", used, "the scan found no import of yaml")
        for mod, files in sorted(used.items()):
            self.assertIn(mod, MODULES, f"{sorted(files)} import {mod}: add it to MODULES "
                          "with its Debian package, and that to install-deps.sh test")
            pkg = MODULES[mod]
            self.assertTrue(pkg in self.lists["test"], f"{mod} ({pkg}) not in install-deps.sh test")
            r = run(["/usr/bin/python3", "-c", f"import {mod}; print({mod}.__file__)"])
            self.assertEqual(r.returncode, 0, f"Debian's python3 cannot import {mod}: "
                             f"apt-get install {pkg}\n{r.stderr[-500:]}")
            self.assertIn(pkg, owners(r.stdout.strip()), f"{mod} at {r.stdout.strip()}")

    def test_optional_programs_are_guarded(self):
        """An optional program is only run after shutil.which found it."""
        for prog in OPTIONAL:
            users = [p for p in REPO.glob("tests/integration/*.py")
                     if p.name != "test_tools.py" and
                     re.search(rf"""["']{re.escape(prog)}["']""", p.read_text())]
            for p in users:
                self.assertRegex(p.read_text(), rf"""which\(\s*["']{re.escape(prog)}["']""",
                                 f"{p.name} runs {prog} without checking it is installed")

    def test_base_packages_are_judged_by_dpkg(self):
        self.assertTrue(is_base("coreutils"))
        self.assertTrue(is_base("apt"))            # required, not essential
        self.assertFalse(is_base("curl"))          # optional
        self.assertFalse(is_base("strace"))


if __name__ == "__main__":
    unittest.main(verbosity=2)
