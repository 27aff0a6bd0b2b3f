#!/usr/bin/env python3
"""Runs piapi's integration suites: every tests/integration/test_*.py.

    BUILD=build python3 tests/integration/run.py [FILTER ...]

FILTERs are substrings of test ids (module.Class.test_name); a test runs if
any filter matches. Each test is listed as it runs; the last line is exactly
    integration: N passed, M failed[, K skipped]
and the exit status is 1 if anything failed or errored. A class whose
setUpClass fails (e.g. piapi does not start) counts every one of its tests
as failed. PIAPI_IT_TIMEOUT (default 900 s; make asan and make tsan, whose builds run
slower, give 1800) bounds the whole run.

Adding a suite: drop tests/integration/test_<name>.py with unittest.TestCase
classes; `import harness` (this directory is on sys.path) and build a
harness.Stack per class (see harness.py's docstring). No registration needed.
"""
import faulthandler
import os
import signal
import sys
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # noqa: E402


def watchdog(seconds):
    """A hung suite must not hang CI: dump every thread's stack, stop what
    the harness started, print the summary line and exit."""
    def fire():
        sys.stdout.write(f"\nrun.py: suite still running after {seconds}s; stacks:\n")
        sys.stdout.flush()
        faulthandler.dump_traceback(file=sys.stdout, all_threads=True)
        harness.stop_all()
        print("integration: 0 passed, 1 failed", flush=True)
        os._exit(1)
    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()


def on_sigterm(_sig, _frame):
    raise KeyboardInterrupt  # unwinds; atexit then stops every child


def iter_tests(suite):
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            yield from iter_tests(t)
        else:
            yield t


class Result(unittest.TextTestResult):
    class_sizes = {}

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.class_failures = 0   # tests never run because their class failed to set up
        self.passed = 0

    def addSuccess(self, test):
        super().addSuccess(test)
        self.passed += 1

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self.passed += 1

    def addError(self, test, err):
        super().addError(test, err)
        desc = getattr(test, "description", "")
        if desc.startswith("setUpClass"):
            cls = desc[desc.find("(") + 1:desc.rfind(")")]
            # the error itself counts once in self.errors; the rest of the class here
            self.class_failures += max(self.class_sizes.get(cls, 1) - 1, 0)


def main(argv):
    watchdog(int(os.environ.get("PIAPI_IT_TIMEOUT", "900")))
    signal.signal(signal.SIGTERM, on_sigterm)
    filters = [a for a in argv if not a.startswith("-")]
    loader = unittest.TestLoader()
    discovered = loader.discover(HERE, pattern="test_*.py", top_level_dir=HERE)
    tests = [t for t in iter_tests(discovered)
             if not filters or any(f in t.id() for f in filters)]
    # import failures show up as tests of unittest.loader._FailedTest: keep them
    suite = unittest.TestSuite(tests)
    sizes = {}
    for t in tests:
        key = f"{type(t).__module__}.{type(t).__qualname__}"
        sizes[key] = sizes.get(key, 0) + 1
    Result.class_sizes = sizes

    runner = unittest.TextTestRunner(stream=sys.stdout, verbosity=2, resultclass=Result)
    t0 = time.monotonic()
    result = runner.run(suite)
    sys.stdout.flush()
    sys.stderr.flush()

    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses) \
        + result.class_failures
    skipped = len(result.skipped)
    print(f"integration time: {time.monotonic() - t0:.1f}s")
    line = f"integration: {result.passed} passed, {failed} failed"
    if skipped:
        line += f", {skipped} skipped"
    print(line, flush=True)
    return 1 if failed or not tests else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
